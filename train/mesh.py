"""The device mesh and the logical-axis rules that place params, optimizer state and batches on it.

The mesh always has the three axes of DESIGN.md, ("data", "fsdp", "tensor"): "data" replicates the
model and splits the batch, "fsdp" splits the batch and also shards parameters (ZeRO-3 style, gathered
per layer by XLA), "tensor" shards heads / MLP width / vocabulary (Megatron style). Layers name their
axes logically ("embed", "heads", ...); `LOGICAL_RULES` maps those names to mesh axes, in priority
order: an activation ("batch", "length", "embed") gets the batch split over data x fsdp, and its
"embed" dimension then finds "fsdp" taken and stays whole, while a weight ("embed", "mlp") is split
(fsdp, tensor).
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from zoo.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("cache_batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("latent_shards", "tensor"),
    ("embed", "fsdp"),
    ("latent", "fsdp"),
    ("length", None),
    ("cache_length", None),
    ("head_dim", None),
    ("state", None),
)


def parse_mesh(spec: str | None, device_count: int | None = None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}. Axes left out are 1, except
    that one axis may be -1 (or the whole spec empty, meaning data=-1): it takes the devices left.
    A mesh smaller than the visible devices uses the first ones (one host only)."""
    device_count = jax.device_count() if device_count is None else device_count
    sizes = {axis: 1 for axis in MESH_AXES}
    given = [p.strip() for p in (spec or "data=-1").split(",") if p.strip()]
    for part in given:
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes:
            raise ConfigError("mesh", f"unknown axis {name!r} in {spec!r}; axes are {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError("mesh", f"axis {name}: {value!r} is not an integer (in {spec!r})") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ConfigError("mesh", f"axis {name} must be positive or -1, got {sizes[name]}")
    wildcards = [a for a, n in sizes.items() if n == -1]
    if len(wildcards) > 1:
        raise ConfigError("mesh", f"only one axis may be -1, got {wildcards}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if wildcards:
        if device_count % fixed:
            raise ConfigError("mesh", f"{device_count} devices do not divide by the fixed axes' product {fixed}")
        sizes[wildcards[0]] = device_count // fixed
    if math.prod(sizes.values()) > device_count:
        raise ConfigError(
            "mesh", f"{spec!r} needs {math.prod(sizes.values())} devices, but {device_count} are visible"
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: as many as the shape needs, across hosts), axes in the
    ("data", "fsdp", "tensor") order. `jax.make_mesh` orders devices so that the last axes
    ("tensor") sit on the fastest links."""
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices is None:
        if math.prod(shape) < jax.device_count() and jax.process_count() > 1:
            raise ConfigError("mesh", f"shape {shape} leaves devices idle; on several hosts the mesh must use all "
                                      f"{jax.device_count()}")
        # Auto axes: GSPMD propagates shardings from the annotated inputs / constraints.
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=jax.devices()[: math.prod(shape)])
    devices = list(devices)
    if len(devices) != math.prod(shape):
        raise ConfigError("mesh", f"shape {shape} needs {math.prod(shape)} devices, {len(devices)} given")
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def launched_on_several_hosts(environ=os.environ) -> bool:
    """Whether the launcher started several processes: a multi-host TPU slice (several worker
    hostnames), SLURM or Open MPI with more than one task, or an explicit JAX coordinator."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(int(environ.get(v, "1") or "1") > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(force: bool = False) -> bool:
    """`jax.distributed.initialize()` (which reads the cluster from the environment) when launched on
    several hosts; a no-op on one. Must run before anything touches the devices."""
    if not (force or launched_on_several_hosts()):
        return False
    jax.distributed.initialize()
    return True


def logical_to_sharding(logical_axes, shape, mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """The NamedSharding the rules give one array, dropping any mesh axis that does not divide its
    dimension (a tiny model's 4 heads on an 8-way "tensor" axis stay whole rather than fail)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def logical_to_spec(logical_axes, shape, mesh, rules=LOGICAL_RULES) -> PartitionSpec:
    """logical_to_sharding's PartitionSpec; `mesh` may be abstract (jax.sharding.get_abstract_mesh())."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for name in names:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def param_shardings(boxed_abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a params tree whose leaves are flax `Partitioned` boxes (from
    `jax.eval_shape(model.init, ...)`), as an unboxed tree."""
    return jax.tree.map(
        lambda box: logical_to_sharding(box.names, box.value.shape, mesh, rules),
        boxed_abstract_params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [batch, length]: rows split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_array(array) -> np.ndarray:
    """The whole array as numpy on this host, gathering the shards other hosts hold (every host must call)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def local_rows(batch: dict, global_rows: int) -> dict:
    """This process's share of a global batch that every process built whole (eval batches)."""
    count, index = jax.process_count(), jax.process_index()
    rows = slice(index * global_rows // count, (index + 1) * global_rows // count)
    return {k: v[rows] for k, v in batch.items()}
