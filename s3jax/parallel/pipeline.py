"""Pipeline stages: the layers split into S contiguous groups, each on its own devices.

Shape legend (with ``s3jax.models.gpt``'s): S stages, J layers per stage (L = S J), U
micro-batches, b rows per micro-batch (B <= U b), Pn pages, K kv heads, G tokens per page, H head
dim, D model width, T prefill pack tokens.

Parameters are laid out by *slot*: slot j holds layer ``s J + j`` of every stage s, stacked on a
leading stage dimension that the mesh's ``stage`` axis splits, so device group s holds exactly
its J layers (``split_params``). The KV pool is laid out the same way (J arrays [S, Pn, K, G,
H]). A stage's work is one function of its own slice, vmapped over the stage dimension: under
``jit`` every device group runs its slice, and moving the activations one stage down is a
``jnp.roll`` over that dimension, which XLA turns into one collective permute. This is the
SPMD pipeline MaxText uses; it keeps one executable per shape, as on one device.

The decode batch is cut into U micro-batches that follow each other through the stages. At tick
t stage s works on micro-batch t - s, so after the first S - 1 ticks every stage is busy (the
freed memory of S3's smaller reservations makes the batch, and so U, large enough to fill it)::

    tick      0    1    2    3    4
    stage 0  mb0  mb1  mb2  mb3   .
    stage 1   .   mb0  mb1  mb2  mb3      U = 4 micro-batches, S = 2 stages:
                                          5 ticks of J layers instead of 8 on one device group

A stage outside its micro-batch range (the dots: the fill and drain bubble, (S - 1) / (S + U -
1) of the ticks) computes on stale activations and writes nothing: its KV writes go to "no page".
A prefill pack is one micro-batch (its prompts attend within the pack), so it takes S ticks.
Each row's arithmetic is the same as on one device; only the order of partial sums inside
tensor-parallel matrix products differs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.models import gpt, kv_cache
from s3jax.models.config import ModelConfig
from s3jax.parallel.mesh import check_divisible


@dataclasses.dataclass(frozen=True)
class StageModel:
  """Graph definitions for a model split into stages: the embedding and head (``shell``, a GPT
  without blocks) and one block, whose parameters come per slot."""

  shell: nnx.GraphDef
  block: nnx.GraphDef
  stages: int
  layers_per_stage: int


def stage_model(cfg: ModelConfig, dtype, stages: int) -> StageModel:
  check_divisible("n_layers", cfg.n_layers, "stage", stages)
  shell = nnx.graphdef(nnx.eval_shape(lambda: gpt.GPT(cfg.replace(n_layers=0), dtype=dtype, rngs=nnx.Rngs(0))))
  block = nnx.graphdef(nnx.eval_shape(lambda: gpt.Block(cfg, dtype, nnx.Rngs(0))))
  return StageModel(shell=shell, block=block, stages=stages, layers_per_stage=cfg.n_layers // stages)


def split_params(params: nnx.State, model: StageModel) -> dict:
  """``{"shell": embedding and head, "slots": J block states, each leaf [S, ...]}`` on the host."""
  blocks = params["blocks"]
  s, j = model.stages, model.layers_per_stage
  slot = lambda i: jax.tree.map(
    lambda *xs: np.stack([np.asarray(x) for x in xs]), *[blocks[stage * j + i] for stage in range(s)]
  )
  shell = nnx.State({k: v for k, v in params.items() if k != "blocks"})
  return {"shell": shell, "slots": tuple(slot(i) for i in range(j))}


def _ticks(stages: int, microbatches: int):
  """Per tick: which micro-batch each stage works on (clipped) and whether it is a real one."""
  for t in range(stages + microbatches - 1):
    index = t - np.arange(stages)
    yield t, np.clip(index, 0, microbatches - 1), (index >= 0) & (index < microbatches)


def _stage_decode(model: StageModel, num_chunks, chunk: int):
  """One stage's J layers for one micro-batch: (slots, keys, values, x [b, 1, D], rows, valid)."""

  def fn(slots, keys, values, x, rows: gpt.PagedRows, valid):
    rows = rows.replace(pages=jnp.where(valid, rows.pages, keys[0].shape[0]))  # a bubble writes nothing
    keys, values = list(keys), list(values)
    for j in range(model.layers_per_stage):
      block = nnx.merge(model.block, slots[j])
      x, keys[j], values[j] = gpt.decode_layer(block, x, rows, keys[j], values[j], num_chunks, chunk)
    return x, tuple(keys), tuple(values)

  return fn


