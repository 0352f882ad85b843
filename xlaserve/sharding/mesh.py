"""Device meshes with axes ("data", "expert", "model"); "expert" has size 1 unless experts of a
mixture-of-experts model are spread over devices (expert parallel)."""

import jax
import numpy as np
from jax.sharding import Mesh

DATA, MODEL = "data", "model"
EXPERT = "expert"


def make_mesh(
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    devices: list[jax.Device] | None = None,
    expert_parallel_size: int = 1,
) -> Mesh:
    """A [data, expert, model] mesh over the first data * expert * tensor devices (all
    processes' devices)."""
    for name, value in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("data_parallel_size", data_parallel_size),
        ("expert_parallel_size", expert_parallel_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * data_parallel_size * expert_parallel_size
    if needed > len(devices):
        raise ValueError(
            f"data_parallel_size {data_parallel_size} x expert_parallel_size "
            f"{expert_parallel_size} x tensor_parallel_size {tensor_parallel_size} needs "
            f"{needed} devices, but only {len(devices)} are available ({devices[0].platform})"
        )
    grid = np.array(devices[:needed], dtype=object).reshape(
        data_parallel_size, expert_parallel_size, tensor_parallel_size
    )
    return Mesh(grid, (DATA, EXPERT, MODEL))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One single-replica [1, model] mesh per row of the data axis."""
    return [Mesh(mesh.devices[i : i + 1], mesh.axis_names) for i in range(mesh.devices.shape[0])]


def expert_parallel(mesh) -> int:
    """The size of a mesh's expert axis (1 for meshes without one)."""
    return dict(mesh.shape).get(EXPERT, 1)
