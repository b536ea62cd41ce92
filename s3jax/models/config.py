"""Model configuration: one frozen dataclass for the GPT-2, GPT-J, GPT-NeoX and Llama families.

Configs are read from a Hugging Face ``config.json`` (``from_hf_dict``), from a named file under
``configs/models/`` (``load_model_config``), or from a GGUF file's metadata (``s3jax.models.gguf``).
The Llama family covers the models that are Llama-shaped with options: Llama 1-3
(``LlamaForCausalLM``, Llama 3's ``rope_type: llama3`` scaling), Mistral (grouped-query
attention, a sliding window) and Qwen2 (q/k/v biases).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path

import numpy as np

from s3jax.assets import CONFIG_DIR


class Family(enum.Enum):
  GPT2 = "gpt2"
  GPTJ = "gptj"
  GPT_NEOX = "gpt_neox"
  LLAMA = "llama"  # also Mistral and Qwen2: RMSNorm, SwiGLU, grouped-query attention, RoPE


# Hugging Face ``model_type`` -> family.
MODEL_TYPES = {
  "gpt2": Family.GPT2,
  "gptj": Family.GPTJ,
  "gpt_neox": Family.GPT_NEOX,
  "llama": Family.LLAMA,
  "mistral": Family.LLAMA,
  "qwen2": Family.LLAMA,
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Llama3RopeScaling:
  """Llama 3.1's RoPE frequency scaling (``rope_type: llama3``): wavelengths longer than the
  original context divided by ``factor``, shorter than ``original_max_len / high_freq_factor``
  kept, and the band between interpolated smoothly."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_len: int

  def scale(self, inv_freq: np.ndarray) -> np.ndarray:
    """The scaled inverse frequencies (``transformers``' ``_compute_llama3_parameters``)."""
    low_wavelen = self.original_max_len / self.low_freq_factor
    high_wavelen = self.original_max_len / self.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
    smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
    smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
  """Shapes and wiring of a decoder-only model.

  Attributes:
    family: which block wiring to use (GPT-2, GPT-J, GPT-NeoX or Llama).
    vocab_size: V, rows of the token embedding.
    max_seq_len: longest prompt + answer the model can attend over.
    d_model: D, residual stream width.
    n_layers: number of decoder blocks.
    n_heads: N, query heads.
    d_ff: hidden width of the MLP (of each of the gate and up projections for SwiGLU).
    kv_heads: K, key/value heads shared by N / K query heads each (grouped-query attention);
      None: K == N, multi-head attention (every GPT family).
    rotary_dim: number of head dims rotated by RoPE (0 = learned positions).
    parallel_residual: attention and MLP read the same input (GPT-J, NeoX).
    shared_layer_norm: one LayerNorm feeds both attention and MLP (GPT-J).
    tie_embeddings: LM head reuses the token embedding (GPT-2, small Llamas such as SmolLM2).
    rotary_interleaved: GPT-J rotates adjacent pairs; NeoX and Llama (Hugging Face layout) rotate
      halves.
    activation: MLP nonlinearity, "gelu_new" (tanh approx.), "gelu" (exact) or "silu" (Llama's
      gate).
    layer_norm_eps: epsilon of every LayerNorm (RMSNorm for Llama).
    rotary_base: RoPE frequency base (``rope_theta``).
    rope_scaling: Llama 3's frequency scaling, None for plain RoPE.
    attn_bias: q/k/v projections carry a bias (GPT-2, NeoX, Qwen2; not GPT-J or Llama).
    out_bias: the attention output projection carries a bias (GPT-2, NeoX; not GPT-J, Qwen2 or
      Llama unless ``attention_bias``).
    mlp_bias: the MLP's projections carry biases (the GPT families; Llama's ``mlp_bias``).
    eos_token_id: token that ends an answer.
    name: human-readable name, used by the server's /v1/models.
  """

  family: Family
  vocab_size: int
  max_seq_len: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  kv_heads: int | None = None
  rotary_dim: int = 0
  parallel_residual: bool = False
  shared_layer_norm: bool = False
  tie_embeddings: bool = True
  rotary_interleaved: bool = False
  activation: str = "gelu_new"
  layer_norm_eps: float = 1e-5
  rotary_base: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  attn_bias: bool = True
  out_bias: bool = True
  mlp_bias: bool = True
  eos_token_id: int = 50256
  name: str = "model"

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of the kv heads, {self.n_kv_heads}")
    if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
      raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim={self.head_dim}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_kv_heads(self) -> int:
    """K: key/value heads (N without grouped-query attention)."""
    return self.kv_heads or self.n_heads

  @property
  def gated_mlp(self) -> bool:
    """The Llama family's SwiGLU, ``down(silu(gate(x)) * up(x))``, instead of ``fc_out(act(fc_in(x)))``."""
    return self.family is Family.LLAMA

  def kv_bytes_per_token(self, dtype_bytes: int) -> int:
    """Bytes of keys + values one cached token takes across all layers."""
    return self.n_layers * 2 * self.n_kv_heads * self.head_dim * dtype_bytes

  def block_params(self) -> int:
    """Weights of the decoder blocks' matrices, which every token multiplies: q and the output
    projection D x D each, k and v D x K H each, the MLP 2 (or 3, gated) D x F."""
    d, kv = self.d_model, self.n_kv_heads * self.head_dim
    mlp = (3 if self.gated_mlp else 2) * d * self.d_ff
    return self.n_layers * (2 * d * d + 2 * d * kv + mlp)

  def num_params(self) -> int:
    """Weights of the matrices and embeddings; biases and norm scales (0.03% of SmolLM2, 0.1% of
    GPT-2) are left out."""
    d, v = self.d_model, self.vocab_size
    head = 0 if self.tie_embeddings else d * v
    pos = self.max_seq_len * d if self.rotary_dim == 0 else 0
    return self.block_params() + v * d + head + pos

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: dict, name: str = "model") -> "ModelConfig":
    """Builds a config from the fields of a Hugging Face ``config.json``."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]
    eos = hf.get("eos_token_id")
    eos = 50256 if eos is None else (eos[0] if isinstance(eos, list) else eos)
    if family is Family.LLAMA:
      return _llama_from_hf(hf, model_type, eos, name)
    if family is Family.GPT2:
      d = hf["n_embd"]
      return cls(
        family=family,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        activation=hf.get("activation_function", "gelu_new"),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True,
        eos_token_id=eos,
        name=name,
      )
    if family is Family.GPTJ:
      d = hf["n_embd"]
      return cls(
        family=family,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        rotary_dim=hf.get("rotary_dim") or d // hf["n_head"],
        parallel_residual=True,
        shared_layer_norm=True,
        tie_embeddings=False,
        rotary_interleaved=True,
        attn_bias=False,
        out_bias=False,
        activation=hf.get("activation_function", "gelu_new"),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        eos_token_id=eos,
        name=name,
      )
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}  # transformers 5 moved the rotary fields here
    rotary_pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    return cls(
      family=family,
      vocab_size=hf["vocab_size"],
      max_seq_len=hf["max_position_embeddings"],
      d_model=d,
      n_layers=hf["num_hidden_layers"],
      n_heads=n,
      d_ff=hf["intermediate_size"],
      rotary_dim=int((d // n) * rotary_pct),
      parallel_residual=hf.get("use_parallel_residual", True),
      tie_embeddings=hf.get("tie_word_embeddings", False),
      activation=hf.get("hidden_act", "gelu"),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
      rotary_base=rotary_base,
      attn_bias=hf.get("attention_bias", True),
      eos_token_id=eos,
      name=name,
    )


def _rope_fields(hf: dict) -> tuple[float, Llama3RopeScaling | None]:
  """``(rope_theta, scaling)`` from transformers 5's ``rope_parameters`` or the older top-level
  ``rope_theta`` / ``rope_scaling``."""
  rope = hf.get("rope_parameters") or {}
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = hf.get("rope_scaling") or rope
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default (none) and llama3")
  return theta, Llama3RopeScaling(
    factor=float(scaling["factor"]),
    low_freq_factor=float(scaling["low_freq_factor"]),
    high_freq_factor=float(scaling["high_freq_factor"]),
    original_max_len=int(scaling["original_max_position_embeddings"]),
  )


def _llama_from_hf(hf: dict, model_type: str, eos: int, name: str) -> ModelConfig:
  """A Llama, Mistral or Qwen2 ``config.json``: the same block, with options.

  A sliding window (Mistral's ``sliding_window``, Qwen2's with ``use_sliding_window``) shorter
  than the context caps ``max_seq_len`` at the window: within it, sliding attention sees every
  token, as the full attention served here does.
  """
  d, n = hf["hidden_size"], hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, d // n):
    raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // n} is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} for {model_type}; supported: silu")
  theta, scaling = _rope_fields(hf)
  max_len = hf["max_position_embeddings"]
  window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
  qwen2 = model_type == "qwen2"
  bias = hf.get("attention_bias", False)
  return ModelConfig(
    family=Family.LLAMA,
    vocab_size=hf["vocab_size"],
    max_seq_len=min(max_len, window or max_len),
    d_model=d,
    n_layers=hf["num_hidden_layers"],
    n_heads=n,
    kv_heads=hf.get("num_key_value_heads") or n,
    d_ff=hf["intermediate_size"],
    rotary_dim=d // n,
    tie_embeddings=hf.get("tie_word_embeddings", False),
    activation="silu",
    layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
    rotary_base=theta,
    rope_scaling=scaling,
    attn_bias=qwen2 or bias,  # Qwen2 always biases q, k and v, never the output
    out_bias=not qwen2 and bias,
    mlp_bias=hf.get("mlp_bias", False),
    eos_token_id=eos,
    name=name,
  )


def available_model_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
  """Loads a named config (``configs/models/<name>.json``) or a ``config.json`` path/dir."""
  path = Path(name_or_path)
  if path.is_dir():
    path = path / "config.json"
  elif not path.exists():
    path = CONFIG_DIR / f"{name_or_path}.json"
  if not path.exists():
    raise ValueError(
      f"unknown model {str(name_or_path)!r}: not a config file, not a checkpoint directory with "
      f"config.json, and not one of the named configs {available_model_configs()}"
    )
  with open(path) as f:
    hf = json.load(f)
  name = path.parent.name if path.name == "config.json" else path.stem
  return ModelConfig.from_hf_dict(hf, name=name)
