"""Device meshes and the logical-axis rules that place parameters on them.

Sharding stays out of the architecture: a config's `param_specs()` gives every parameter logical axis
names ("vocab", "embed", "heads", ...), and one rules table maps those onto the mesh axes (data, fsdp,
expert, tensor); the models never import this module. A mesh axis that does not divide a dimension is
dropped for that array (it is replicated along it) rather than failing, so one rules table serves every
model size; two logical axes of one array that map to the same mesh axis are rejected, since that
sharding is meaningless.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllmjax.errors import BadInputError
from mllmjax.models.params import Params, map_specs
from mllmjax.settings import DEFAULT_MESH, MESH_AXES

if TYPE_CHECKING:
    from mllmjax.models.config import ModelConfig


MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)."""

    rules: Mapping[str, MeshAxes]

    def __post_init__(self) -> None:
        for logical, axes in self.rules.items():
            for axis in _as_tuple(axes):
                if axis not in MESH_AXES:
                    raise ValueError(f"rule {logical!r} -> {axes!r}: unknown mesh axis {axis!r}")

    def spec(self, shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
        used: dict[str, str] = {}
        parts: list[MeshAxes] = []
        for dim, name in zip(shape, logical, strict=True):
            axes = tuple(
                a for a in _as_tuple(self.rules.get(name) if name else None) if mesh.shape.get(a, 1) > 1
            )
            for a in axes:
                if a in used:
                    raise ValueError(
                        f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r} in one array"
                    )
                used[a] = name or ""
            if axes and dim % math.prod(mesh.shape[a] for a in axes):
                axes = ()  # not divisible: replicate this dimension
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


# fsdp shards the model dimension (all-gathered per layer); tensor shards heads/mlp/vocab; expert
# shards a mixture of experts' stacked expert weights by expert. Outside the experts the expert axis is
# one more data-parallel axis (the batch rows are split over it too), as in GShard: the devices of an
# expert group hold different experts and different rows.
DEFAULT_RULES = ShardingRules(
    {
        "batch": ("data", "fsdp", "expert"),
        "experts": "expert",
        "vocab": "tensor",
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "head_dim": None,
        "layers": None,
        "norm": None,
        "lora": None,  # a LoRA adapter's rank: small, never split
    }
)


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """'data=2,fsdp=-1,tensor=1' -> sizes per axis; -1 takes the devices left; missing axes are 1."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise BadInputError(
                f"bad --mesh entry {part!r}: expected AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}"
            )
        if name in sizes:
            raise BadInputError(f"--mesh names axis {name!r} twice")
        try:
            size = int(value)
        except ValueError:
            raise BadInputError(f"bad --mesh size {value!r} for axis {name!r}: expected an integer") from None
        if size == 0 or size < -1:
            raise BadInputError(
                f"bad --mesh size {size} for axis {name!r}: expected a positive integer or -1"
            )
        sizes[name] = size
    auto = [a for a, s in sizes.items() if s == -1]
    if len(auto) > 1:
        raise BadInputError(f"--mesh {spec!r}: at most one axis may be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if num_devices % fixed:
            raise BadInputError(f"--mesh {spec!r}: {num_devices} devices are not divisible by {fixed}")
        sizes[auto[0]] = num_devices // fixed
    for a in MESH_AXES:
        sizes.setdefault(a, 1)
    total = math.prod(sizes.values())
    if total != num_devices:
        raise BadInputError(f"--mesh {spec!r} uses {total} devices but {num_devices} are available")
    return {a: sizes[a] for a in MESH_AXES}


def make_mesh(spec: str = DEFAULT_MESH, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # fake CPU devices and odd shapes: keep the given order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Params:
    """A tree of NamedShardings shaped like the params."""
    return map_specs(
        lambda _, spec: NamedSharding(mesh, rules.spec(spec.shape, spec.axes, mesh)), cfg.param_specs()
    )


def spec_shardings(specs: Params, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Params:
    """A tree of NamedShardings shaped like a spec tree (e.g. `mllmjax.lora.adapter_specs`)."""
    return map_specs(lambda _, spec: NamedSharding(mesh, rules.spec(spec.shape, spec.axes, mesh)), specs)


def shard_params(
    params: Params, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
) -> Params:
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def mesh_axes(mesh: Mesh, logical: str, rules: ShardingRules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to that have more than one device in this mesh (for kernels
    that run per device, e.g. `Kernel(row_axes=mesh_axes(mesh, "batch"))`)."""
    return tuple(a for a in _as_tuple(rules.rules.get(logical)) if mesh.shape.get(a, 1) > 1)


def batch_axes(mesh: Mesh, rows: int, rules: ShardingRules = DEFAULT_RULES) -> tuple[str, ...] | None:
    """The mesh axes a batch of `rows` rows is split over (the rules' batch axes that have more than one
    device), or None when there are none or they do not divide the rows (then the batch is whole on
    every device)."""
    axes = mesh_axes(mesh, "batch", rules)
    size = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and rows % size == 0 else None


def place_rows(tree: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Every array of `tree` on the mesh, its leading (row) axis split over the batch axes when they
    divide it (else whole on every device)."""

    def put(x: Any) -> Any:
        sharding = NamedSharding(mesh, PartitionSpec(batch_axes(mesh, x.shape[0], rules)))
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # Typed keys go as their raw data: a multi-host device_put takes plain host values only.
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)
