import os

# Must precede the jax import. 8 fake CPU devices for mesh tests (DESIGN.md, "Sharding and scale"). On the CPU the
# suite's time is mostly XLA compiling tiny programs. Without LLVM's expensive passes, tests/test_recurrent_init.py
# + test_eval_perplexity.py take 49 s instead of 73 s on 2 cores, but the whole of `make test` only 20:29 instead
# of 20:53. LLVM at -O0 as well cut the suite to 14:24 but changed numerics (a dense-mLSTM distillation step's
# gradients turned NaN, tests/test_distill.py seed 2063506454), so it is not used until that is understood.
# The tests compare programs by tolerances, or the same program with itself bit for bit.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAGS = ["--xla_force_host_platform_device_count=8"]
if os.environ["JAX_PLATFORMS"] == "cpu":
    _FLAGS += ["--xla_llvm_disable_expensive_passes=true"]
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_given] + [f for f in _FLAGS if f.split("=")[0] not in _given]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
