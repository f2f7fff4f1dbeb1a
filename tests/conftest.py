import os

# Must precede the jax import. 8 fake CPU devices for mesh tests (DESIGN.md, "Sharding and scale"). On the CPU the
# suite's time is mostly XLA compiling tiny programs, so LLVM's optimisations are off: `make test` took 23:51 on
# 2 cores with them and 16:50 without (471 tests). -O0 once turned a distillation step's gradients NaN; the cause
# was jnp.max's gradient (it divides by the count of entries equal to the max, which is 0 when XLA rounds a
# recomputed input differently), since removed from the mLSTM and attention paths (layers/xlstm.py, attention.py).
# The tests compare programs by tolerances, or the same program with itself bit for bit.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAGS = ["--xla_force_host_platform_device_count=8"]
if os.environ["JAX_PLATFORMS"] == "cpu":
    _FLAGS += ["--xla_llvm_disable_expensive_passes=true", "--xla_backend_optimization_level=0"]
# GPU interpret mode runs a kernel's warpgroups as threads that block (barrier waits) inside callbacks on XLA's CPU
# thread pool, of as many threads as cores unless NPROC says otherwise: on 2 cores two waiting warpgroups can
# starve the third (a persistent variant of the Hopper MLA kernel, b984839, hung so every time; the kernels on main
# passed by the order their threads happened to start in). Four threads cover the Hopper kernels' three warpgroups.
os.environ.setdefault("NPROC", "4")
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] + [f for f in _FLAGS if f.split("=")[0] not in _given]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The float32 tolerances (tests/reference.py) assume float32 matmuls, which the CPU does; XLA on GPUs would run
# them in TF32 (errors ~1e-4), so a GPU run of the suite asks for full float32.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test; the seed is printed on failure, and ZOO_TEST_SEED=<seed>
    replays it."""
    seed = int(os.environ.get("ZOO_TEST_SEED") or np.random.SeedSequence().entropy % (2**31))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not a parametrize id that happens to be "gpu"
            item.add_marker(skip)
