"""Length classifier: MiniLM encoder, mean pooling, per-generator bucket head.

Shape legend: B batch, T tokens, D model width, E head width, G generator
heads (index 0 is `ANY_GENERATOR`), N buckets.

One model serves every generator: most of an answer's length is a property
of the prompt, shared across generators (on the AlpacaEval answers of 15 models, the
generators agree on which prompts get long answers), so the encoder and a
shared head learn from all generators' labels at once, and a small
per-generator term adapts the distribution. Head 0 (`ANY_GENERATOR`) is
trained on every generator's labels: it predicts the length distribution of
"a typical model" and is what a newly served model with no observed lengths
uses from day one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from s3jax.predictor.encoder import Encoder, EncoderConfig, backbone_dir, load_pretrained_into, mean_pool

ANY_GENERATOR = "<any>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture of the length classifier (saved with its checkpoint).

  Attributes:
    generators: names of the per-generator heads; index 0 must be
      `ANY_GENERATOR`.
    num_buckets: N, from the bucket scheme.
    trainable_layers: how many top encoder layers training updates; lower
      layers stay at the pretrained weights (and are not stored).
    max_tokens: prompt word pieces kept (see tokenizer.py for truncation).
    head_width: E.
  """

  generators: tuple[str, ...]
  num_buckets: int = 10
  trainable_layers: int = 3
  max_tokens: int = 128
  head_width: int = 256

  def __post_init__(self):
    object.__setattr__(self, "generators", tuple(self.generators))
    if not self.generators or self.generators[0] != ANY_GENERATOR:
      raise ValueError(f"generators[0] must be {ANY_GENERATOR!r}")

  @property
  def first_trained_layer(self) -> int:
    return EncoderConfig().num_layers - self.trainable_layers

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["generators"] = list(self.generators)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    return cls(**{**d, "generators": tuple(d["generators"])})


class BucketHead(nnx.Module):
  """Shared MLP plus per-generator logit offsets: [B, D] -> [B, G, N]."""

  def __init__(self, d: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    g, e, n = len(cfg.generators), cfg.head_width, cfg.num_buckets
    self.hidden = nnx.Linear(d, e, rngs=rngs)
    self.shared = nnx.Linear(e, n, rngs=rngs)
    # Zero-initialised: every generator starts from the shared prediction.
    self.gen_kernel = nnx.Param(jnp.zeros((g, e, n)))  # [G, E, N]
    self.gen_bias = nnx.Param(jnp.zeros((g, n)))  # [G, N]

  def __call__(self, pooled, dropout_key=None, dropout_rate: float = 0.0):
    if dropout_key is not None and dropout_rate > 0:
      # Explicit key instead of nnx.Dropout: the jitted step stays a pure
      # function of its inputs, with no RNG state to thread through.
      keep = jax.random.bernoulli(dropout_key, 1 - dropout_rate, pooled.shape)
      pooled = jnp.where(keep, pooled / (1 - dropout_rate), 0.0)
    h = jax.nn.gelu(self.hidden(pooled))  # [B, E]
    per_gen = jnp.einsum("be,gen->bgn", h, self.gen_kernel[...])
    return self.shared(h)[:, None, :] + per_gen + self.gen_bias[...][None]


class LengthModel(nnx.Module):
  """Encoder + mean pooling + `BucketHead`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    enc_cfg = EncoderConfig.from_hf(backbone_dir() / "config.json")
    self.cfg = cfg
    self.encoder = Encoder(enc_cfg, rngs=rngs)
    self.head = BucketHead(enc_cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, ids, mask, *, hidden=None, dropout_key=None,
               dropout_rate: float = 0.0):
    """Bucket logits for every generator head.

    Args:
      ids: [B, T] token ids.
      mask: [B, T] 1 for real tokens.
      hidden: optional [B, T, D] cached output of the frozen layers; then only
        the trained layers run (training uses this).
      dropout_key: PRNG key for dropout on the pooled embedding (training);
        None means deterministic.
      dropout_rate: that dropout's rate.

    Returns:
      [B, G, N] logits.
    """
    start = 0 if hidden is None else self.cfg.first_trained_layer
    x = self.encoder(ids, mask, start_layer=start, hidden=hidden)
    return self.head(mean_pool(x, mask), dropout_key, dropout_rate)


def is_trainable(cfg: ModelConfig):
  """nnx filter: the head and the top `trainable_layers` encoder layers."""
  first = cfg.first_trained_layer

  def pred(path, x) -> bool:
    if not isinstance(x, nnx.Param):
      return False
    if path[0] == "head":
      return True
    return (len(path) > 2 and path[:2] == ("encoder", "layer")
            and int(path[2]) >= first)
  return pred


def build_model(cfg: ModelConfig, *, seed: int = 0,
                pretrained: bool = True) -> LengthModel:
  """A fresh classifier with the packaged pretrained encoder weights."""
  model = LengthModel(cfg, rngs=nnx.Rngs(seed))
  if pretrained:
    load_pretrained_into(model.encoder)
  return model
