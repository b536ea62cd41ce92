"""One Flax decoder for GPT-2, GPT-J, GPT-NeoX and the Llama family (Llama, Mistral, Qwen2).

Shape legend: B batch/rows, T tokens of this call, S attended tokens, L layers,
N query heads, K kv heads, R query heads per kv head (N = K R), H head dim,
D model width, F MLP width, V vocab.

The families differ in options of one block, not in classes: LayerNorm or RMSNorm, a GELU MLP
or SwiGLU (gate/up/down), learned positions or RoPE (interleaved pairs for GPT-J, halves for
NeoX and Llama), parallel or sequential residuals, which projections have biases. Grouped-query
attention (K < N) keeps K heads of keys and values; query head ``k R + r`` reads kv head ``k``
(Hugging Face's ``repeat_kv``), and the KV pool holds K heads only.

Why Flax NNX: parameters live on plain Python objects whose attribute paths
mirror the Hugging Face checkpoint layout, so checkpoint import is a table
(see ``checkpoint.py``). At the jit boundary we never pass the module: the
runner splits it once into ``(graphdef, params)`` and jits pure functions that
``nnx.merge`` inside (measured 4-5x faster per decode step than ``nnx.jit``
with the module as an argument on this toolchain).

Three entry points, all pure in (params, inputs):
  * ``prefill_packed``: several prompts packed into one row without a cache;
    returns the logits at each prompt's last token and every token's
    keys/values; ``prefill_paged`` writes them into the pool's pages and attends
    to a sequence's earlier tokens there too (chunked prefill).
  * ``decode_paged``: one token per row against the paged KV pool, each row
    at its own position; writes that token's keys/values in place.
  * ``forward_full``: all-position logits without a cache, the reference.
"""

from __future__ import annotations

