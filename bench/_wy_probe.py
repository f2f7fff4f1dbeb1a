import sys
import jax, jax.numpy as jnp
sys.path.insert(0, "bench")
import scan_kernels as sk
from zoo.pallas_kernels.delta_scan import gpu, ops
from zoo.pallas_kernels.ssd_scan.ops import prepare

b, t, h, d = 8, 4096, 16, 128
diff, fixed = sk.inputs("delta", b, t, h, d)
q, k, v, g, beta = diff
seg, state = fixed
T = lambda f, *a: 1e3 * sk.time_jax(jax.jit(f), *a, repeats=5)
p, st = prepare("gpu", 64, q, k, v, g, seg, jnp.full((b,), -1, jnp.int32), state)
static = ops._Static("gpu", False, 64, "bfloat16")
print("wy fwd", T(lambda *a: ops._wy_forward(static, *a)[0], p.k, p.v, beta, p.cum, p.seg, p.segprev), flush=True)
(w, u), wres = ops._wy_forward(static, p.k, p.v, beta, p.cum, p.seg, p.segprev)
print("wy bwd", T(lambda r, dw, du: ops._wy_backward(static, r, (dw, du)), wres, w, u), flush=True)
args = (p.q, p.k, w, u, p.cum, p.seg, p.segprev, st)
print("walk", T(lambda *a: ops._walk(static, *a), *args), flush=True)
print("walk+states", T(lambda *a: ops._walk_forward(static, *a)[0], *args), flush=True)
(o, fin), res = ops._walk_forward(static, *args)
print("bwd walk kernel", T(lambda pp, ww, do, df: gpu.backward(pp, ww, do, df, chunk=64, interpret=False), res[0], res[1], o, fin), flush=True)
print("walk bwd total", T(lambda r, do, df: ops._walk_backward(static, r, (do, df)), res, o, fin), flush=True)
fwd, fb = sk.zoo_fns("delta", "pallas")
wgt = jnp.ones(v.shape, jnp.float32)
print("total fwd", T(fwd, diff, fixed), "fwd+bwd", T(fb, diff, fixed, wgt), flush=True)
