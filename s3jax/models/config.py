"""Model configuration: one frozen dataclass for the three GPT families.

Configs are read from a Hugging Face ``config.json`` (``from_hf_dict``) or from a
named file under ``configs/models/`` (``load_model_config``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

from s3jax.assets import CONFIG_DIR


class Family(enum.Enum):
  GPT2 = "gpt2"
  GPTJ = "gptj"
  GPT_NEOX = "gpt_neox"


SUPPORTED_MODEL_TYPES = tuple(f.value for f in Family)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
  """Shapes and wiring of a decoder-only GPT model.

  Attributes:
    family: which block wiring to use (GPT-2, GPT-J or GPT-NeoX).
    vocab_size: V, rows of the token embedding.
    max_seq_len: longest prompt + answer the model can attend over.
    d_model: D, residual stream width.
    n_layers: number of decoder blocks.
    n_heads: N, attention heads (all families here have K == N kv heads).
    d_ff: hidden width of the MLP.
    rotary_dim: number of head dims rotated by RoPE (0 = learned positions).
    parallel_residual: attention and MLP read the same input (GPT-J, NeoX).
    shared_layer_norm: one LayerNorm feeds both attention and MLP (GPT-J).
    tie_embeddings: LM head reuses the token embedding (GPT-2).
    rotary_interleaved: GPT-J rotates adjacent pairs; NeoX rotates halves.
    activation: MLP nonlinearity, "gelu_new" (tanh approx.) or "gelu" (exact).
    layer_norm_eps: epsilon of every LayerNorm.
    rotary_base: RoPE frequency base.
    attn_bias: q/k/v projections carry a bias (GPT-2, NeoX; not GPT-J).
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
  rotary_dim: int = 0
  parallel_residual: bool = False
  shared_layer_norm: bool = False
  tie_embeddings: bool = True
  rotary_interleaved: bool = False
  activation: str = "gelu_new"
  layer_norm_eps: float = 1e-5
  rotary_base: float = 10000.0
  attn_bias: bool = True
  eos_token_id: int = 50256
  name: str = "model"

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
      raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim={self.head_dim}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def n_kv_heads(self) -> int:
    return self.n_heads

  def kv_bytes_per_token(self, dtype_bytes: int) -> int:
    """Bytes of keys + values one cached token takes across all layers."""
    return self.n_layers * 2 * self.n_kv_heads * self.head_dim * dtype_bytes

  def num_params(self) -> int:
    d, f, v = self.d_model, self.d_ff, self.vocab_size
    per_layer = 4 * d * d + 2 * d * f
    head = 0 if self.tie_embeddings else d * v
    pos = self.max_seq_len * d if self.rotary_dim == 0 else 0
    return self.n_layers * per_layer + v * d + head + pos

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: dict, name: str = "model") -> "ModelConfig":
    """Builds a config from the fields of a Hugging Face ``config.json``."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    family = Family(model_type)
    eos = hf.get("eos_token_id")
    eos = 50256 if eos is None else (eos[0] if isinstance(eos, list) else eos)
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
