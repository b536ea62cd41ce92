"""Length model: MiniLM encoder, mean pooling, a log-normal length distribution per generator.

Shape legend: B batch, T tokens, D model width, E head width, G generator heads (index 0 is
`ANY_GENERATOR`).

An answer's length is mostly a property of the prompt that every generator shares: on AlpacaEval the
15 generators agree on which prompts get long answers (Kendall tau 0.5-0.7 between one model's
lengths and the others' mean), while their typical lengths differ by 10x. So the head predicts one
scalar per prompt, its *demand* `d` (in standard deviations of log length), and each generator g maps
it to its own scale: the log length is Normal with

    mean_g  = loc_g + slope_g * d + (small per-generator correction from the embedding)
    scale_g = exp(log_scale_g + per-generator correction)

A distribution, not a class: the scheduler's reservation is a quantile of it (at the overflow rate the
user asks for, calibrated on held-out prompts; see calibration.py), and the scale is per prompt, so a
prompt whose answers vary a lot gets a wider margin than one whose answers do not. Head 0
(`ANY_GENERATOR`) is trained on every generator's labels: the length of "some model's" answer, what a
served model with no observed lengths uses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.predictor.encoder import Encoder, EncoderConfig, backbone_dir, load_pretrained_into, mean_pool

ANY_GENERATOR = "<any>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthModelConfig:
  """Architecture of the length model (saved with its checkpoint).

  Attributes:
    generators: names of the per-generator heads; index 0 must be `ANY_GENERATOR`.
    trainable_layers: how many top encoder layers training updates (0: the encoder stays the
      pretrained MiniLM); lower layers are not stored in checkpoints.
    max_tokens: prompt word pieces kept (see tokenizer.py for truncation).
    head_width: E.
  """

  generators: tuple[str, ...]
  trainable_layers: int = 0
  max_tokens: int = 128
  head_width: int = 256

  def __post_init__(self):
    object.__setattr__(self, "generators", tuple(self.generators))
    if not self.generators or self.generators[0] != ANY_GENERATOR:
      raise ValueError(f"generators[0] must be {ANY_GENERATOR!r}")
    if not 0 <= self.trainable_layers <= EncoderConfig().num_layers:
      raise ValueError(f"trainable_layers must be in [0, {EncoderConfig().num_layers}]")

  @property
  def first_trained_layer(self) -> int:
    return EncoderConfig().num_layers - self.trainable_layers

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["generators"] = list(self.generators)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> LengthModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known} | {"generators": tuple(d["generators"])})


class LengthHead(nnx.Module):
  """Pooled embedding -> [B, G, 2]: mean and log scale of each generator's log length."""

  def __init__(self, d: int, cfg: LengthModelConfig, *, rngs: nnx.Rngs):
    g, e = len(cfg.generators), cfg.head_width
    self.hidden = nnx.Linear(d, e, rngs=rngs)
    self.demand = nnx.Linear(e, 1, rngs=rngs)
    # Per-generator affine map of the demand; `set_prior` starts them at the training data's moments.
    self.loc = nnx.Param(jnp.zeros((g,)))  # [G]
    self.slope = nnx.Param(jnp.ones((g,)))  # [G]
    self.log_scale = nnx.Param(jnp.zeros((g,)))  # [G]
    # Zero-initialised: every generator starts from the shared demand.
    self.gen_kernel = nnx.Param(jnp.zeros((g, e, 2)))  # [G, E, 2]

  def set_prior(self, loc: np.ndarray, scale: np.ndarray) -> None:
    """Starts generator g at Normal(loc[g], scale[g]) of log length; the demand then explains part."""
    self.loc[...] = jnp.asarray(loc, jnp.float32)
    self.slope[...] = jnp.asarray(scale, jnp.float32) * 0.5
    self.log_scale[...] = jnp.log(jnp.asarray(scale, jnp.float32))

  def __call__(self, pooled, dropout_key=None, dropout_rate: float = 0.0):
    if dropout_key is not None and dropout_rate > 0:
      # Explicit key instead of nnx.Dropout: the jitted step stays a pure function of its inputs.
      keep = jax.random.bernoulli(dropout_key, 1 - dropout_rate, pooled.shape)
      pooled = jnp.where(keep, pooled / (1 - dropout_rate), 0.0)
    h = jax.nn.gelu(self.hidden(pooled))  # [B, E]
    demand = self.demand(h)  # [B, 1]
    corr = jnp.einsum("be,gek->bgk", h, self.gen_kernel[...])  # [B, G, 2]
    mean = self.loc[...][None] + self.slope[...][None] * demand + corr[..., 0]
    log_scale = self.log_scale[...][None] + corr[..., 1]
    return jnp.stack([mean, log_scale], axis=-1), demand[:, 0]


class LengthModel(nnx.Module):
  """Encoder + mean pooling + `LengthHead`."""

  def __init__(self, cfg: LengthModelConfig, *, rngs: nnx.Rngs):
    enc_cfg = EncoderConfig.from_hf(backbone_dir() / "config.json")
    self.cfg = cfg
    self.encoder = Encoder(enc_cfg, rngs=rngs)
    self.head = LengthHead(enc_cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, ids, mask, *, hidden=None, dropout_key=None, dropout_rate: float = 0.0):
    """Length distributions of every generator head.

    Args:
      ids: [B, T] token ids.
      mask: [B, T] 1 for real tokens.
      hidden: optional [B, T, D] cached output of the frozen layers; then only the trained layers
        run (training uses this).
      dropout_key: PRNG key for dropout on the pooled embedding (training); None: deterministic.
      dropout_rate: that dropout's rate.

    Returns:
      dist: [B, G, 2] mean and log scale of log(output tokens + 1).
      demand: [B] the prompt's shared demand score.
    """
    return self.head(self.embed(ids, mask, hidden=hidden), dropout_key, dropout_rate)

  def embed(self, ids, mask, *, hidden=None):
    """[B, D] the mean-pooled encoder output the head reads (arguments as for `__call__`)."""
    start = 0 if hidden is None else self.cfg.first_trained_layer
    return mean_pool(self.encoder(ids, mask, start_layer=start, hidden=hidden), mask)


def is_trainable(cfg: LengthModelConfig):
  """nnx filter: the head and the top `trainable_layers` encoder layers."""
  first = cfg.first_trained_layer

  def pred(path, x) -> bool:
    if not isinstance(x, nnx.Param):
      return False
    if path[0] == "head":
      return True
    return len(path) > 2 and path[:2] == ("encoder", "layer") and int(path[2]) >= first

  return pred


def build_model(cfg: LengthModelConfig, *, seed: int = 0, pretrained: bool = True) -> LengthModel:
  """A fresh length model with the packaged pretrained encoder weights."""
  model = LengthModel(cfg, rngs=nnx.Rngs(seed))
  if pretrained:
    load_pretrained_into(model.encoder)
  return model
