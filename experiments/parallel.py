"""Data-parallel and FSDP training over every visible device, from ``jax.sharding`` only.

A run lays its state and batches out on a one-axis :class:`jax.sharding.Mesh` (axis ``"data"``)
over all visible devices (``config.parallel.devices``: 0 = all, n = the first n), across hosts
after :func:`initialize_distributed` (``jax.distributed.initialize``):

* the batch is sharded along ``"data"`` (its leading axis; the global batch size must be a
  multiple of the device count, :func:`check_batch_size`);
* parameters and optimizer state are replicated, or, with ``config.parallel.fsdp``, each leaf of
  at least ``fsdp_min_size`` elements is sharded along its largest dimension divisible by the
  device count (:func:`fsdp_spec`; fully-sharded data parallelism, ZeRO-3 style) and the smaller
  ones replicated; the per-task Jacobian ``[K, *param.shape]`` follows its parameter on the
  trailing dimensions (:func:`constrain_jacobian`);
* everything else -- aggregator state (PRNG keys, EMA targets, last weights), sparse-training
  masks, conflict counters, BatchNorm statistics, step counters -- is replicated, so every device
  holds the same value.

The step stays one ``jax.jit`` function with these in/out shardings; XLA's SPMD partitioner
turns the batch means into all-reduces, so each task's loss and gradient are the global batch's
and the aggregators see the reduced per-task gradients unchanged. On one device all of this is
the identity.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.logs import JsonlLog

PyTree = Any

AXIS = "data"  #: the mesh axis the batch (and FSDP's leaves) are split along
DEFAULT_FSDP_MIN_SIZE = 2**14  #: smaller leaves stay replicated under FSDP (64 KiB in float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where a run's arrays live: the mesh and the parameter rule (replicated or FSDP)."""

    mesh: Mesh
    fsdp: bool = False
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def batch(self) -> NamedSharding:
        """Leading (batch) axis split along ``"data"``."""
        return NamedSharding(self.mesh, P(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def make_mesh(num_devices: int = 0) -> Mesh:
    """A one-axis mesh (``"data"``) over the first ``num_devices`` of ``jax.devices()`` (0: all of
    them, on every host)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(
            f"config.parallel.devices={num_devices}, but {len(devices)} device(s) are visible; "
            f"use 0 (all) or a number from 1 to {len(devices)}."
        )
    chosen = devices[: num_devices or len(devices)]
    return Mesh(np.asarray(chosen), (AXIS,))


def make_layout(
    num_devices: int = 0, fsdp: bool = False, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
) -> Layout:
    return Layout(make_mesh(int(num_devices)), bool(fsdp), int(fsdp_min_size))


def layout_from_config(section: Mapping[str, Any] | None) -> Layout:
    """The layout of ``config.parallel`` (a missing section or key: its default)."""
    section = {} if section is None else section
    return make_layout(
        int(section.get("devices", 0)),
        bool(section.get("fsdp", False)),
        int(section.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)),
    )


# ---------------------------------------------------------------------------------------------
# Shardings.


def fsdp_spec(shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
    """FSDP's rule for one leaf: split along its largest dimension divisible by ``num_devices``
    (the first such on ties); replicate a leaf smaller than ``min_size`` elements, one with no
    such dimension, and every leaf on one device.

    Example: ``fsdp_spec((144, 128), 4, 1024) == P("data", None)``; ``fsdp_spec((128,), 4, 1024)
    == P()`` (too small); ``fsdp_spec((3, 5, 7), 4, 1) == P()`` (nothing divisible)."""
    if num_devices <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [i for i, n in enumerate(shape) if n % num_devices == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return P(*(AXIS if i == axis else None for i in range(len(shape))))


def leaf_spec(leaf: Any, layout: Layout) -> P:
    """A parameter-like leaf's spec: FSDP's rule with ``layout.fsdp``, else replicated."""
    if not layout.fsdp:
        return P()
    return fsdp_spec(tuple(np.shape(leaf)), layout.num_devices, layout.fsdp_min_size)


def param_shardings(params: PyTree, layout: Layout) -> PyTree:
    """One ``NamedSharding`` per parameter leaf (replicated, or FSDP's rule)."""
    return jax.tree.map(lambda x: NamedSharding(layout.mesh, leaf_spec(x, layout)), params)


def replicated_shardings(tree: PyTree, layout: Layout) -> PyTree:
    return jax.tree.map(lambda _: layout.replicated, tree)


def _is_mtl_state(node: Any) -> bool:
    """A state defined by ``mtl_jax`` (aggregator, mask, scalarizer state): never sharded."""
    return type(node).__module__.startswith("mtl_jax")


def optimizer_state_shardings(opt_state: PyTree, layout: Layout) -> PyTree:
    """Shardings of an optimizer chain's state: the optimizer's own moments (optax states) follow
    the parameter rule -- same shape, same sharding as the parameter --, while every state
    defined by ``mtl_jax`` (the aggregator's PRNG key, EMA targets and last weights, the
    sparse-training mask in ``MaskState``) is replicated whole."""

    def one(node):
        if _is_mtl_state(node):
            return replicated_shardings(node, layout)
        return NamedSharding(layout.mesh, leaf_spec(node, layout))

    return jax.tree.map(one, opt_state, is_leaf=_is_mtl_state)


def jacobian_spec(jac_leaf: Any, param_leaf: Any, layout: Layout) -> P:
    """``[K, *shape]`` (a Jacobian row per task): ``P(None, *param spec)``; a leaf shaped like
    the parameter (a per-task copy's own gradient): the parameter's spec."""
    spec = tuple(leaf_spec(param_leaf, layout))
    spec = spec + (None,) * (np.ndim(param_leaf) - len(spec))
    if np.ndim(jac_leaf) == np.ndim(param_leaf) + 1:
        return P(None, *spec)
    return P(*spec)


def constrain_jacobian(jac: PyTree, params: PyTree, layout: Layout | None) -> PyTree:
    """Inside ``jit``: the per-task Jacobian's leaves laid out like their parameters on the
    trailing dimensions (a no-op without FSDP). ``jac``: leaves ``[K, ...]`` (or a parameter's
    shape for per-task copies); ``params``: the same structure."""
    if layout is None or not layout.fsdp or layout.num_devices == 1:
        return jac
    return jax.tree.map(
        lambda g, p: jax.lax.with_sharding_constraint(
            g, NamedSharding(layout.mesh, jacobian_spec(g, p, layout))
        ),
        jac,
        params,
    )


def count_sharded(shardings: PyTree) -> int:
    """How many leaves are split over the mesh (not replicated)."""
    return sum(1 for s in jax.tree.leaves(shardings) if any(a is not None for a in tuple(s.spec)))


# ---------------------------------------------------------------------------------------------
# Moving data.


def check_batch_size(batch_size: int, num_devices: int) -> None:
    """The global batch must split evenly over the devices."""
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        raise ValueError(
            f"config.train.batch_size={batch_size} is not divisible by the {num_devices} devices "
            f"of the mesh; set --config.train.batch_size to a multiple of {num_devices} (e.g. "
            f"{max(lower, num_devices)} or {lower + num_devices}), or --config.parallel.devices to "
            f"a divisor of {batch_size}."
        )


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds whole (multi-process: each process
    transfers only its own shards)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if _is_key(x):  # a typed PRNG key (the methods' state): its key data, laid out the same
        data = _global_array(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = to_host(x)
    return jax.make_array_from_callback(np.shape(host), sharding, lambda index: host[index])


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` laid out by ``shardings`` (same structure): a host or one-device value becomes a
    global array; an array already laid out differently is resharded."""
    return jax.tree.map(_global_array, tree, shardings)


def shard_batch(batch: PyTree, layout: Layout | None) -> PyTree:
    """Every leaf ``[B, ...]`` split along ``"data"`` when ``B`` divides evenly over the
    devices, replicated otherwise (the last, partial batch of an evaluation); ``layout=None``:
    ``jnp.asarray`` (the default device)."""
    if layout is None:
        return jax.tree.map(jnp.asarray, batch)

    def one(x):
        even = np.ndim(x) > 0 and np.shape(x)[0] % layout.num_devices == 0
        return _global_array(np.asarray(x), layout.batch if even else layout.replicated)

    return jax.tree.map(one, batch)


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of every leaf, gathering the shards other processes hold if needed (a typed
    PRNG key stays a key, on the host's default device)."""

    def one(x):
        if _is_key(x):
            return jax.random.wrap_key_data(
                jnp.asarray(one(jax.random.key_data(x))), impl=jax.random.key_impl(x)
            )
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------
# Records and processes.


def mesh_record(layout: Layout, sharded_leaves: int | None = None) -> dict[str, Any]:
    """What the ``start`` record says about the mesh a run used."""
    devices = list(layout.mesh.devices.flat)
    record = {
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "processes": jax.process_count(),
        "axis_names": list(layout.mesh.axis_names),
        "shape": {str(k): int(v) for k, v in layout.mesh.shape.items()},
        "fsdp": layout.fsdp,
    }
    if layout.fsdp:
        record["fsdp_min_size"] = layout.fsdp_min_size
        if sharded_leaves is not None:
            record["sharded_leaves"] = sharded_leaves
    return record


def is_primary() -> bool:
    """Process 0 writes the logs and reports (every process checkpoints its own shards)."""
    return jax.process_index() == 0


class PrimaryLog(JsonlLog):
    """A :class:`~experiments.logs.JsonlLog` that only process 0 writes; every process reads it
    (the work dir is on a file system all hosts share)."""

    def write(self, record: dict[str, Any]) -> None:
        if is_primary():
            super().write(record)

    def drop(self, predicate) -> int:
        return super().drop(predicate) if is_primary() else 0


#: Environment variables read by :func:`initialize_distributed` (``JAX_COORDINATOR_ADDRESS`` is
#: also read by JAX itself); unset, JAX detects SLURM, Open MPI and Cloud TPU.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


class DistributedSetupError(ValueError):
    """``jax.distributed.initialize`` could not start (no coordinator found, bad variables)."""


def initialize_distributed(environ: Mapping[str, str] | None = None) -> None:
    """``jax.distributed.initialize`` from ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process
    0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; where they are unset JAX detects the
    cluster (SLURM, Open MPI, Cloud TPU). Call it before any other JAX call."""
    env = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        text = env.get(name)
        if text in (None, ""):
            return None
        try:
            return int(text)
        except ValueError:
            raise DistributedSetupError(f"{name}={text!r} is not an integer.") from None

    num_processes, process_id = number(ENV_NUM_PROCESSES), number(ENV_PROCESS_ID)
    try:
        jax.distributed.initialize(
            coordinator_address=env.get(ENV_COORDINATOR) or None,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (ValueError, RuntimeError) as e:
        raise DistributedSetupError(
            f"config.parallel.distributed=True, but jax.distributed.initialize failed: {e} "
            f"Set {ENV_COORDINATOR} (host:port of process 0), {ENV_NUM_PROCESSES} and "
            f"{ENV_PROCESS_ID} on every host, or launch under SLURM, Open MPI or on a Cloud TPU "
            "(JAX detects those); on one host leave parallel.distributed False."
        ) from e