def decode_pipelined(
  model: StageModel,
  params: dict,
  pool: kv_cache.PagePool,
  tokens,
  positions,
  page_table,
  num_chunks,
  chunk: int,
  microbatches: int,
):
  """``gpt.decode_paged`` over stages: logits [B, V] fp32 and the updated (stacked) pool."""
  b = tokens.shape[0]
  u = min(microbatches, b)
  per = -(-b // u)
  index = np.minimum(np.arange(u * per), b - 1).reshape(u, per)
  padding = np.arange(u * per).reshape(u, per) >= b
  pn, g = pool.num_pages, pool.page_size
  table = jnp.where(padding[..., None], pn, page_table[index])  # padding rows own no page
  rows = jax.vmap(lambda p, t: gpt.PagedRows.create(p, t, pn, g))(positions[index], table)  # [U, ...]
  shell = nnx.merge(model.shell, params["shell"])
  x_in = shell.embed(tokens[index], positions[index])[:, :, None]  # [U, b, 1, D]
  carry = jnp.zeros((model.stages,) + x_in.shape[1:], x_in.dtype)  # [S, b, 1, D] each stage's input
  keys, values = pool.keys, pool.values
  finished = []
  stage = jax.vmap(_stage_decode(model, num_chunks, chunk))
  for t, mb, valid in _ticks(model.stages, u):
    carry = carry.at[0].set(x_in[min(t, u - 1)])
    rows_t = jax.tree.map(lambda a, mb=mb: a[mb], rows)
    out, keys, values = stage(params["slots"], keys, values, carry, rows_t, valid)
    if t >= model.stages - 1:
      finished.append(out[-1])
    carry = jnp.roll(out, 1, axis=0)  # stage s + 1 takes what stage s made
  x = jnp.concatenate(finished).reshape(u * per, -1)[:b]
  return shell.logits(x), kv_cache.PagePool(keys=keys, values=values)


def prefill_pipelined(
  model: StageModel, params: dict, pool: kv_cache.PagePool, tokens, segments, positions, pages, context=None
):
  """``gpt.prefill_paged`` over stages, each stage writing its keys and values into its slots of
  the pool: the last block's output [T, D] at every packed token and the updated pool."""
  visible = gpt.packed_visibility(segments, positions)
  offsets = positions % pool.page_size
  pn = pool.num_pages

  def stage_fn(slots, keys, values, x, valid):
    where = jnp.where(valid, pages, pn)
    keys, values = list(keys), list(values)
    for j in range(model.layers_per_stage):
      block = nnx.merge(model.block, slots[j])
      x, keys[j], values[j] = gpt.prefill_layer(
        block, x, positions[None], visible, context, (keys[j], values[j], where, offsets)
      )
    return x, tuple(keys), tuple(values)

  shell = nnx.merge(model.shell, params["shell"])
  x0 = shell.embed(tokens[None], positions[None])  # [1, T, D]
  carry = jnp.zeros((model.stages,) + x0.shape, x0.dtype)
  keys, values = pool.keys, pool.values
  for t, _, valid in _ticks(model.stages, 1):
    if t == 0:
      carry = carry.at[0].set(x0)
    out, keys, values = jax.vmap(stage_fn)(params["slots"], keys, values, carry, valid)
    carry = jnp.roll(out, 1, axis=0)
  return out[-1][0], kv_cache.PagePool(keys=keys, values=values)
