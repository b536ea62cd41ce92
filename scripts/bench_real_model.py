#!/usr/bin/env python
"""End to end on a real model: each answer ends at the model's own end token, no replayed length.

The served model (default: the embedded SmolLM2-135M-Instruct) answers held-out AlpacaEval
instructions (held out by both heads below) through its chat template, decoded as its length data
was (``data/smollm2/README.md``: temperature 0.7, top-p 0.9, seed = instruction id, at most 512
tokens), under one KV budget, all requests at once. Systems, in order:

  * max (run first: its answers' lengths are what the oracle reserves), on-demand (vLLM v1) and
    adaptive (SGLang): no predictor;
  * s3: the served model's own length head (the shipped checkpoint trained on its answers);
  * s3-self: the served model's own hidden state after a middle block, at the prompt's last token,
    read by its shipped self-prediction head (``s3jax.predictor.self_head``, issue 30);
  * s3-cold: the cold-start head ``<any>`` of the 15-LLM checkpoint, which never saw this model;
  * s3-drift: that checkpoint's text_davinci_003 head (a model whose answers are 6x shorter than
    SmolLM2's): issue 16's drift, on real completions;
  * ``+retrain`` (s3+retrain, s3-self+retrain, s3-cold+retrain, s3-drift+retrain): the same head
    retrained online from the completions as they finish (``OnlineRetrainer``); it acts on the
    requests that arrive after a swap, so give it arrivals over time (``--arrival-rate``) and
    enough requests;
  * oracle: each answer's true length, from the first run.

Prompts: ``held-out`` (default) draws the 21 instructions that both SmolLM2's own head and the
15-LLM checkpoint held out; ``shipped-test`` draws from the 136 of the shipped data's test split,
which no head of the 15-LLM checkpoint saw (the cold and drift heads; s3's own head trained on some
of them, so it is refused there); ``own-test`` draws from the 136 of the served model's own test
split, which neither of its own heads (s3, s3-self) saw (the 15-LLM checkpoint trained on some of
them, so s3-cold and s3-drift are refused there).

Goodput (``vllm bench serve --goodput``): requests per second meeting both SLOs, time to first token
and time per output token, the paper's scaled to this device's decode step (``benchmark.py``'s
``scaled_slo``).

A request samples with its own seed at every step, so every system should produce the same tokens;
the run counts the requests whose tokens differ from the first run's (float sums in another batch
can flip a sampled token) and how many first-run lengths equal the length data's.

  python scripts/bench_real_model.py --budget-slots 3
  python scripts/bench_real_model.py --budget-slots 3 --prompts own-test --num-requests 48 \
    --arrival-rate 0.3 --systems on-demand,s3,s3-self
  python scripts/bench_real_model.py --budget-slots 3 --prompts shipped-test --num-requests 48 \
    --arrival-rate 0.12 --retrain-every 8 --systems s3-drift,s3-drift+retrain,s3-cold+retrain
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from benchmark import scaled_slo

from s3jax.assets import REPO_ROOT

SYSTEMS = (
  "max",
  "on-demand",
  "adaptive",
  "s3",
  "s3+retrain",
  "s3-self",
  "s3-self+retrain",
  "s3-cold",
  "s3-cold+retrain",
  "s3-drift",
  "s3-drift+retrain",
  "oracle",
)
HEADS = {"s3-cold": "<any>", "s3-drift": "text_davinci_003"}  # heads of the 15-LLM checkpoint
DATA = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default=None, help="the served model (default: the embedded SmolLM2-135M-Instruct)")
  p.add_argument("--data", type=pathlib.Path, default=DATA, help="the model's length data (generate_length_data.py)")
  p.add_argument(
    "--num-requests",
    type=int,
    default=21,
    help="held-out instructions answered (a seeded sample; 21 are held out by both heads)",
  )
  p.add_argument("--prompts", choices=("held-out", "shipped-test", "own-test"), default="held-out", help="see above")
  p.add_argument(
    "--arrival-rate", type=float, default=float("inf"), help="Poisson arrivals per second (default: all at once)"
  )
  p.add_argument("--seed", type=int, default=0, help="which test instructions, and in what order")
  p.add_argument("--budget-slots", type=int, default=8, help="KV budget: this many max reservations (--max-model-len)")
  p.add_argument("--max-tokens", type=int, default=512)
  p.add_argument(
    "--max-model-len",
    type=int,
    default=None,
    help="what max reserves per request (default: the longest test prompt + --max-tokens, a page multiple)",
  )
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top-p", type=float, default=0.9)
  p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS)}")
  p.add_argument("--retrain-every", type=int, default=16, help="completions between online retraining runs")
  p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "results" / "real_model")
  p.add_argument("--tag", default="", help="appended to the result file's name")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  args.systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
  if unknown := set(args.systems) - set(SYSTEMS):
    p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
  if args.systems and args.systems[0] == "oracle":
    p.error("oracle reserves the first run's lengths: put another system first")
  if args.prompts == "shipped-test" and {"s3", "s3-self"} & {s.partition("+")[0] for s in args.systems}:
    p.error("the served model's own heads trained on some shipped-test prompts: use --prompts held-out for them")
  if args.prompts == "own-test" and {h for s in args.systems for h in HEADS if s.startswith(h)}:
    p.error("the 15-LLM checkpoint's heads trained on some own-test prompts: use --prompts held-out for them")
  return args


def test_trace(records: list[dict], prompt_lens, num_requests: int, seed: int, max_len: int, data_path, prompts: str):
  """Held-out records as a ``Trace`` (lengths: the length data's, EOS counted): the test split of
  the shipped data (AlpacaEval ids; the 15-LLM checkpoint's heads), the test split the served
  model's own heads were trained with (``user_split_by_text``), or, for ``held-out``, both."""
  import numpy as np

  from s3jax.bench.trace import Trace
  from s3jax.predictor.data import split_by_id, user_split_by_text

  ids = np.asarray([r["id"] for r in records])
  test = list(split_by_id(ids, seed=0).test) if prompts != "own-test" else list(range(len(records)))
  if prompts in ("held-out", "own-test"):
    own = user_split_by_text(data_path)
    test = [i for i in test if own[records[i]["instruction"].strip()] == "test"]
  if num_requests > len(test):
    raise SystemExit(f"only {len(test)} instructions are held out ({prompts}); ask for at most that many")
  order = np.random.default_rng(seed).permutation(test)[:num_requests]
  lengths = np.asarray([records[i]["output_tokens"] + (records[i]["finish_reason"] == "stop") for i in order])
  return Trace(
    generator=records[0]["generator"],
    ids=ids[order],
    prompts=tuple(records[i]["instruction"] for i in order),
    prompt_lens=np.asarray([prompt_lens[i] for i in order]),
    output_lens=lengths,
    raw_output_lens=lengths,
    max_len=max_len,
    max_output=None,
  ), order


def halves(requests) -> dict:
  """Overflow rate and mean reservation over the first and the second half of the arrivals: what
  online retraining changes is the second."""
  import numpy as np

  by_arrival = sorted(requests, key=lambda r: r.submitted_at)
  half = len(by_arrival) // 2
  out = {}
  for part, reqs in (("first_half", by_arrival[:half]), ("second_half", by_arrival[half:])):
    out[f"overflow_{part}"] = float(np.mean([len(r.output_ids) > r.predicted_output_len for r in reqs]))
    out[f"reserved_{part}"] = float(np.mean([r.predicted_output_len for r in reqs]))
  return out


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  import dataclasses

  import jax
  import numpy as np

  from s3jax import LLM
  from s3jax.bench import ModelAnswers, compare_tokens, replay
  from s3jax.bench.experiment import shipped_predictor, system_options
  from s3jax.bench.report import render_table
  from s3jax.bench.trace import poisson_arrivals
  from s3jax.engine import EngineConfig
  from s3jax.executor.runner import ModelRunner
  from s3jax.predictor import LengthPredictor
  from s3jax.predictor.self_head import SelfLengthPredictor
  from s3jax.supervisor.retrainer import OnlineRetrainer, RetrainConfig

  lines = args.data.read_text().splitlines()
  records = sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["id"])
  llm = LLM(args.model, predictor=None, policy="on-demand", memory_budget="16MiB")  # its tokenizer and chat template
  served = llm.model_name
  all_prompt_ids = [llm.chat_prompt_ids([{"role": "user", "content": r["instruction"]}]) for r in records]
  trace, order = test_trace(
    records, [len(p) for p in all_prompt_ids], args.num_requests, args.seed, llm.max_model_len, args.data, args.prompts
  )
  prompt_ids = [all_prompt_ids[i] for i in order]
  data_lens = trace.output_lens  # the length data's (the oracle run reserves the first run's instead)
  # Policy max reserves the model's whole window: make it what these requests can need.
  page = 64
  max_len = args.max_model_len or -(-(max(map(len, prompt_ids)) + args.max_tokens) // page) * page
  runner = ModelRunner.load(args.model, max_model_len=max_len) if max_len != llm.max_model_len else llm.runner
  trace = dataclasses.replace(trace, max_len=max_len)
  del llm
  answers = ModelAnswers(
    max_tokens=args.max_tokens,
    temperature=args.temperature,
    top_p=args.top_p,
    seeds=[int(i) for i in trace.ids],  # seed = id, as the length data was sampled
  )
  budget = args.budget_slots * max_len * runner.kv_bytes_per_token()
  print(
    f"{served}: {len(trace)} test requests, {max_len} tokens per max reservation, budget {budget / 2**20:.0f} MiB; "
    f"trace {trace.summary()}",
    flush=True,
  )

  slo = scaled_slo(runner)
  print(f"goodput SLOs: TTFT {slo['ttft_slo_s']:.2f} s, TPOT {slo['slo_s']:.3f} s ({slo['rule']})", flush=True)
  arrivals = poisson_arrivals(len(trace), args.arrival_rate, seed=args.seed)
  runs, summaries, predictors = {}, {}, {}
  for name in args.systems:
    predictor = retrainer = None
    head, _, retrain = name.partition("+")
    if head == "s3":
      predictor = shipped_predictor(served)
    elif head == "s3-self":
      predictor = SelfLengthPredictor.load_shipped(runner, served)
    elif head in HEADS:  # a fresh copy of the 15-LLM checkpoint for each: retraining changes it
      predictor = LengthPredictor.load_default(generator=HEADS[head])
    if retrain:
      every = args.retrain_every
      retrainer = OnlineRetrainer(
        predictor, RetrainConfig(every=every, min_examples=every, min_new=every // 2, window=2 * every, epochs=20)
      )
    if predictor is not None:
      predictors[name] = predictor.generator
      print(f"[{name}] head {predictor.generator!r}, overflow target {predictor.max_under_rate}", flush=True)
      if head == "s3-self":
        predictors[name] = f"self-prediction after block {predictor.config.layer}"
    if name == "oracle":  # the true lengths: as the first run's answers ended
      first = next(iter(runs.values()))
      trace = dataclasses.replace(trace, output_lens=np.asarray([len(r.output_ids) for r in first.requests]))
    policy = "s3" if name.startswith("s3") else name
    config = EngineConfig.create(memory_budget=budget, **system_options(policy))
    runs[name] = run = replay(
      runner,
      config,
      trace,
      prompt_ids,
      predictor=predictor,
      retrainer=retrainer,
      arrivals_s=arrivals,
      answers=answers,
      progress=not args.no_progress,
    )
    summaries[name] = s = run.summary()
    s["goodput_req_per_s"] = run.goodput({"ttft": slo["ttft_slo_s"], "tpot": slo["slo_s"]})
    if retrainer is not None:
      s["retraining"] = vars(retrainer.stats())
    if predictor is not None:
      s["by_arrival"] = halves(run.requests)
    print(
      f"[{name}] {s['output_tokens']} tokens in {s['wall_s']:.1f}s = {s['tokens_per_s']:.2f} tok/s, mean batch "
      f"{s['mean_batch']:.2f}, overflow {s['overflow_rate']:.2f}, {s['preemptions']} preemptions",
      flush=True,
    )
  first = next(iter(runs.values()))
  first_lens = np.asarray([len(r.output_ids) for r in first.requests])
  result = {
    "settings": {
      "command": "python scripts/bench_real_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
      "date": time.strftime("%Y-%m-%d"),
      "model": served,
      "device": str(jax.devices()[0].device_kind),
      "decoding": f"T={args.temperature}, top_p={args.top_p}, seed=id, max_tokens={args.max_tokens}",
      "budget_bytes": budget,
      "max_model_len": max_len,
      "heads": predictors,
      "prompts": args.prompts,
      "arrival_rate": None if np.isinf(args.arrival_rate) else args.arrival_rate,
      "slo": slo,
    },
    "trace": trace.summary(),
    "first_run_lengths_equal_length_data": int((first_lens == data_lens).sum()),
    "policies": summaries,
    "tokens_identical": compare_tokens(runs),
  }
  args.out.mkdir(parents=True, exist_ok=True)
  online = "" if np.isinf(args.arrival_rate) else f"_r{args.arrival_rate:g}"
  prompts = "" if args.prompts == "held-out" else f"_{args.prompts}"
  path = args.out / f"{served}{prompts}_n{len(trace)}_b{args.budget_slots}{online}{args.tag}.json"
  path.write_text(json.dumps(result, indent=1, default=str))
  print(f"\n### {served}, {len(trace)} test requests, budget {budget / 2**20:.0f} MiB\n")
  print(render_table(result))
  same = result["tokens_identical"]
  print(f"\n- tokens identical to {same['reference']}'s: {same['identical']} of {same['requests']} requests")
  for name, h in ((name, s["by_arrival"]) for name, s in summaries.items() if "by_arrival" in s):  # predictors
    print(
      f"- {name}: overflow {h['overflow_first_half']:.2f} in the first half of arrivals, "
      f"{h['overflow_second_half']:.2f} in the second; reserved {h['reserved_first_half']:.0f} / "
      f"{h['reserved_second_half']:.0f} tokens per request"
    )
  equal = result["first_run_lengths_equal_length_data"]
  print(f"- first-run lengths equal to the length data's: {equal} of {len(trace)}")
  print(f"\nwrote {path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
