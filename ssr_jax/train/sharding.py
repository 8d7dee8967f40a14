"""Device mesh and shardings: data parallel over one "data" axis, parameters replicated.

The mesh is built with `jax.sharding.Mesh`, whose axis type is Auto (environment.md pitfall 6:
`jax.make_mesh` defaults to Explicit, under which unsharded inputs are rejected by shard_map and
sharding becomes part of the array type). With Auto, the jitted step's declared in/out shardings
are all XLA needs to insert the gradient all-reduce.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """1-D mesh over `devices` (default: every device of every process) named ("data",)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Full copy on every device of `mesh` (parameters, optimizer state, frozen CLIP, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the "data" axis; other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_batch(batch, mesh: Mesh):
  """Per-process numpy batch (dict of [B_local, ...] arrays) -> global jax arrays on `mesh`.

  The global batch is B_local * process_count, sharded on its leading axis over the "data" axis
  (`jax.make_array_from_process_local_data`, so each process contributes its own rows).
  Raises ValueError if the leaves disagree on B_local or if the global batch does not divide
  evenly over the mesh devices.
  """
  sharding = batch_sharding(mesh)
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  if not leaves:
    raise ValueError("put_batch: the batch is empty.")
  sizes = {}
  for path, x in leaves:
    if np.ndim(x) == 0:
      raise ValueError(
        f"put_batch: batch{jax.tree_util.keystr(path)} is a scalar; every batch "
        "entry needs a leading batch axis."
      )
    sizes[jax.tree_util.keystr(path)] = np.shape(x)[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(f"put_batch: batch entries disagree on the batch size: {sizes}.")
  local = next(iter(sizes.values()))
  global_batch = local * jax.process_count()
  if global_batch % mesh.size:
    raise ValueError(
      f"Global batch {global_batch} ({local} per process x {jax.process_count()} processes) is "
      f"not divisible by the {mesh.size} devices of the mesh: set train.batch_size to a multiple "
      f"of {mesh.size}."
    )

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))

  return jax.tree.map(put, batch)
