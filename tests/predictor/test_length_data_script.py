"""scripts/generate_length_data.py on 4 instructions: one record per instruction in the format the
predictor's trainer reads, and a rerun resumes instead of answering again."""

import importlib.util
import json
import pathlib

from s3jax.predictor.data import load_user_lengths

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "generate_length_data.py"


def _script():
  spec = importlib.util.spec_from_file_location("generate_length_data", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_four_instructions_then_a_resume(tmp_path, capsys):
  script = _script()
  out = tmp_path / "lengths.jsonl"
  argv = ["--out", str(out), "--model", "tiny", "--limit", "4", "--max-tokens", "6", "--memory-budget", "8MiB"]
  assert script.main(argv + ["--chunk", "3", "--keep-token-ids"]) == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  for r in records:  # the answer's tokens, the one that ended it included
    assert len(r.pop("output_ids")) == r["output_tokens"] + (r["finish_reason"] == "stop")
  instructions = script.read_instructions(script.LENGTHS_FILE)[:4]
  assert [(r["id"], r["instruction"]) for r in records] == instructions
  for r in records:
    assert r["generator"] == "tiny" and r["finish_reason"] in ("stop", "length")
    assert r["output_tokens"] == 6 if r["finish_reason"] == "length" else r["output_tokens"] < 6
  assert script.main(argv) == 0 and len(out.read_text().splitlines()) == 4  # nothing answered twice
  assert "0 instructions to answer (4 already in" in capsys.readouterr().err
  data = load_user_lengths(out)
  assert data.generators == ("tiny",)
  assert {p: int(n) for p, n in zip(data.prompts, data.lengths[:, 0])} == {
    r["instruction"]: r["output_tokens"] for r in records
  }