import itertools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.models import kv_cache
from s3jax.models.config import Family, ModelConfig


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class LayerNorm(nnx.Module):
  def __init__(self, d: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((d,), dtype))
    self.bias = nnx.Param(jnp.zeros((d,), dtype))
    self.eps = eps

  def __call__(self, x):  # [..., D]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Llama's norm: ``x / rms(x) * scale``, no centring and no bias."""

  def __init__(self, d: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((d,), dtype))
    self.eps = eps

  def __call__(self, x):  # [..., D]
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def _norm(cfg: ModelConfig, dtype):
  norm = RMSNorm if cfg.family is Family.LLAMA else LayerNorm
  return norm(cfg.d_model, cfg.layer_norm_eps, dtype)


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` with kernel stored as [in, out]."""

  def __init__(self, d_in: int, d_out: int, use_bias: bool, dtype, rngs: nnx.Rngs):
    self.kernel = _normal(rngs, (d_in, d_out), dtype)
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if use_bias else None

  def __call__(self, x):
    y = x @ self.kernel[...]
    return y if self.bias is None else y + self.bias[...]


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """[R/2] fp32 RoPE inverse frequencies, ``base^(-2i/R)``, Llama 3-scaled when configured
  (a constant of the compiled step, computed once on the host)."""
  r = cfg.rotary_dim
  inv_freq = 1.0 / (np.float32(cfg.rotary_base) ** (np.arange(0, r, 2, dtype=np.float32) / np.float32(r)))
  if cfg.rope_scaling is not None:
    inv_freq = cfg.rope_scaling.scale(inv_freq)
  return inv_freq.astype(np.float32)


def _rotate(x, positions, cfg: ModelConfig):
  """Applies RoPE to the first ``cfg.rotary_dim`` dims of each head.

  Args:
    x: [B, T, N, H] queries (or [B, T, K, H] keys).
    positions: [B, T] absolute positions.
  """
  rotary_dim = cfg.rotary_dim
  if rotary_dim == 0:
    return x
  angles = positions[..., None].astype(jnp.float32) * inv_frequencies(cfg)  # [B, T, R/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  if cfg.rotary_interleaved:  # GPT-J: pairs (0,1), (2,3), ...
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
  else:  # NeoX and Llama (Hugging Face layout): halves (0, R/2), (1, R/2 + 1), ...
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    self.q = Dense(d, d, cfg.attn_bias, dtype, rngs)
    self.k = Dense(d, kv, cfg.attn_bias, dtype, rngs)
    self.v = Dense(d, kv, cfg.attn_bias, dtype, rngs)
    self.out = Dense(d, d, cfg.out_bias, dtype, rngs)
    self.cfg = cfg

  def project(self, x, positions):
    """x [B, T, D] -> q [B, N, T, H] and k, v [B, K, T, H], rotary applied."""
    b, t, _ = x.shape
    n, k, h = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
    q = _rotate(self.q(x).reshape(b, t, n, h), positions, self.cfg)
    k_ = _rotate(self.k(x).reshape(b, t, k, h), positions, self.cfg)
    v = self.v(x).reshape(b, t, k, h)
    return (a.transpose(0, 2, 1, 3) for a in (q, k_, v))

  def attend(self, q, k, v, mask):
    """q [B, N, T, H], k/v [B, K, S, H], mask [B, T, S] -> [B, T, D]."""
    b, n, t, h = q.shape
    kv = k.shape[1]
    q = q.reshape(b, kv, n // kv, t, h)  # query head k R + r reads kv head k
    scores = jnp.einsum("bkrth,bksh->bkrts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (self.cfg.head_dim**-0.5)
    scores = jnp.where(mask[:, None, None], scores, kv_cache.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("bkrts,bksh->btkrh", probs, v)
    return self.out(ctx.reshape(b, t, self.cfg.d_model))


_TANH_GELU = lambda x: jax.nn.gelu(x, approximate=True)
_ACTIVATIONS = {
  "gelu_new": _TANH_GELU,
  "gelu_fast": _TANH_GELU,
  "gelu_pytorch_tanh": _TANH_GELU,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "silu": jax.nn.silu,
}


class MLP(nnx.Module):
  """``fc_out(act(fc_in(x)))``, or with a gate (SwiGLU, the Llama family's gate/up/down):
  ``fc_out(silu(gate(x)) * fc_in(x))``."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    if cfg.activation not in _ACTIVATIONS:
      raise ValueError(f"unsupported activation {cfg.activation!r}; supported: {', '.join(_ACTIVATIONS)}")
    self.gate = Dense(cfg.d_model, cfg.d_ff, cfg.mlp_bias, dtype, rngs) if cfg.gated_mlp else None
    self.fc_in = Dense(cfg.d_model, cfg.d_ff, cfg.mlp_bias, dtype, rngs)
    self.fc_out = Dense(cfg.d_ff, cfg.d_model, cfg.mlp_bias, dtype, rngs)
    self.activation = cfg.activation

  def __call__(self, x):
    act = _ACTIVATIONS[self.activation]
    if self.gate is None:
      return self.fc_out(act(self.fc_in(x)))
    return self.fc_out(act(self.gate(x)) * self.fc_in(x))


class Block(nnx.Module):
  """One decoder block; the residual wiring depends on the family."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    self.ln_1 = _norm(cfg, dtype)
    self.ln_2 = None if cfg.shared_layer_norm else _norm(cfg, dtype)
    self.attn = Attention(cfg, dtype, rngs)
    self.mlp = MLP(cfg, dtype, rngs)
    self.parallel = cfg.parallel_residual

  def __call__(self, x, positions, attend_fn):
    """x [B, T, D]; ``attend_fn(q, k, v) -> [B, T, D]`` owns the cache."""
    h = self.ln_1(x)
    attn_out = attend_fn(*self.attn.project(h, positions))
    if self.parallel:
      mlp_in = h if self.ln_2 is None else self.ln_2(x)
      return x + attn_out + self.mlp(mlp_in)
    x = x + attn_out
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """Decoder-only transformer; parameters only, the math is in the functions below."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = _normal(rngs, (cfg.vocab_size, cfg.d_model), dtype)
    self.wpe = _normal(rngs, (cfg.max_seq_len, cfg.d_model), dtype, std=0.01) if cfg.rotary_dim == 0 else None
    self.blocks = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.n_layers)])
    self.ln_f = _norm(cfg, dtype)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Dense(cfg.d_model, cfg.vocab_size, cfg.family is Family.GPTJ, dtype, rngs)

  def embed(self, tokens, positions):  # [B, T] -> [B, T, D]
    x = self.wte[...][tokens]
    if self.wpe is not None:
      x = x + self.wpe[...][positions]
    return x

  def logits(self, x):  # [B, ..., D] -> [B, ..., V] in fp32
    x = self.ln_f(x)
    if self.lm_head is None:
      out = jnp.einsum("...d,vd->...v", x, self.wte[...], preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(x)
    return out.astype(jnp.float32)


def packed_visibility(segments, positions):
  """[T, S=T] which packed tokens each token attends to: its own prompt, up to itself."""
  return (segments[:, None] == segments[None, :]) & (positions[None, :] <= positions[:, None])


@flax.struct.dataclass
class PrefillContext:
  """KV already in the pool that a pack's tokens attend to before the pack's own tokens: the earlier
  tokens of the one sequence the pack continues (the chunks of a long prompt prefilled in earlier
  iterations).

  Attributes:
    pages: [M'] int32, that sequence's pages in logical order, padded with Pn to whole chunks.
    lens: [T] int32, per packed token, how many of the sequence's first tokens it sees (0: none).
    num_chunks: int32 scalar, chunks of ``chunk`` pages that hold them (0: no context).
    chunk: pages read at once (static).
  """

  pages: jax.Array
  lens: jax.Array
  num_chunks: jax.Array
  chunk: int = flax.struct.field(pytree_node=False, default=8)


def attend_in_context(attn: Attention, q, k, v, visible, context: PrefillContext | None, keys, values):
  """``Attention.attend`` of a packed row whose tokens also see ``context``'s tokens in one layer of
  the pool (``keys``, ``values``: [Pn, K, G, H]): one softmax over both, accumulated chunk by chunk
  of context pages (flash-attention's running max and sum), so the work follows the context's
  length, not the model's.

  Args:
    q: [1, N, T, H]; k, v: [1, K, T, H] the pack's own; visible: [T, T].

  Returns:
    [1, T, D].
  """
  _, n, t, h = q.shape
  kv = k.shape[1]
  q = q[0].reshape(kv, n // kv, t, h) * (h**-0.5)  # [K, R, T, H]
  scores = jnp.einsum("krth,ksh->krts", q, k[0], preferred_element_type=jnp.float32)
  scores = jnp.where(visible, scores, kv_cache.MASK_VALUE)
  top = scores.max(-1)  # [K, R, T]; every token sees itself
  weights = jnp.exp(scores - top[..., None])
  total = weights.sum(-1)
  out = jnp.einsum("krts,ksh->krth", weights.astype(v.dtype), v[0], preferred_element_type=jnp.float32)

  def chunk(c, carry):
    top, total, out = carry
    pages = jax.lax.dynamic_slice_in_dim(context.pages, c * context.chunk, context.chunk)
    take = lambda layer: jnp.take(layer, pages, axis=0, mode="clip").transpose(1, 0, 2, 3).reshape(kv, -1, h)
    ctx_keys, ctx_values = take(keys), take(values)  # [K, C G, H]
    g = keys.shape[2]
    token = c * context.chunk * g + jnp.arange(context.chunk * g, dtype=jnp.int32)
    seen = token[None, :] < context.lens[:, None]  # [T, C G]
    part = jnp.einsum("krth,ksh->krts", q, ctx_keys, preferred_element_type=jnp.float32)
    part = jnp.where(seen, part, kv_cache.MASK_VALUE)
    new_top = jnp.maximum(top, part.max(-1))
    weights = jnp.where(seen, jnp.exp(part - new_top[..., None]), 0.0)
    scale = jnp.exp(top - new_top)
    out = out * scale[..., None] + jnp.einsum(
      "krts,ksh->krth", weights.astype(values.dtype), ctx_values, preferred_element_type=jnp.float32
    )
    return new_top, total * scale + weights.sum(-1), out

  if context is not None:
    top, total, out = jax.lax.fori_loop(0, context.num_chunks, chunk, (top, total, out))
  ctx = (out / total[..., None]).astype(v.dtype)  # [K, R, T, H]
  return attn.out(ctx.transpose(2, 0, 1, 3).reshape(1, t, n * h))


def prefill_layer(block: Block, x, positions, visible, context: PrefillContext | None = None, pool_layer=None):
  """One block over a packed row: x [1, T, D], positions [1, T], visible [T, S=T].

  Without ``pool_layer``, returns x and the block's keys and values, each [T, K, H]. With it,
  ``(keys, values, pages, offsets)``: one layer of the pool [Pn, K, G, H] and where each packed
  token goes ([T] page, token in page; page Pn drops it), the block writes its keys and values
  there first (in place, the pool donated) and its tokens then attend to ``context``'s tokens in
  the written layer too; returns x and the layer's keys and values. Writing before reading keeps
  XLA from copying the layer to read it before the write.
  """
  kv = []

  def attend(q, k, v):  # [1, N, T, H]
    rows = (k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2))  # [T, K, H]
    if pool_layer is None:
      kv.extend(rows)
      return block.attn.attend(q, k, v, visible[None])
    keys, values, pages, offsets = pool_layer
    kv.extend(kv_cache.write(layer, r, pages, offsets) for layer, r in zip((keys, values), rows))
    return attend_in_context(block.attn, q, k, v, visible, context, kv[0], kv[1])

  x = block(x, positions, attend)
  return x, kv[0], kv[1]


def prefill_packed(model: GPT, tokens, segments, positions, last):
  """Runs several prompts packed into one row, each attending only to itself.

  Packing prompts of any lengths into one flat row of T tokens keeps the prefill shapes to one
  per T, whatever the number and lengths of the prompts.

  Args:
    tokens: [T] int32, prompt after prompt, padding at the end.
    segments: [T] int32, which prompt each token belongs to (padding has its own).
    positions: [T] int32, each token's position in its own prompt.
    last: [Q] int32, the flat index of each prompt's last token.

  Returns:
    logits [Q, V] fp32 at ``last``, and keys, values: one [T, K, H] array per layer.
  """
  hidden, keys, values = prefill_hidden(model, tokens, segments, positions)
  return model.logits(hidden[last]), keys, values


def prefill_hidden(model: GPT, tokens, segments, positions):
  """``prefill_packed`` before the logits: the residual stream [T, D] after the last block at every
  packed token, and keys, values: one [T, K, H] array per layer."""
  visible = packed_visibility(segments, positions)
  keys, values = [], []
  x = model.embed(tokens[None], positions[None])
  for block in model.blocks:
    x, k, v = prefill_layer(block, x, positions[None], visible)
    keys.append(k)
    values.append(v)
  return x[0], tuple(keys), tuple(values)


def prefill_paged(model: GPT, pool: kv_cache.PagePool, tokens, segments, positions, pages, context: PrefillContext):
  """A packed prefill against the pool: each layer writes its keys and values to ``pages`` [T]
  (positions continue each sequence's; page Pn drops a token), and the tokens attend to
  ``context``'s tokens already there as well as to their own prompt's.

  Returns:
    the residual stream [T, D] after the last block at every packed token (the runner reads the
    logits at each prompt's last token from it and, when asked, every prompt token's
    log-probability) and the updated pool.
  """
  visible = packed_visibility(segments, positions)
  offsets = positions % pool.page_size
  keys, values = list(pool.keys), list(pool.values)
  x = model.embed(tokens[None], positions[None])
  for layer, block in enumerate(model.blocks):
    x, keys[layer], values[layer] = prefill_layer(
      block, x, positions[None], visible, context, (keys[layer], values[layer], pages, offsets)
    )
  return x[0], kv_cache.PagePool(keys=tuple(keys), values=tuple(values))


@flax.struct.dataclass
class PagedRows:
  """Where B decode rows read and write in the pool; the same for every layer.

  Attributes:
    positions: [B] int32, each row's position (the token written there and attending).
    pages, offsets: [B] int32, the page and token-in-page the row writes (page Pn: nothing).
    page_table: [B, M] int32.
    readers: which rows read each page (``kv_cache.page_readers``).
  """

  positions: jax.Array
  pages: jax.Array
  offsets: jax.Array
  page_table: jax.Array
  readers: kv_cache.PageReaders

  @classmethod
  def create(cls, positions, page_table, num_pages: int, page_size: int) -> "PagedRows":
    pages = jnp.take_along_axis(
      page_table, (positions // page_size)[:, None], axis=1, mode="fill", fill_value=num_pages
    )[:, 0]
    return cls(
      positions=positions,
      pages=pages,
      offsets=positions % page_size,
      page_table=page_table,
      readers=kv_cache.page_readers(page_table, num_pages),
    )


def decode_layer(block: Block, x, rows: PagedRows, keys, values, num_chunks, chunk: int):
  """One block for one token per row: x [B, 1, D] against one layer of the pool [Pn, K, G, H].

  Writes each row's key and value in place (jit with the pool donated) and returns x and the
  layer's keys and values.
  """
  kv = []

  def attend(q, k, v):  # [B, N, 1, H]
    kv.extend(
      (
        kv_cache.write(keys, k[:, :, 0], rows.pages, rows.offsets),
        kv_cache.write(values, v[:, :, 0], rows.pages, rows.offsets),
      )
    )
    out = kv_cache.paged_attention(
      q[:, :, 0] * block.attn.cfg.head_dim**-0.5,
      kv[0],
      kv[1],
      rows.page_table,
      rows.positions,
      rows.readers,
      num_chunks,
      chunk,
    )
    b, n, h = out.shape
    return block.attn.out(out.astype(q.dtype).reshape(b, 1, n * h))

  x = block(x, rows.positions[:, None], attend)
  return x, kv[0], kv[1]


def decode_paged(model: GPT, pool: kv_cache.PagePool, tokens, positions, page_table, num_chunks, chunk: int):
  """Advances every row by one token against the paged pool.

  Args:
    pool: the KV pool; row b holds positions < positions[b] in the pages ``page_table[b]`` names.
    tokens: [B] int32, each row's last token, written at ``positions``.
    positions: [B] int32; a row whose page for this position is "no page" (idle rows) writes
      nothing.
    page_table: [B, M] int32.
    num_chunks: int32 scalar: attention scans pages ``0 .. num_chunks * chunk - 1`` (every page a
      row uses is among them).
    chunk: pages per attention chunk (static).

  Returns:
    logits [B, V] fp32 and the updated pool.
  """
  rows = PagedRows.create(positions, page_table, pool.num_pages, pool.page_size)
  keys, values = list(pool.keys), list(pool.values)
  x = model.embed(tokens[:, None], positions[:, None])
  for layer, block in enumerate(model.blocks):
    x, keys[layer], values[layer] = decode_layer(block, x, rows, keys[layer], values[layer], num_chunks, chunk)
  return model.logits(x[:, 0]), kv_cache.PagePool(keys=tuple(keys), values=tuple(values))


def _residual_stream(model: GPT, tokens, num_blocks: int):
  """Yields [B, T, D] the residual stream after the embedding and after each of the first
  ``num_blocks`` blocks, causal, without a cache."""
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
  x = model.embed(tokens, positions)
  yield x
  for block in itertools.islice(model.blocks, num_blocks):
    x = block(x, positions, lambda q, k, v, blk=block: blk.attn.attend(q, k, v, causal))
    yield x


def forward_hidden(model: GPT, tokens):
  """[L + 1, B, T, D] the residual stream after the embedding and after each block, without a
  cache (what a length head on the model's own hidden states reads)."""
  return jnp.stack(list(_residual_stream(model, tokens, len(model.blocks))))


def hidden_at(model: GPT, tokens, last, num_blocks: int):
  """[B, D] the residual stream after block ``num_blocks`` (0: the embedding) at position
  ``last[b]`` of each row of ``tokens`` [B, T]; only those blocks run. Causal: padding after
  ``last`` changes nothing. ``last`` [B, K] gives [B, K, D], K positions of each row."""
  *_, x = _residual_stream(model, tokens, num_blocks)
  rows = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (jnp.ndim(last) - 1))
  return x[rows, last]


def hidden_mean_at(model: GPT, tokens, first, last, num_blocks: int):
  """[B, K, D] the residual stream after block ``num_blocks``, averaged over positions ``first[b]``
  to ``last[b, k]`` (both included) of each row of ``tokens`` [B, T]: a running request's state
  over the tokens it generated so far, not at one position only."""
  *_, x = _residual_stream(model, tokens, num_blocks)
  total = jnp.cumsum(x.astype(jnp.float32), axis=1)  # [B, T, D]
  rows = jnp.arange(x.shape[0])[:, None]
  before = jnp.where((first > 0)[:, None], total[jnp.arange(x.shape[0]), jnp.maximum(first - 1, 0)], 0.0)
  count = (last - first[:, None] + 1).astype(jnp.float32)[..., None]
  return (total[rows, last] - before[:, None]) / count


def forward_full(model: GPT, tokens):
  """All-position logits [B, T, V] without a cache: the reference for tests."""
  return model.logits(forward_hidden(model, tokens)[-1])
