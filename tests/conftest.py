import os

# 8 fake CPU devices for mesh tests (DESIGN.md, "Sharding and scale"); must precede the jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
