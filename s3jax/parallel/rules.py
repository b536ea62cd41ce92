"""Shardings by logical axis names: one table says which mesh axis splits which model dimension.

Every array gets a logical name per dimension (``embed``, ``heads``, ``mlp``, ...) from where it
sits in the model (``PARAM_AXES``, ``POOL_AXES``); ``RULES`` maps logical names to mesh axes. A
``PartitionSpec`` is never written anywhere else, so changing how the model is split is a
change to ``RULES`` (as in MaxText's ``logical_axis_rules``).

Megatron-style tensor parallelism falls out of the table: q/k/v and the MLP's first matrix are
split by output column (``heads``, ``mlp``), the attention output and the MLP's second matrix by
input row, so each device computes whole heads and a slice of the MLP, and XLA adds one
all-reduce after each row-split matrix. The KV pool is split by ``kv_heads``, so a device holds
the keys and values of its own heads only. ``stage`` is the leading dimension of parameters and
pool slots stacked per pipeline stage (``s3jax.parallel.pipeline``).

A dimension the mesh axis does not divide stays whole (replicated), e.g. GPT-2's 50,257-token
vocabulary over 2 devices; ``spec_for`` decides it, and the memory model uses the same function,
so the predicted bytes are what the arrays hold. Head dimensions split only at head boundaries:
a projection's N H (or K H) columns count as N (or K) units (``head_units``). So a kv-head count
the tensor degree does not divide (SmolLM2's 3 kv heads over 2 devices) keeps the k and v
projections and the KV pool whole on every device of the ``model`` axis, while the query heads,
the MLP and the vocabulary still split: each device then holds every kv head (K H columns and
the whole pool) and computes its own query heads against them. That costs memory (the pool is
replicated ``model`` times, which the memory model counts), never correctness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axis -> mesh axis; a logical axis not listed is never split.
RULES: dict[str, str] = {
  "stage": "stage",
  "heads": "model",
  "kv_heads": "model",
  "mlp": "model",
  "vocab": "model",
}

# (module, parameter) -> logical axes of the parameter's dimensions.
PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
  ("q", "kernel"): ("embed", "heads"),
  ("q", "bias"): ("heads",),
  ("k", "kernel"): ("embed", "kv_heads"),
  ("k", "bias"): ("kv_heads",),
  ("v", "kernel"): ("embed", "kv_heads"),
  ("v", "bias"): ("kv_heads",),
  ("out", "kernel"): ("heads", "embed"),
  ("out", "bias"): ("embed",),
  ("gate", "kernel"): ("embed", "mlp"),
  ("gate", "bias"): ("mlp",),
  ("fc_in", "kernel"): ("embed", "mlp"),
  ("fc_in", "bias"): ("mlp",),
  ("fc_out", "kernel"): ("mlp", "embed"),
  ("fc_out", "bias"): ("embed",),
  ("lm_head", "kernel"): ("embed", "vocab"),
  ("lm_head", "bias"): ("vocab",),
  ("", "wte"): ("vocab", "embed"),
  ("", "wpe"): ("positions", "embed"),
  ("", "scale"): ("embed",),
  ("", "bias"): ("embed",),  # layer norms
}

# One layer of the KV pool, [Pn, K, G, H].
POOL_AXES = ("pages", "kv_heads", "page_tokens", "head_dim")


def _names(path) -> list[str]:
  return [
    str(getattr(k, "key", getattr(k, "name", k)))
    for k in path
    if getattr(k, "key", None) != "value" and getattr(k, "name", None) != "value"
  ]


def param_axes(path) -> tuple[str, ...]:
  """Logical axes of the parameter at ``path`` (a ``jax.tree_util`` key path into the model state)."""
  names = _names(path)
  module, leaf = (names[-2] if len(names) > 1 else ""), names[-1]
  axes = PARAM_AXES.get((module, leaf)) or PARAM_AXES.get(("", leaf))
  if axes is None:
    raise KeyError(f"no logical axes for parameter {'/'.join(names)}: add it to s3jax.parallel.rules.PARAM_AXES")
  return axes


def head_units(cfg) -> dict[str, int]:
  """How many heads a ``heads`` or ``kv_heads`` dimension of a parameter holds (a ``ModelConfig``'s
  N and K): it splits only where the mesh axis divides them."""
  return {"heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads}


def spec_for(
  axes: tuple[str, ...],
  shape: tuple[int, ...],
  mesh: Mesh | Mapping[str, int],
  units: Mapping[str, int] | None = None,
) -> PartitionSpec:
  """The ``PartitionSpec`` of an array with these logical axes on a mesh (or just its axis
  sizes); a dimension its mesh axis does not divide (or a mesh axis of size 1) stays whole.
  ``units`` gives, per logical axis, the indivisible pieces a dimension is made of (heads of
  ``head_units``); by default every element is one."""
  assert len(axes) == len(shape), (axes, shape)
  sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
  units = units or {}
  out = []
  for axis, size in zip(axes, shape):
    mesh_axis = RULES.get(axis)
    degree = sizes[mesh_axis] if mesh_axis is not None else 1
    split = degree > 1 and size % degree == 0 and units.get(axis, size) % degree == 0
    out.append(mesh_axis if split else None)
  return PartitionSpec(*out)


def ways(spec: PartitionSpec, mesh: Mesh | Mapping[str, int]) -> int:
  """Into how many pieces ``spec`` cuts an array: its bytes per device are nbytes / ways."""
  sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
  return math.prod(sizes[a] for a in spec if a is not None)


def sharding_for(
  axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, units: Mapping[str, int] | None = None
) -> NamedSharding:
  return NamedSharding(mesh, spec_for(axes, shape, mesh, units))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def param_shardings(params, mesh: Mesh, units: Mapping[str, int], *, stacked: bool = False):
  """A tree of ``NamedSharding`` matching ``params`` (stacked: a leading ``stage`` dimension);
  ``units``: the model's ``head_units``."""
  lead = ("stage",) if stacked else ()
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: sharding_for(lead + param_axes(path), leaf.shape, mesh, units), params
  )


def pool_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """One pool array: [Pn, K, G, H], or [S, Pn, K, G, H] stacked per stage."""
  lead = ("stage",) * (len(shape) - len(POOL_AXES))
  return sharding_for(lead + POOL_AXES, shape, mesh)
