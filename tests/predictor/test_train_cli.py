"""scripts/train_predictor.py on a user's own file: foreign ids, missing answers, a bad line."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from s3jax.predictor import LengthPredictor

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "train_predictor.py"
TOPICS = [
  "cats",
  "rivers",
  "tax law",
  "volcanoes",
  "chess",
  "bread",
  "satellites",
  "jazz",
  "bees",
  "glaciers",
  "ink",
  "trains",
  "tea",
  "maps",
  "owls",
  "clocks",
]


@pytest.fixture(scope="module")
def cli():
  spec = importlib.util.spec_from_file_location("train_predictor_cli", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_user_file(path: pathlib.Path) -> None:
  lines = []
  for i, t in enumerate(TOPICS):
    lines.append({"id": f"ticket-{i}a", "instruction": f"Answer yes or no: do you like {t}?", "output_tokens": 4 + i})
    lines.append(
      {
        "id": f"ticket-{i}b",
        "instruction": f"Write a long essay on the history of {t}.",
        "output": "word " * (300 + 10 * i),
      }
    )
    if i % 2:  # a second model answered only some prompts
      lines.append(
        {
          "id": f"ticket-{i}b",
          "instruction": f"Write a long essay on the history of {t}.",
          "generator": "other-model",
          "output_tokens": 500,
        }
      )
  path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_trains_on_a_users_file_with_its_own_ids(cli, tmp_path, capsys):
  data = tmp_path / "my_model.jsonl"
  _write_user_file(data)
  cli.main(
    [
      "--data-file",
      str(data),
      "--trainable-layers",
      "0",
      "--epochs",
      "3",
      "--test-frac",
      "0.25",
      "--calib-frac",
      "0.3",
      "--out",
      str(tmp_path / "ckpt"),
      "--results",
      str(tmp_path / "results"),
      "--no-progress",
    ]
  )
  out = capsys.readouterr().out
  assert "32 prompts x 2 generators" in out  # what it used, printed
  assert "my_model" in out and "other-model" in out
  assert "split: 17 train / 7 calibration / 8 test prompts" in out  # the fractions asked for
  predictor = LengthPredictor.load(tmp_path / "ckpt")
  assert predictor.generator == "my_model"  # the first generator, its file's stem
  assert predictor.generators == ("<any>", "my_model", "other-model")
  assert predictor.meta["split"] == {"test_frac": 0.25, "calib_frac": 0.3}
  tokens = predictor.reserve_tokens(["Answer yes or no: do you like soup?"])
  assert tokens.shape == (1,) and 1 <= tokens[0] <= 2048
  report = json.loads((tmp_path / "results" / "metrics.json").read_text())
  assert set(report["generators"]) == {"my_model", "other-model"}
  assert np.isfinite(report["generators"]["my_model"]["kendall_tau"])


def test_a_malformed_line_is_named(cli, tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"instruction": "hi", "output_tokens": 3}\n\n{"instruction": "yo", "output_tokens": -2}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl.*3"):
    cli.main(["--data-file", str(data), "--out", str(tmp_path / "ckpt"), "--no-progress"])
  assert not (tmp_path / "ckpt").exists()
