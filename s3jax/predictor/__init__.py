"""Output-length predictor: how long will a prompt's answer be, and how much KV cache to reserve.

A MiniLM (BERT, 6 layers, 384 wide) encoder in Flax NNX with a log-normal length head per generator
model, trained on the answer lengths of many generators at once, and a calibrated safety margin
(`reserve_tokens(prompts, max_under_rate=...)`).

    from s3jax.predictor import LengthPredictor
    predictor = LengthPredictor.load_default(generator="<any>")   # a model with no observed lengths
    tokens = predictor.reserve_tokens(["Write a haiku about rain."])   # what to reserve
"""

from s3jax.buckets import BucketKind, BucketScheme
from s3jax.predictor.calibration import Calibration
from s3jax.predictor.model import ANY_GENERATOR, LengthModel, LengthModelConfig
from s3jax.predictor.predictor import LengthPredictor
from s3jax.predictor.train import TrainConfig, train

__all__ = [
  "ANY_GENERATOR",
  "BucketKind",
  "BucketScheme",
  "Calibration",
  "LengthModel",
  "LengthPredictor",
  "LengthModelConfig",
  "TrainConfig",
  "train",
]
