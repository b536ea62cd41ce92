#!/usr/bin/env python
"""Self-prediction refreshed while a request decodes (issue 30, offline): the served model's
hidden state after t generated tokens predicts the answer's *remaining* length.

Reads the served model's own answers with their token ids (``generate_length_data.py
--keep-token-ids``), the split its shipped heads were trained with (``user_split_by_text`` on its
length data) and the block the shipped self-prediction head reads. At each refresh point t (0: the
prompt's last token; then ``--points`` generated tokens), every answer still running after t tokens
(length L > t) gives one sample: the residual stream after that block at its t-th generated token,
and its remaining tokens L - t. One ``SelfHead`` (the same linear map at every t, as a decode step
would run it) is trained with Optax on the training answers' samples of every t, its penalty and
step chosen on the calibration answers', and its conformal margin fitted to the calibration samples
of every t together. For comparison, heads trained and calibrated on one t alone, reading the state
at t, the prompt's state and the state at t side by side, or the prompt's state and the mean state
over the generated tokens (linear, and a one-hidden-layer MLP as TRAIL's); and that last linear
head's learning curve over the training answers.

The table, on the test answers still running at each t: Kendall tau of the predicted against the
true remaining length, bucket accuracy, overflow at 0.1 and 0.2 and the saving against the best
constant reservation of remaining tokens at the same overflow on the same requests (every
reservation capped at the tokens an answer may still make, 512 - t). Beside it, what
the scheduler reads today: the prompt-time distributions (the shipped self-prediction head, the
shipped MiniLM head), calibrated, conditioned on L > t (its quantiles of L given L > t, minus t).

The answers (``results/self_refresh/answers.jsonl``, about an hour on 2 CPU cores; the test and
calibration instructions first, then the training ones, so a run cut short is still judged):

  python scripts/generate_length_data.py --instructions results/self_refresh/instructions.jsonl \
    --out results/self_refresh/answers.jsonl --max-tokens 512 --max-model-len 1536 --chunk 64 \
    --temperature 0.7 --top-p 0.9 --memory-budget 4GiB --keep-token-ids
  python scripts/self_prediction_refresh.py     # about 10 minutes
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from s3jax.assets import REPO_ROOT

DATA = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.jsonl"
ANSWERS = REPO_ROOT / "results" / "self_refresh" / "answers.jsonl"
SECTION = "## Self-prediction refreshed while decoding (issue 30, offline)"
TARGETS = (0.1, 0.2)
TOKEN_SHAPES = (128, 256, 512, 1024, 2048)
BATCH = 8
CURVE_SHARES = (0.25, 0.5)  # and all of them


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=None, help="the served model (default: the embedded SmolLM2-135M-Instruct)")
  p.add_argument("--data", type=pathlib.Path, default=DATA, help="its length data: the split")
  p.add_argument("--answers", type=pathlib.Path, default=ANSWERS, help="its answers with token ids")
  p.add_argument("--points", default="32,128,256", help="refresh points: generated tokens, comma-separated")
  p.add_argument("--results", type=pathlib.Path, default=REPO_ROOT / "results" / "self_refresh")
  p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
  return p.parse_args(argv)


def hidden_at_points(runner, layer: int, rows: list[tuple[list[int], list[int]]], positions: list[list[int]]):
  """[N] (tokens, positions) -> two [N, K, D]: the residual stream after ``layer`` blocks at each
  position, and its mean from the row's first position to each (batched by padded length; a row is
  cut after its last position, causal attention needs no more)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tqdm import tqdm

  from s3jax.models import gpt

  k = max(len(p) for p in positions)
  graphdef = runner.graphdef

  def states(params, tokens, last):  # one forward: XLA merges the two reads of the same blocks
    model = nnx.merge(graphdef, params)
    return gpt.hidden_at(model, tokens, last, layer), gpt.hidden_mean_at(model, tokens, last[:, 0], last, layer)

  forward = jax.jit(states)
  out = np.zeros((len(rows), k, runner.cfg.d_model), np.float32)
  mean = np.zeros_like(out)
  by_shape: dict[int, list[int]] = {}
  for i, p in enumerate(positions):
    by_shape.setdefault(next(t for t in TOKEN_SHAPES if t > max(p)), []).append(i)
  bar = tqdm(total=len(rows), desc=f"hidden states after block {layer}", unit="answer")
  for t, members in sorted(by_shape.items()):
    for at in range(0, len(members), BATCH):
      chunk = members[at : at + BATCH]
      tokens, last = np.zeros((BATCH, t), np.int32), np.zeros((BATCH, k), np.int32)
      for j, i in enumerate(chunk):
        ids = rows[i][:t]
        tokens[j, : len(ids)] = ids
        last[j, :] = positions[i][-1]
        last[j, : len(positions[i])] = positions[i]
      now, average = forward(runner.params, jnp.asarray(tokens), jnp.asarray(last))
      out[chunk], mean[chunk] = np.asarray(now)[: len(chunk)], np.asarray(average)[: len(chunk)]
      bar.update(len(chunk))
  bar.close()
  return out, mean


