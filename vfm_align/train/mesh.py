"""Device mesh ('data', 'fsdp') and the partition rules for parameters, optimizer state and batches.

Rules (MaxText-style DP + FSDP): the batch is split over both axes; a weight with at least
``fsdp_min_size`` elements is split over 'fsdp' along its largest axis divisible by the fsdp size;
everything else is replicated. Optimizer moments share their parameter's shape, hence its layout.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vfm_align.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, *, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh; -1 on one axis means "all remaining devices"."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh: at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // max(fsdp, 1)
    if fsdp == -1:
        fsdp = n // max(data, 1)
    if data < 1 or fsdp < 1 or data * fsdp > n or n % (data * fsdp):
        raise ConfigError(f"mesh: data={data} x fsdp={fsdp} does not fit {n} devices")
    devs = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
    # axis_types passed explicitly: its default moved between JAX releases.
    return jax.sharding.Mesh(devs, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def leaf_spec(shape, fsdp_size: int, min_size: int) -> P:
    """PartitionSpec for one weight: largest fsdp-divisible axis over 'fsdp', else replicated."""
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(tree, mesh, *, min_size: int = 2**14):
    """NamedShardings for every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp, min_size)), tree)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis over every device; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, mesh) -> dict:
    """Host batch (this process's share) -> global arrays sharded over the batch axes.

    Each process passes only its own rows; on one host that is the whole batch.
    """
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()

    def put(x):
        x = np.asarray(x)
        gshape = (x.shape[0] * n_proc,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, gshape)

    return jax.tree.map(put, local)


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads (contiguous, equal shares)."""
    n_proc, idx = jax.process_count(), jax.process_index()
    if global_batch_size % n_proc:
        raise ConfigError(f"batch size {global_batch_size} is not divisible by {n_proc} processes")
    per = global_batch_size // n_proc
    return slice(idx * per, (idx + 1) * per)
