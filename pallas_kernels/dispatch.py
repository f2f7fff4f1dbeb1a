"""Which implementation a kernel call runs (DESIGN.md, Kernels): impl="auto" takes Pallas on GPU/TPU and
the XLA reference elsewhere; "xla", "pallas" and "interpret" force one."""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from zoo.train.mesh import LOGICAL_RULES, logical_to_spec

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


def check_chunk(backend: Backend, chunk_size: int) -> None:
    """Triton tiles are powers of two of at least 16; Mosaic blocks need sublane multiples of 8."""
    multiple = 16 if backend.kind == "gpu" else 8
    if chunk_size % multiple or (backend.kind == "gpu" and chunk_size & (chunk_size - 1)):
        raise ValueError(f"the {backend.kind} scan kernels need chunk_size a multiple of {multiple}"
                         f"{' and a power of two' if backend.kind == 'gpu' else ''}, got {chunk_size}")


def per_shard(fn: Callable, mesh, activation_shape, in_layouts, out_layouts) -> Callable:
    """fn run on each device's shard under `mesh`: XLA cannot partition a Pallas call and would gather
    the whole batch onto every device. Rows and heads are split as the logical rules in scope (else
    zoo.train.mesh.LOGICAL_RULES) place a [batch, length, heads, features] activation of
    `activation_shape`. A layout names each argument's axes: "b" rows, "h" heads, "." unsplit; the
    scans are independent per (row, head), so gradients need no cross-device sums."""
    rules = nn.get_logical_axis_rules() or LOGICAL_RULES
    rows, _, heads, _ = logical_to_spec(("batch", "length", "heads", None), activation_shape, mesh, rules)
    spec = lambda layout: P(*({"b": rows, "h": heads}.get(axis) for axis in layout))  # noqa: E731
    return jax.shard_map(fn, mesh=mesh, check_vma=False, in_specs=tuple(map(spec, in_layouts)),
                         out_specs=tuple(map(spec, out_layouts)))