def train_mlp_head(x, y, x_calib, y_calib, *, width=64, decays=(0.01, 0.1, 1.0), steps=1500, seed=0):
  """A one-hidden-layer head (TRAIL's shape of predictor, a regression here: the same Gaussian on
  log(L + 1) as ``SelfHead``): [N, F] -> [N, 2], trained with Optax AdamW, full batch; the weight
  decay and the step of least calibration NLL are kept. Returns the head as a function of [N, F]."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from s3jax.predictor.losses import gaussian_nll, length_labels

  x, x_calib = np.asarray(x, np.float32), np.asarray(x_calib, np.float32)
  labels, labels_calib = length_labels(np.asarray(y)), length_labels(np.asarray(y_calib))
  center, spread = x.mean(0), x.std(0) + 1e-6
  z, z_calib = (x - center) / spread, (x_calib - center) / spread

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(x.shape[1], width, rngs=rngs)
      self.out = nnx.Linear(width, 2, kernel_init=nnx.initializers.zeros, rngs=rngs)
      self.out.bias[...] = jnp.asarray([float(labels.mean()), float(jnp.log(labels.std()))])

    def __call__(self, z):  # [N, F] -> [N, 2]
      return self.out(jax.nn.gelu(self.hidden(z)))

  graphdef, params = nnx.split(Mlp(nnx.Rngs(seed)))

  def nll(params, z, y):
    dist = nnx.merge(graphdef, params)(z)
    return gaussian_nll(dist[:, :1], dist[:, 1:], y[:, None], jnp.ones_like(y[:, None]))

  best = (np.inf, params)
  for decay in decays:
    opt = optax.adamw(1e-3, weight_decay=decay)

    @jax.jit
    def step(p, opt_state, opt=opt):
      updates, opt_state = opt.update(jax.grad(nll)(p, z, labels), opt_state, p)
      return optax.apply_updates(p, updates), opt_state, nll(p, z_calib, labels_calib)

    p, opt_state = params, opt.init(params)
    for _ in range(steps):
      p_next, opt_state, calib = step(p, opt_state)
      if float(calib) < best[0]:
        best = (float(calib), p)
      p = p_next
  model = nnx.merge(graphdef, best[1])
  return lambda x_new: np.asarray(model(jnp.asarray((np.asarray(x_new, np.float32) - center) / spread)))


def conditioned(dist: np.ndarray, t: int, levels) -> np.ndarray:
  """[P, 2] calibrated (mean, scale) of log(L + 1) -> [P, len(levels)] quantiles of L - t given
  L > t (the scheduler's ``survival_given``)."""
  from scipy import stats

  mu, sigma = dist[:, :1], np.maximum(dist[:, 1:], 1e-6)
  alive = stats.norm.sf((np.log(t + 0.5) - mu) / sigma)  # P(L > t)
  z = stats.norm.isf(np.clip((1.0 - np.asarray(levels)[None]) * alive, 1e-300, 1.0))
  return np.maximum(np.ceil(np.expm1(mu + sigma * z) - t), 1.0)


def main(argv=None) -> int:
  args = parse_args(argv)
  from s3jax import LLM
  from s3jax.buckets import BucketScheme
  from s3jax.predictor import LengthPredictor
  from s3jax.predictor.calibration import reserved_answer_tokens
  from s3jax.predictor.data import user_split_by_text
  from s3jax.predictor.metrics import bucket_metrics, kendall_tau, reservation_metrics
  from s3jax.predictor.predictor import shipped_checkpoint_for
  from s3jax.predictor.self_head import SelfLengthPredictor, calibration_for, train_self_head

  points = (0, *(int(x) for x in args.points.split(",")))
  role = user_split_by_text(args.data)
  records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
  lengths = {r["id"]: r["output_tokens"] for r in records}
  answers = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
  served = answers[0]["generator"]
  agree = sum(a["output_tokens"] == lengths.get(a["id"]) for a in answers)
  llm = LLM(args.model, predictor=None, policy="on-demand", memory_budget="16MiB")
  if llm.model_name != served:
    raise SystemExit(f"the served model is {llm.model_name!r}, the answers are {served!r}'s")
  shipped = SelfLengthPredictor.load_shipped(llm.runner)
  minilm = LengthPredictor.load_default(served)
  buckets = BucketScheme.load(shipped_checkpoint_for(served))
  max_length = buckets.max_length

  prompts = [llm.chat_prompt_ids([{"role": "user", "content": a["instruction"]}]) for a in answers]
  total = np.asarray([a["output_tokens"] for a in answers])
  split = np.asarray([role[a["instruction"].strip()] for a in answers])
  positions = [[len(p) - 1 + t for t in points if t == 0 or n > t] for p, n in zip(prompts, total)]
  hidden, averaged = hidden_at_points(
    llm.runner, shipped.config.layer, [p + a["output_ids"] for p, a in zip(prompts, answers)], positions
  )

  def samples(name: str, t: int | None = None, features: tuple[str, ...] = ("now",)):
    """[S, len(features) * D] hidden states and [S] remaining tokens of the ``name`` answers at point
    t (every point: None). Features: the state at the prompt's last token, at the t-th generated
    token ("now"), and averaged over the generated tokens so far ("mean")."""
    xs, ys, rows = [], [], []
    for i in np.flatnonzero(split == name):
      for k, at in enumerate(p for p in points if p == 0 or total[i] > p):
        if t is None or at == t:
          read = {"prompt": hidden[i, 0], "now": hidden[i, k], "mean": averaged[i, k]}
          xs.append(np.concatenate([read[f] for f in features]))
          ys.append(total[i] - at)
          rows.append(i)
    return np.asarray(xs), np.asarray(ys), np.asarray(rows, np.int64)

  x_tr, y_tr, _ = samples("train")
  x_ca, y_ca, _ = samples("calib")
  head, record = train_self_head(x_tr, y_tr, x_ca, y_ca)
  calibration = calibration_for(served, np.asarray(head(x_ca), np.float64), y_ca, max_length)

  test = np.flatnonzero(split == "test")
  _, self_dist = shipped.predict_lengths([prompts[i] for i in test])
  _, minilm_dist = minilm.with_options(minilm.head_for(served)).predict_lengths(
    [answers[i]["instruction"] for i in test]
  )
  at_prompt = {"self-prediction at the prompt": self_dist, "MiniLM at the prompt": minilm_dist}
  shared, own = "self-prediction refreshed, one head", "self-prediction refreshed, a head per t"
  both = "self-prediction refreshed, a head per t, reading the prompt's state too"
  mean = "self-prediction refreshed, a head per t, reading the prompt's state and the generated tokens' mean"
  per_t = {own: ("now",), both: ("prompt", "now"), mean: ("prompt", "mean")}
  mlp = "self-prediction refreshed, an MLP per t (64 GELU units), reading the prompt's state and the mean"
  table: dict[str, dict[int, dict]] = {shared: {}, **{label: {} for label in per_t}, mlp: {}}
  for label in at_prompt:
    table[f"{label}, given L > t"] = {}

  def judge(score, median, reserved, remaining, cap):
    """One row: ranking by ``score``, buckets of ``median``, ``reserved`` [P, targets] against the
    best constant, every reservation capped at the remaining tokens the request may still make."""
    row = {"n_test": len(remaining), "kendall_tau": kendall_tau(score, remaining)}
    row.update(bucket_metrics(buckets, median, remaining))
    for j, a in enumerate(TARGETS):
      row[f"at_{a}"] = reservation_metrics(np.minimum(reserved[:, j], cap), remaining, cap)
    return row

  for t in points:
    x_te, y_te, rows = samples("test", t)
    cap = max_length - t  # answers end at max_length tokens: what remains is at most this
    variants = [(shared, head, calibration, x_te)]
    # The comparisons: a head trained and calibrated on this t alone, on the state now, on the
    # prompt's state and the state now side by side, and on the prompt's state and the mean state
    # over the generated tokens (at t = 0 the mean is the prompt's state itself).
    for label, features in per_t.items():
      x_t, y_t, _ = samples("train", t, features)
      xc_t, yc_t, _ = samples("calib", t, features)
      head_t, _ = train_self_head(x_t, y_t, xc_t, yc_t)
      calibration_t = calibration_for(served, np.asarray(head_t(xc_t), np.float64), yc_t, max_length)
      variants.append((label, head_t, calibration_t, samples("test", t, features)[0]))
    # The non-linear head on the best features.
    x_t, y_t, _ = samples("train", t, per_t[mean])
    xc_t, yc_t, _ = samples("calib", t, per_t[mean])
    mlp_t = train_mlp_head(x_t, y_t, xc_t, yc_t)
    calibration_t = calibration_for(served, np.asarray(mlp_t(xc_t), np.float64), yc_t, max_length)
    variants.append((mlp, mlp_t, calibration_t, samples("test", t, per_t[mean])[0]))
    for label, h, c, x in variants:
      dist = np.asarray(h(x), np.float64)
      levels = [c.threshold(served, a, shipped.rule) for a in TARGETS]
      reserved = np.column_stack([reserved_answer_tokens(dist, v, cap, shipped.rule) for v in levels])
      table[label][t] = judge(dist[:, 0], reserved_answer_tokens(dist, 0.0, cap), reserved, y_te, cap)
    where = np.searchsorted(test, rows)  # rows of the test answers alive at t
    for label, prompt_dist in at_prompt.items():
      q = conditioned(prompt_dist[where], t, [0.5, *(1 - a for a in TARGETS)])
      table[f"{label}, given L > t"][t] = judge(q[:, 0], q[:, 0], q[:, 1:], y_te, cap)

  # The learning curve of the best variant: how its tau grows with the training answers (a seeded
  # share of them; calibration and test answers unchanged). If it is steep, more of the model's own
  # answers (what a server observes) would narrow the gap to the noise ceiling (length_noise_ceiling.py).
  train_ids = np.random.default_rng(0).permutation(np.flatnonzero(split == "train"))
  curve = {share: {} for share in CURVE_SHARES}
  for share in CURVE_SHARES:
    kept = train_ids[: round(share * len(train_ids))]
    for t in points:
      x_t, y_t, rows_t = samples("train", t, per_t[mean])
      xc_t, yc_t, _ = samples("calib", t, per_t[mean])
      x_te, y_te, _ = samples("test", t, per_t[mean])
      alive = np.isin(rows_t, kept)
      head_t, _ = train_self_head(x_t[alive], y_t[alive], xc_t, yc_t)
      curve[share][t] = {"train": int(alive.sum()), "kendall_tau": kendall_tau(np.asarray(head_t(x_te))[:, 0], y_te)}
  curve[1.0] = {
    t: {"train": int(len(samples("train", t)[1])), "kendall_tau": table[mean][t]["kendall_tau"]} for t in points
  }

  d = llm.runner.cfg.d_model
  lines = [
    f"| predictor ({served}, test answers) | t | running | tau | exact | within one |"
    + "".join(f" overflow @{a} | saving @{a} |" for a in TARGETS),
    "|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(TARGETS),
  ]
  for label, by_t in table.items():
    for t, r in by_t.items():
      cells = "".join(f" {r[f'at_{a}']['overflow']:.3f} | {r[f'at_{a}']['saving']:+.1%} |" for a in TARGETS)
      lines.append(
        f"| {label} | {t} | {r['n_test']} | {r['kendall_tau']:.3f} | {r['exact']:.3f} | {r['within_one']:.3f} |{cells}"
      )
  lines += [
    "",
    "Learning curve of the linear per-t head on the prompt's state and the mean state: tau on the same test answers, "
    "trained on a seeded share of the training answers (samples at t in brackets).",
    "",
    "| training answers | " + " | ".join(f"t = {t}" for t in points) + " |",
    "|---:|" + "---:|" * len(points),
  ]
  for share, by_t in sorted(curve.items()):
    cells = " | ".join(f"{r['kendall_tau']:.3f} ({r['train']})" for r in by_t.values())
    lines.append(f"| {round(share * len(train_ids))} | {cells} |")
  command = "python scripts/self_prediction_refresh.py " + " ".join(argv if argv is not None else sys.argv[1:])
  counts = {name: int((split == name).sum()) for name in ("train", "calib", "test")}
  text = "\n".join(
    [
      SECTION,
      "",
      f"`{command.strip()}`: {len(answers)} of {served}'s answers regenerated with their token ids "
      f"(`generate_length_data.py --keep-token-ids`, T=0.7, top-p 0.9, seed = id, at most 512 tokens; "
      f"{agree} of {len(answers)} have the length data's length), split as its heads were "
      f"({counts['train']} train, {counts['calib']} calibration, {counts['test']} test answers). One head "
      f"reads the residual stream after block {shipped.config.layer} at the prompt's last token (t = 0) and "
      f"after t generated tokens, and predicts the remaining tokens L - t; trained on the training answers' "
      f"{len(y_tr)} samples of every t (l2 {record['chosen_l2']} chosen on calibration), margin fitted to "
      f"the {len(y_ca)} calibration samples of every t together ({shipped.rule.value}). Rows: test answers "
      f"still running at t. The prompt-time rows are the distributions the scheduler reads today (calibrated, "
      f"conditioned on L > t). The head costs one [B, {d}] x [{d}, 2] product per refresh, "
      f"{4 * d} FLOPs per row, beside the roughly {2 * llm.runner.cfg.num_params() / 1e9:.2f} GFLOPs of a decode "
      "step's row.",
      "",
      *lines,
      "",
    ]
  )
  print(text)
  args.results.mkdir(parents=True, exist_ok=True)
  (args.results / "metrics.json").write_text(
    json.dumps(
      {
        "command": command,
        "training": record,
        "split": counts,
        "agree": agree,
        "table": table,
        "learning_curve": curve,
      },
      indent=1,
    )
  )
  if not args.no_write:
    from bench_decode import write_section

    write_section(text + "\n", REPO_ROOT / "BENCHMARKS.md", SECTION)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
