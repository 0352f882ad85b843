"""Device meshes with axes ("data", "model")."""

import jax
import numpy as np
from jax.sharding import Mesh

DATA, MODEL = "data", "model"


def make_mesh(
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    devices: list[jax.Device] | None = None,
) -> Mesh:
    """A [data, model] mesh over the first data * tensor devices (all processes' devices)."""
    for name, value in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("data_parallel_size", data_parallel_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * data_parallel_size
    if needed > len(devices):
        raise ValueError(
            f"data_parallel_size {data_parallel_size} x tensor_parallel_size "
            f"{tensor_parallel_size} needs {needed} devices, but only {len(devices)} are "
            f"available ({devices[0].platform})"
        )
    grid = np.array(devices[:needed], dtype=object).reshape(
        data_parallel_size, tensor_parallel_size
    )
    return Mesh(grid, (DATA, MODEL))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One single-replica [1, model] mesh per row of the data axis."""
    return [Mesh(mesh.devices[i : i + 1], (DATA, MODEL)) for i in range(mesh.devices.shape[0])]
