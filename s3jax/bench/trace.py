"""Request traces from alpaca_eval: real prompts and one model's real answer lengths.

A trace is what a serving benchmark replays: the prompt of each request and the
number of tokens its answer had when the generator model wrote it. Lengths are
counted with the served model's tokenizer (GPT-2 BPE by default), so an answer
replayed with ``eos_at`` ends exactly where the generator's answer ended.

Sampling is deterministic: the records are ordered by instruction ``id`` and
permuted by ``seed``, so a (generator, seed, num_requests) triple always names
the same requests whatever the file order, and a smaller trace is a prefix of a
larger one with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_GENERATOR = "llama-2-7b-chat-hf"

# Maps texts to token counts; the default wraps the shipped GPT-2 tokenizer.
CountTokens = Callable[[Sequence[str]], Sequence[int]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trace:
  """N requests: prompts and the generator's output lengths, in replay order.

  Attributes:
    generator: the model whose answers gave the lengths.
    ids: [N] alpaca_eval instruction ids.
    prompts: N instruction strings.
    prompt_lens: [N] prompt tokens.
    output_lens: [N] answer tokens to replay, after clipping: at least 1, at
      most ``max_len - prompt_len`` and at most ``max_output``.
    raw_output_lens: [N] answer tokens before clipping.
    max_len: the longest prompt + answer allowed (the model's maximum).
    max_output: the cap applied to answers, or None.
  """

  generator: str
  ids: np.ndarray
  prompts: tuple[str, ...]
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  raw_output_lens: np.ndarray
  max_len: int
  max_output: int | None

  def __len__(self) -> int:
    return len(self.prompts)

  @property
  def num_clipped(self) -> int:
    """Answers shortened by ``max_len`` or ``max_output``."""
    return int((self.output_lens < self.raw_output_lens).sum())

  def summary(self) -> dict:
    """Counts and length percentiles, for logs and reports."""
    out, prompt = self.output_lens, self.prompt_lens
    return {
      "generator": self.generator,
      "requests": len(self),
      "max_len": self.max_len,
      "max_output": self.max_output,
      "clipped": self.num_clipped,
      "output_tokens": int(out.sum()),
      "prompt_tokens": int(prompt.sum()),
      "output_len_p50": float(np.median(out)),
      "output_len_mean": float(out.mean()),
      "output_len_max": int(out.max()),
      "prompt_len_p50": float(np.median(prompt)),
      "prompt_len_max": int(prompt.max()),
    }


def read_records(generator: str, data_dir: str | pathlib.Path | None = None) -> list[dict]:
  """The generator's records, sorted by id.

  ``data_dir`` None reads the shipped lengths: ``id``, ``instruction``, ``prompt_tokens`` and
  ``output_tokens`` (GPT-2 tokens, counted already). A directory of full answers gives ``id``,
  ``instruction`` and ``output``.

  Raises:
    FileNotFoundError: no such generator; the message lists those there are.
  """
  if data_dir is None:
    from s3jax.predictor.data import read_shipped_lengths

    rows = read_shipped_lengths()
    if generator not in rows[0]["output_tokens"]:
      raise FileNotFoundError(
        f"no trace for generator {generator!r} in the shipped lengths; have {sorted(rows[0]['output_tokens'])}"
      )
    return [dict(r, output_tokens=r["output_tokens"][generator]) for r in rows]
  data_dir = pathlib.Path(data_dir)
  path = data_dir / f"{generator}.jsonl"
  if not path.is_file():
    have = sorted(p.stem for p in data_dir.glob("*.jsonl"))
    raise FileNotFoundError(f"no trace for generator {generator!r} at {path}; have {have}")
  with path.open() as f:
    records = [json.loads(line) for line in f if line.strip()]
  return sorted(records, key=lambda r: r["id"])


def poisson_arrivals(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> np.ndarray:
  """Arrival times (s) of ``n`` requests at ``rate`` per second, the first at 0; all 0 when the
  rate is infinite. Gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / rate``,
  as ``vllm bench serve --burstiness`` draws them: 1 is a Poisson process, below 1 burstier. One
  seed gives the same gaps at every rate, scaled."""
  if np.isinf(rate):
    return np.zeros(n)
  if rate <= 0 or burstiness <= 0:
    raise ValueError(f"the arrival rate and burstiness must be positive, got {rate} and {burstiness}")
  gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / burstiness, n) / rate
  return np.cumsum(gaps) - gaps[0]


def held_out_ids(generator: str = DEFAULT_GENERATOR, data_dir: str | pathlib.Path | None = None) -> np.ndarray:
  """Instruction ids the shipped predictor never trained on (train_predictor.py's test split, seed 0)."""
  from s3jax.predictor.data import split_by_id

  ids = np.asarray(sorted(r["id"] for r in read_records(generator, data_dir)))
  return ids[split_by_id(ids, seed=0).test]


def gpt2_token_counter() -> CountTokens:
  """Counts tokens with the shipped GPT-2 BPE (the served model's tokenizer)."""
  from s3jax.tokenizer import load_tokenizer  # transformers import is slow; only real runs pay it

  tokenizer = load_tokenizer()
  return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def load_trace(
  generator: str = DEFAULT_GENERATOR,
  *,
  num_requests: int | None = None,
  seed: int = 0,
  max_len: int = 2048,
  max_output: int | None = None,
  ids: Sequence[int] | None = None,
  data_dir: str | pathlib.Path | None = None,
  count_tokens: CountTokens | None = None,
) -> Trace:
  """Samples a trace of ``num_requests`` requests from one generator's answers.

  Args:
    generator: file stem under ``data_dir`` (e.g. "llama-2-7b-chat-hf").
    num_requests: requests to sample; None takes every record (still permuted).
    seed: permutation seed; the same seed gives the same order, so smaller traces are prefixes.
    max_len: longest prompt + answer; longer answers are clipped to fit.
    max_output: optional further cap on answer tokens (shorter benchmarks).
    ids: restrict sampling to these instruction ids (e.g. a held-out split).
    data_dir: None for the shipped lengths (GPT-2 tokens), or a directory of full answers
      (``<generator>.jsonl``), counted with ``count_tokens``.
    count_tokens: texts -> token counts for full answers; default the shipped GPT-2 tokenizer.

  Returns:
    The trace, in replay order.

  Raises:
    ValueError: more requests asked than records available, a non-positive cap, or a prompt
      that leaves no room for one answer token within ``max_len``.
  """
  if max_output is not None and max_output < 1:
    raise ValueError(f"max_output must be >= 1, got {max_output}")
  records = read_records(generator, data_dir)
  if ids is not None:
    keep = {int(i) for i in ids}
    records = [r for r in records if r["id"] in keep]
  n = len(records) if num_requests is None else num_requests
  if not 0 < n <= len(records):
    raise ValueError(f"asked for {num_requests} requests, but {generator} has {len(records)} records")
  order = np.random.default_rng(seed).permutation(len(records))[:n]
  chosen = [records[i] for i in order]
  prompts = tuple(r["instruction"] for r in chosen)
  if "output_tokens" in chosen[0]:  # the shipped lengths, counted with GPT-2's tokenizer
    if count_tokens is not None:
      raise ValueError(
        "the shipped lengths are GPT-2 token counts; to count with another tokenizer, pass "
        "data_dir=<a directory of full answers, one <generator>.jsonl per model>"
      )
    prompt_lens = np.asarray([r["prompt_tokens"] for r in chosen], np.int64)
    raw = np.asarray([r["output_tokens"] for r in chosen], np.int64)
  else:
    count = count_tokens or gpt2_token_counter()
    prompt_lens = np.asarray(count(prompts), np.int64)
    raw = np.asarray(count([r["output"] for r in chosen]), np.int64)
  room = max_len - prompt_lens
  if (room < 1).any():
    worst = int(prompt_lens.max())
    raise ValueError(f"a prompt of {worst} tokens leaves no room for an answer within {max_len} tokens")
  # An empty answer still costs one generated token (the EOS) in a real server.
  out = np.clip(np.minimum(raw, room), 1, None)
  if max_output is not None:
    out = np.minimum(out, max_output)
  return Trace(
    generator=generator,
    ids=np.asarray([r["id"] for r in chosen]),
    prompts=prompts,
    prompt_lens=prompt_lens,
    output_lens=out,
    raw_output_lens=raw,
    max_len=max_len,
    max_output=max_output,
  )
