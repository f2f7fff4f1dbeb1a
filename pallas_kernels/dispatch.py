"""Which implementation a kernel call runs (DESIGN.md, Kernels): impl="auto" takes Pallas on GPU/TPU and
the XLA reference elsewhere; "xla", "pallas" and "interpret" force one."""

from __future__ import annotations

from typing import NamedTuple

import jax

IMPLS = ("auto", "xla", "pallas", "interpret")
_PLATFORMS = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


class Backend(NamedTuple):
    kind: str  # "xla", "gpu" (Pallas Triton) or "tpu" (Pallas Mosaic)
    interpret: bool = False


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def resolve(impl: str, platform: str | None = None) -> Backend:
    """platform: "gpu" or "tpu" picks whose kernel "interpret" emulates (tests run both on CPU); default
    is the platform JAX runs on, and the GPU kernel's interpreter when that is the CPU."""
    check_impl(impl)
    platform = _PLATFORMS.get(platform or jax.default_backend())
    if impl == "xla" or (impl == "auto" and platform is None):
        return Backend("xla")
    if impl == "interpret":
        return Backend(platform or "gpu", interpret=True)
    if platform is None:
        raise ValueError(f"impl={impl!r} needs a GPU or TPU (JAX runs on {jax.default_backend()}); "
                         "use impl='interpret' to run the Pallas kernels on the CPU, or impl='xla'")
    return Backend(platform)
