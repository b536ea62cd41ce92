"""Orbax save/restore of a trained length predictor.

Layout of a checkpoint directory:
  params/           Orbax pytree of the *trained* parameters only (head and
                    top encoder layers); the frozen layers are the packaged
                    all-MiniLM-L6-v2 weights, reloaded from the package.
  config.json       model config, default generator, overflow target and
                    reservation rule, training settings and provenance (the
                    tokenizer that counted lengths, the command).
  buckets.json      the BucketScheme (s3jax.buckets).
  calibration.json  held-out (mean, log scale, true length) samples per head, from which any
                    reservation rule's margin is calibrated at load time.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from s3jax.buckets import BucketScheme
from s3jax.predictor.calibration import Calibration
from s3jax.predictor.model import LengthModel, LengthModelConfig, build_model, is_trainable

CONFIG_FILENAME = "config.json"
PARAMS_DIRNAME = "params"


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return np.asarray(tree)


def _int_keys(tree):
  # nnx.List children are keyed by int; Orbax stores keys as strings.
  if isinstance(tree, dict):
    return {int(k) if str(k).isdigit() else k: _int_keys(v) for k, v in tree.items()}
  return tree


def save_checkpoint(
  directory: str | pathlib.Path, model: LengthModel, *, scheme: BucketScheme, calibration: Calibration, meta: dict
) -> pathlib.Path:
  """Writes the trained params, config, bucket scheme and calibration.

  Args:
    directory: target directory (created; an existing `params/` is replaced).
    model: trained model.
    scheme: its bucket scheme.
    calibration: held-out calibration.
    meta: JSON-able extras stored in config.json (must include
      `default_generator`; may include `max_under_rate`, `reservation_rule`, training settings).
  """
  directory = pathlib.Path(directory).resolve()
  directory.mkdir(parents=True, exist_ok=True)
  trained = nnx.to_pure_dict(nnx.state(model, is_trainable(model.cfg)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / PARAMS_DIRNAME, _str_keys(trained), force=True)
    ckptr.wait_until_finished()
  config = {"model": model.cfg.to_dict(), **meta}
  (directory / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
  scheme.save(directory)
  calibration.save(directory)
  return directory


def load_checkpoint(directory: str | pathlib.Path) -> tuple[LengthModel, BucketScheme, Calibration, dict]:
  """Rebuilds the model (packaged backbone + restored trained params).

  Returns:
    model, bucket scheme, calibration, the config.json dict.
  """
  directory = pathlib.Path(directory).resolve()
  config = json.loads((directory / CONFIG_FILENAME).read_text())
  model_cfg = LengthModelConfig.from_dict(config["model"])
  model = build_model(model_cfg)
  state = nnx.state(model, is_trainable(model_cfg))
  target = _str_keys(nnx.to_pure_dict(state))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(directory / PARAMS_DIRNAME, abstract)
  nnx.replace_by_pure_dict(state, _int_keys(restored))
  nnx.update(model, state)
  return (model, BucketScheme.load(directory), Calibration.load(directory), config)
