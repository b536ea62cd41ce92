"""Length data: alpaca_eval prompts and each generator's answer length.

Output lengths are counted in tokens of the served model's tokenizer (GPT-2
BPE by default, committed at `checkpoints/gpt2-tokenizer/`). Counting 15 x
678 answers takes a while on 2 cores, so counts are cached in a small `.npz`
keyed by the data files' sizes and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from s3jax.assets import GPT2_TOKENIZER_DIR, LENGTHS_FILE

DEFAULT_TOKENIZER_DIR = GPT2_TOKENIZER_DIR
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "s3jax" / "predictor"
DEFAULT_GENERATOR = "llama-2-7b-chat-hf"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthData:
  """Prompts and output lengths, aligned by instruction id.

  Attributes:
    ids: [P] instruction ids, sorted.
    prompts: P instruction strings.
    generators: G generator names (sorted).
    lengths: [P, G] output length in served-model tokens.
    prompt_tokens: [P] prompt length in served-model tokens.
    tokenizer: name of the tokenizer that counted the tokens.
  """

  ids: np.ndarray
  prompts: tuple[str, ...]
  generators: tuple[str, ...]
  lengths: np.ndarray
  prompt_tokens: np.ndarray
  tokenizer: str

  def generator_index(self, name: str) -> int:
    if name not in self.generators:
      raise KeyError(f"unknown generator {name!r}; have {self.generators}")
    return self.generators.index(name)

  def subset(self, rows: np.ndarray) -> LengthData:
    return dataclasses.replace(
        self, ids=self.ids[rows], prompts=tuple(self.prompts[i] for i in rows),
        lengths=self.lengths[rows], prompt_tokens=self.prompt_tokens[rows])


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  with path.open() as f:
    return [json.loads(line) for line in f if line.strip()]


def read_shipped_lengths(path: str | pathlib.Path = LENGTHS_FILE) -> list[dict]:
  """The shipped lengths (``data/alpaca_eval/lengths.jsonl``), sorted by id: ``id``, ``dataset``,
  ``instruction``, ``prompt_tokens`` and ``output_tokens`` (generator -> GPT-2 tokens)."""
  return sorted(_read_jsonl(pathlib.Path(path)), key=lambda r: r["id"])


def _shipped_length_data(generators: list[str] | None) -> LengthData:
  rows = read_shipped_lengths()
  gens = tuple(sorted(g for g in rows[0]["output_tokens"] if generators is None or g in set(generators)))
  if not gens:
    raise FileNotFoundError(f"none of the generators {generators} in {LENGTHS_FILE}; have "
                            f"{sorted(rows[0]['output_tokens'])}")
  return LengthData(ids=np.asarray([r["id"] for r in rows]), prompts=tuple(r["instruction"] for r in rows),
                    generators=gens,
                    lengths=np.asarray([[r["output_tokens"][g] for g in gens] for r in rows], np.int32),
                    prompt_tokens=np.asarray([r["prompt_tokens"] for r in rows], np.int32),
                    tokenizer="GPT-2 BPE (50257 tokens, checkpoints/gpt2-tokenizer)")


def load_length_data(data_dir: str | pathlib.Path | None = None,
                     tokenizer_dir: str | pathlib.Path = DEFAULT_TOKENIZER_DIR,
                     cache_dir: str | pathlib.Path | None = DEFAULT_CACHE_DIR,
                     generators: list[str] | None = None) -> LengthData:
  """Every generator's answer lengths, aligned by instruction id.

  Args:
    data_dir: None for the shipped lengths (GPT-2 tokens); else a directory of full answers,
      one ``<generator>.jsonl`` per model, whose tokens are counted with ``tokenizer_dir`` (cached
      in ``cache_dir``).
    generators: keep only these.
  """
  if data_dir is None:
    if pathlib.Path(tokenizer_dir).resolve() != pathlib.Path(DEFAULT_TOKENIZER_DIR).resolve():
      raise ValueError(f"the shipped lengths are GPT-2 tokens; to count with {str(tokenizer_dir)!r}, pass a "
                       f"directory of full answers (one <generator>.jsonl per model) as data_dir / --data")
    return _shipped_length_data(generators)
  data_dir = pathlib.Path(data_dir).resolve()
  files = sorted(data_dir.glob("*.jsonl"))
  if generators is not None:
    files = [f for f in files if f.stem in set(generators)]
  if not files:
    raise FileNotFoundError(f"no *.jsonl generator files in {data_dir}")
  tok_name = f"gpt2-bpe:{pathlib.Path(tokenizer_dir).resolve()}"
  key = hashlib.sha1(json.dumps(
      [tok_name] + [(f.name, f.stat().st_size) for f in files]).encode())
  cache = (pathlib.Path(cache_dir) / f"lengths-{key.hexdigest()[:16]}.npz"
           if cache_dir else None)

  records = {f.stem: {r["id"]: r for r in _read_jsonl(f)} for f in files}
  gens = tuple(sorted(records))
  common = sorted(set.intersection(*(set(r) for r in records.values())))
  prompts = tuple(records[gens[0]][i]["instruction"] for i in common)
  if cache and cache.exists():
    z = np.load(cache)
    lengths, prompt_tokens = z["lengths"], z["prompt_tokens"]
  else:
    from transformers import AutoTokenizer  # Deferred: slow import.
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if len(tok) != 50257:
      raise ValueError(f"expected GPT-2's 50257 tokens, got {len(tok)}")
    count = lambda texts: np.asarray(
        [len(x) for x in tok(list(texts), add_special_tokens=False)
         ["input_ids"]], np.int32)
    lengths = np.stack(
        [count(records[g][i]["output"] for i in common) for g in gens], 1)
    prompt_tokens = count(prompts)
    if cache:
      cache.parent.mkdir(parents=True, exist_ok=True)
      np.savez(cache, lengths=lengths, prompt_tokens=prompt_tokens)
  return LengthData(ids=np.asarray(common), prompts=prompts, generators=gens,
                    lengths=lengths, prompt_tokens=prompt_tokens,
                    tokenizer="GPT-2 BPE (50257 tokens, "
                    "checkpoints/gpt2-tokenizer)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
  """Row indices of a deterministic split by instruction id."""

  train: np.ndarray
  calib: np.ndarray
  test: np.ndarray


def split_by_id(ids: np.ndarray, *, seed: int = 0, test_frac: float = 0.2,
                calib_frac: float = 0.15) -> Split:
  """80/20 train/test by id; `calib_frac` of train is kept for calibration.

  The calibration rows never get gradient steps: they choose the best epoch
  and fit the safety-margin threshold, so the test rows stay untouched. The
  split depends only on the ids and the seed, not on file order.
  """
  order = np.argsort(ids)
  perm = order[np.random.default_rng(seed).permutation(len(ids))]
  n_test = int(round(test_frac * len(ids)))
  test, rest = perm[:n_test], perm[n_test:]
  n_calib = int(round(calib_frac * len(rest)))
  return Split(train=np.sort(rest[n_calib:]), calib=np.sort(rest[:n_calib]),
               test=np.sort(test))
