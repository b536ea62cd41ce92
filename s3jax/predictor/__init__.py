"""Output-length predictor: which length bucket will a prompt's answer fall in.

A MiniLM (BERT, 6 layers, 384 wide) encoder in Flax NNX, fine-tuned on the
answer lengths of many generator models at once, with a per-generator head
and a safety-margin knob (`predict(prompts, max_under_rate=...)`).

    from s3jax.predictor import LengthPredictor
    predictor = LengthPredictor.load_default()
    buckets = predictor.predict(["Write a haiku about rain."])
    tokens = predictor.buckets.upper_bound(buckets)   # what to reserve
"""

from s3jax.buckets import BucketKind, BucketScheme
from s3jax.predictor.calibration import Calibration, DecodeRule
from s3jax.predictor.losses import LossKind
from s3jax.predictor.model import ANY_GENERATOR, LengthModel, ModelConfig
from s3jax.predictor.predictor import LengthPredictor
from s3jax.predictor.train import TrainConfig, train

__all__ = [
    "ANY_GENERATOR", "BucketKind", "BucketScheme", "Calibration", "DecodeRule",
    "LengthModel", "LengthPredictor", "LossKind", "ModelConfig", "TrainConfig",
    "train",
]
