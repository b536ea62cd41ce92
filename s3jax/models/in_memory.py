"""A ``GPT``'s parameters taken straight from memory (a training loop), with no checkpoint written.

A JAX training loop holds its model in one of three forms: the ``GPT`` nnx module itself (what
``nnx.Optimizer`` updates in place), its ``nnx.State`` (``nnx.state(model)`` or the second half of
``nnx.split(model)``, what a functional ``jit``-and-optax loop updates), or that state's
pure-dict form (``nnx.to_pure_dict(state)``, e.g. as restored by Orbax, where list indices may have
become strings). ``copy_gpt_params`` takes any of them.

The parameters are copied, never aliased: ``nnx.state(model)`` shares its ``Variable``s with the
module, so an optimizer step would change what is served mid-answer, and a train step jitted with
``donate_argnums`` deletes the buffers it was given. Serving from a copy keeps the values given at
construction whatever the loop does next (at the cost of one more copy of the weights in memory).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.models.config import ModelConfig
from s3jax.models.gpt import GPT

SERVABLE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MOST_PATHS_LISTED = 8  # an unrelated tree (an optimizer state) would otherwise list hundreds


def _path_name(path) -> str:
  return ".".join(str(k) for k in path)


def _key_name(key) -> str:
  """One step of a pytree path as a string: dict keys, list indices and attribute names alike
  (``blocks.0`` whether the 0 came from an ``nnx.List``, a pure dict or an Orbax restore)."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_arrays(params) -> dict[tuple[str, ...], object]:
  """``{path: array}`` of a ``GPT`` module, an ``nnx.State`` or a nested dict of arrays."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  elif not isinstance(params, (nnx.State, Mapping)):
    hint = " (nnx.split returns (graphdef, state): pass the state)" if isinstance(params, tuple) else ""
    raise ValueError(
      f"params must be a GPT module, an nnx.State or a nested dict of arrays; got {type(params).__name__}{hint}"
    )
  is_variable = lambda x: isinstance(x, nnx.Variable)
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
  flat = {}
  for path, leaf in leaves:
    flat[tuple(_key_name(k) for k in path)] = leaf.get_value() if is_variable(leaf) else leaf
  return flat


def _mismatch_report(kind: str, items: list[str]) -> str:
  shown = ", ".join(items[:_MOST_PATHS_LISTED])
  more = len(items) - _MOST_PATHS_LISTED
  return f"{kind} {shown}" + (f" and {more} more" if more > 0 else "")


def _served_dtype(arrays, dtype) -> jnp.dtype:
  """``dtype`` when given, else the parameters' own (one of ``SERVABLE_DTYPES``)."""
  if dtype is not None:
    dtype = jnp.dtype(dtype)
    if dtype not in SERVABLE_DTYPES:
      raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return dtype
  found = sorted({str(jnp.dtype(a.dtype)) for a in arrays})
  if len(found) != 1 or jnp.dtype(found[0]) not in SERVABLE_DTYPES:
    raise ValueError(
      f"the parameters are {'/'.join(found)}: pass dtype='float32' or dtype='bfloat16' to serve them in one dtype"
    )
  return jnp.dtype(found[0])


def copy_gpt_params(cfg: ModelConfig, params, dtype=None):
  """Checks ``params`` against ``GPT(cfg)``'s parameters and copies them: ``(graphdef, state)``.

  Args:
    cfg: the config the parameters were built for (``model.cfg`` of a ``GPT`` module).
    params: a ``GPT`` module, an ``nnx.State`` of one, or its pure-dict form (arrays, NumPy or
      JAX, as leaves).
    dtype: the dtype to serve in (float32 or bfloat16); None keeps the parameters' own.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped parameter path (and the fix), or a
      leaf that is not a floating-point array.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  expected = {tuple(map(str, path)): leaf for path, leaf in nnx.to_flat_state(abstract)}
  given = _flat_arrays(params)
  by_depth = lambda paths: sorted(paths, key=lambda p: (len(p), p))  # wte's shape, first, tells the most
  missing = [_path_name(p) for p in by_depth(expected) if p not in given]
  unexpected = [_path_name(p) for p in by_depth(given) if p not in expected]
  misshaped, not_arrays = [], []
  for path in by_depth(given):
    value = given[path]
    if path not in expected:
      continue
    if not isinstance(value, (np.ndarray, jax.Array)) or not jnp.issubdtype(value.dtype, jnp.floating):
      kind = f"{value.dtype} array" if hasattr(value, "dtype") else type(value).__name__
      not_arrays.append(f"{_path_name(path)} ({kind})")
    elif value.shape != expected[path].get_value().shape:
      misshaped.append(f"{_path_name(path)} (got {value.shape}, need {expected[path].get_value().shape})")
  if missing or unexpected or misshaped:
    problems = [
      _mismatch_report(kind, items)
      for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
      if items
    ]
    raise ValueError(
      f"the parameters do not fit config {cfg.name!r} ({cfg.family.value}, {cfg.n_layers} layers, "
      f"width {cfg.d_model}, vocabulary {cfg.vocab_size}): {'; '.join(problems)}. Pass the config "
      "the parameters were built with (model.cfg of the s3jax.models.gpt.GPT module) and the "
      "module's parameters: the module, nnx.state(module) or nnx.to_pure_dict(nnx.state(module))"
    )
  if not_arrays:
    raise ValueError(f"parameters must be floating-point arrays: {_mismatch_report('got', not_arrays)}")
  dtype = _served_dtype(given.values(), dtype)
  # copy=True: a new buffer even when the dtype already matches (jnp.asarray would alias it).
  copies = {path: jnp.array(given[path], dtype=dtype, copy=True) for path in expected}
  state = nnx.from_flat_state(
    [(path, leaf.replace(copies[tuple(map(str, path))])) for path, leaf in nnx.to_flat_state(abstract)]
  )
  return graphdef, state
