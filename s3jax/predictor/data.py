"""Length data: prompts and each generator's answer length, for training the length predictor.

Output lengths are counted in tokens of the served model's tokenizer (GPT-2 BPE by default,
committed at `checkpoints/gpt2-tokenizer/`). Three sources:

- `load_length_data()`: the shipped lengths, `data/alpaca_eval/lengths.jsonl` (678 AlpacaEval
  instructions x 15 generators, GPT-2 tokens).
- `load_length_data(data_dir)`: a directory of full answers, one `<generator>.jsonl` per model (the
  user format; every record needs an `id`, and the generator is always the file's name).
  Counting 15 x 678 answers takes a while on 2 cores, so counts are cached in a small `.npz` keyed by
  the files' sizes and the tokenizer.
- `load_user_lengths(paths)`: one or more files in the user format.

`merge_length_data(mine, load_length_data())` adds the shipped generators to a user's data, and
`describe(data, split)` says in a few lines what a training run will use.

The user format (its fields, how records become prompts and ids, its errors) is documented and read in
`s3jax.predictor.records`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np

from s3jax.assets import LENGTHS_FILE
from s3jax.predictor.records import (
  DEFAULT_TOKENIZER_DIR,
  SHIPPED_TOKENIZER,
  Answer,
  Prompt,
  group_prompts,
  is_shipped_tokenizer,
  parse_file,
  show_json,
  stable_id,
  token_counter,
)

DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "s3jax" / "predictor"
DEFAULT_GENERATOR = "llama-2-7b-chat-hf"
MISSING = -1  # `LengthData.lengths` where a generator did not answer a prompt
# Bumped when what the directory loader caches changes meaning (v2: union of the files' prompts).
_CACHE_VERSION = "v2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthData:
  """Prompts and output lengths, aligned by instruction id.

  Attributes:
    ids: [P] instruction ids (int64), sorted.
    prompts: P instruction strings.
    generators: G generator names (sorted).
    lengths: [P, G] output length in served-model tokens; -1 (`MISSING`) where that generator has no
      answer for that prompt (a user's data need not cover every pair; the shipped data does).
    prompt_tokens: [P] prompt length in served-model tokens.
    tokenizer: name of the tokenizer that counted the tokens.

  `observed` ([P, G] bool) is True where a length exists; train and evaluate on those entries only.
  """

  ids: np.ndarray
  prompts: tuple[str, ...]
  generators: tuple[str, ...]
  lengths: np.ndarray
  prompt_tokens: np.ndarray
  tokenizer: str

  @property
  def observed(self) -> np.ndarray:
    """[P, G] bool: True where the generator answered the prompt (`lengths >= 0`)."""
    return self.lengths >= 0

  def generator_index(self, name: str) -> int:
    if name not in self.generators:
      raise KeyError(f"unknown generator {name!r}; have {self.generators}")
    return self.generators.index(name)

  def subset(self, rows: np.ndarray) -> LengthData:
    return dataclasses.replace(
      self,
      ids=self.ids[rows],
      prompts=tuple(self.prompts[i] for i in rows),
      lengths=self.lengths[rows],
      prompt_tokens=self.prompt_tokens[rows],
    )


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
    raise FileNotFoundError(
      f"none of the generators {generators} in {LENGTHS_FILE}; have {sorted(rows[0]['output_tokens'])}"
    )
  return LengthData(
    ids=np.asarray([r["id"] for r in rows]),
    prompts=tuple(r["instruction"] for r in rows),
    generators=gens,
    lengths=np.asarray([[r["output_tokens"][g] for g in gens] for r in rows], np.int32),
    prompt_tokens=np.asarray([r["prompt_tokens"] for r in rows], np.int32),
    tokenizer=SHIPPED_TOKENIZER,
  )


def _count_lengths(
  answers: list[Answer], row: list[int], prompts: list[Prompt], generators: tuple[str, ...], count
) -> tuple[np.ndarray, np.ndarray]:
  """[P, G] lengths (-1 where missing) and [P] prompt tokens, in the order of `prompts`."""
  texts = [a.output for a in answers if a.output is not None]
  counted = iter(count(texts).tolist())
  lengths = np.full((len(prompts), len(generators)), MISSING, np.int32)
  col = {g: j for j, g in enumerate(generators)}
  for a, r in zip(answers, row):
    lengths[r, col[a.generator]] = a.tokens if a.output is None else next(counted)
  return lengths, count([p.text for p in prompts])


def _as_paths(paths) -> list[pathlib.Path]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [pathlib.Path(p) for p in paths]
  if not paths:
    raise ValueError("no length data files given; pass one or more .jsonl files")
  seen: dict[pathlib.Path, pathlib.Path] = {}
  for p in paths:
    if p.resolve() in seen:
      raise ValueError(f"{str(p)!r} is given twice (also as {str(seen[p.resolve()])!r}); pass each file once")
    seen[p.resolve()] = p
  return paths


def load_user_lengths(
  paths: str | os.PathLike | Iterable[str | os.PathLike], *, tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER_DIR
) -> LengthData:
  """Answer lengths from one or more files in the user format (see `s3jax.predictor.records`).

  Args:
    paths: a .jsonl file or several; a generator may span files and a file may hold several generators.
    tokenizer_dir: the served model's tokenizer (a Hugging Face tokenizer directory); it counts the
      `output` texts and the prompts. `output_tokens` counts are taken as given, in its tokens.

  Returns:
    The union of the files' prompts, sorted by their stable ids; -1 where a generator did not answer.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: a malformed record (the message names the file and line) or a file with no records.
  """
  answers = [a for p in _as_paths(paths) for a in parse_file(p, default_generator=p.stem)]
  prompts, row = group_prompts(answers)
  ids = np.asarray([stable_id(p.key) for p in prompts], np.int64)
  if len(np.unique(ids)) != len(ids):  # 62-bit sha1 prefixes: never in practice, but a split would break
    raise ValueError("two prompts got the same 62-bit id; give the colliding records explicit ids")
  generators = tuple(sorted({a.generator for a in answers}))
  count, name = token_counter(tokenizer_dir)
  lengths, prompt_tokens = _count_lengths(answers, row, prompts, generators, count)
  order = np.argsort(ids)
  return LengthData(
    ids=ids[order],
    prompts=tuple(prompts[i].text for i in order),
    generators=generators,
    lengths=lengths[order],
    prompt_tokens=prompt_tokens[order],
    tokenizer=name,
  )


def load_length_data(
  data_dir: str | pathlib.Path | None = None,
  tokenizer_dir: str | pathlib.Path = DEFAULT_TOKENIZER_DIR,
  cache_dir: str | pathlib.Path | None = DEFAULT_CACHE_DIR,
  generators: list[str] | None = None,
) -> LengthData:
  """Every generator's answer lengths, aligned by instruction id.

  Args:
    data_dir: None for the shipped lengths (GPT-2 tokens); else a directory of answers, one
      ``<generator>.jsonl`` per model in the user format (`s3jax.predictor.records`) where every record has an
      ``id`` and the generator is the file's name. Texts are counted with ``tokenizer_dir`` (cached in
      ``cache_dir``). The prompts are the union of the files' ids (-1 where a file lacks one); the ids
      are the files' own when all are integers, else the user format's stable ids.
    generators: keep only these.
  """
  if data_dir is None:
    if not is_shipped_tokenizer(tokenizer_dir):
      raise ValueError(
        f"the shipped lengths are GPT-2 tokens; to count with {str(tokenizer_dir)!r}, pass a "
        f"directory of full answers (one <generator>.jsonl per model) as data_dir / --data"
      )
    return _shipped_length_data(generators)
  data_dir = pathlib.Path(data_dir).resolve()
  files = sorted(data_dir.glob("*.jsonl"))
  if generators is not None:
    files = [f for f in files if f.stem in set(generators)]
  if not files:
    raise FileNotFoundError(f"no *.jsonl generator files in {data_dir}")
  answers = []
  for f in files:
    for a in parse_file(f, default_generator=f.stem):
      if a.raw_id is None:
        raise ValueError(
          f'{a.where}: missing "id"; a data directory aligns answers by id, so every record '
          "needs one (or load the files with load_user_lengths, which matches by instruction)"
        )
      if a.generator != f.stem:
        raise ValueError(
          f"{a.where}: generator {a.generator!r} in {f.name}; in a data directory the file name "
          f"is the generator: rename the file or load it with load_user_lengths"
        )
      answers.append(a)
  prompts, row = group_prompts(answers)
  if all(isinstance(p.raw_id, int) for p in prompts):  # e.g. AlpacaEval's indices, which splits depend on
    ids = np.asarray([p.raw_id for p in prompts], np.int64)
  else:
    ids = np.asarray([stable_id(p.key) for p in prompts], np.int64)
  gens = tuple(sorted(f.stem for f in files))

  key = hashlib.sha1(
    json.dumps(
      [_CACHE_VERSION, str(pathlib.Path(tokenizer_dir).resolve())] + [(f.name, f.stat().st_size) for f in files]
    ).encode()
  )
  cache = pathlib.Path(cache_dir) / f"lengths-{key.hexdigest()[:16]}.npz" if cache_dir else None
  if cache and cache.exists():
    z = np.load(cache)
    lengths, prompt_tokens, name = z["lengths"], z["prompt_tokens"], str(z["tokenizer"])
  else:
    count, name = token_counter(tokenizer_dir)
    lengths, prompt_tokens = _count_lengths(answers, row, prompts, gens, count)
    if cache:
      cache.parent.mkdir(parents=True, exist_ok=True)
      np.savez(cache, lengths=lengths, prompt_tokens=prompt_tokens, tokenizer=np.asarray(name))
  order = np.argsort(ids)
  return LengthData(
    ids=ids[order],
    prompts=tuple(prompts[i].text for i in order),
    generators=gens,
    lengths=lengths[order],
    prompt_tokens=prompt_tokens[order],
    tokenizer=name,
  )


def merge_length_data(a: LengthData, b: LengthData) -> LengthData:
  """`a` and `b` together: the union of their prompts and of their generators.

  Prompts are matched by instruction text after `.strip()`, so a user's answers to shipped AlpacaEval
  instructions share the shipped rows: ``merge_length_data(load_user_lengths([f]), load_length_data())``.
  A matched prompt keeps `a`'s id, text and prompt_tokens; the others keep their own. Lengths are not
  converted: if `a` and `b` were counted with different tokenizers, `tokenizer` names both and each
  generator keeps its own units. Entries neither gives are -1.

  Raises:
    ValueError: a generator is in both; an instruction is in both but twice in one of them (ambiguous);
      two different prompts end up with the same id.
  """
  both = sorted(set(a.generators) & set(b.generators))
  if both:
    raise ValueError(
      f"generator(s) {both} are in both data sets; a generator's lengths must come from one of "
      'them: rename it in one (its files\' "generator" field or file name) or leave one out'
    )
  texts_a = [p.strip() for p in a.prompts]
  texts_b = [p.strip() for p in b.prompts]
  row_a: dict[str, int] = {}
  for i, t in enumerate(texts_a):
    row_a.setdefault(t, i)
  row_b: dict[str, int] = {}
  for i, t in enumerate(texts_b):
    row_b.setdefault(t, i)
  for texts, rows, other, name in ((texts_a, row_a, row_b, "first"), (texts_b, row_b, row_a, "second")):
    # Twice in one data set is fine (e.g. two ids) unless the other one has it too: which row would match?
    ambiguous = [t for i, t in enumerate(texts) if rows[t] != i and t in other]
    if ambiguous:
      raise ValueError(
        f"the instruction {show_json(ambiguous[0])} is in both data sets but more than once in the "
        f"{name}, so its rows cannot be matched by text; give it once"
      )
  # Rows: all of a's, then b's unmatched ones; b_of[r] is b's row for merged row r, or -1.
  b_of = [row_b.get(t, -1) for t in texts_a]
  extra = [i for i, t in enumerate(texts_b) if t not in row_a]
  b_of += extra
  n_a = len(a.prompts)
  ids = np.concatenate([np.asarray(a.ids, np.int64), np.asarray(b.ids, np.int64)[extra]])
  prompts = list(a.prompts) + [b.prompts[i] for i in extra]
  if len(np.unique(ids)) != len(ids):
    vals, counts = np.unique(ids, return_counts=True)
    dup = int(vals[counts > 1][0])
    names = [show_json(prompts[r].strip()) for r in np.flatnonzero(ids == dup)]
    raise ValueError(
      f"id {dup} names different prompts in the two data sets ({' and '.join(names)}); load the "
      "user files with load_user_lengths, whose ids are 62-bit hashes that do not collide"
    )
  generators = tuple(sorted(a.generators + b.generators))
  lengths = np.full((len(ids), len(generators)), MISSING, np.int32)
  for j, g in enumerate(generators):
    if g in a.generators:
      lengths[:n_a, j] = a.lengths[:, a.generator_index(g)]
    else:
      rows = np.asarray(b_of)
      has = rows >= 0
      lengths[has, j] = b.lengths[rows[has], b.generator_index(g)]
  prompt_tokens = np.concatenate([np.asarray(a.prompt_tokens, np.int32), np.asarray(b.prompt_tokens, np.int32)[extra]])
  tokenizer = (
    a.tokenizer
    if a.tokenizer == b.tokenizer
    else f"{a.tokenizer} for {', '.join(a.generators)}; {b.tokenizer} for {', '.join(b.generators)}"
  )
  order = np.argsort(ids)
  return LengthData(
    ids=ids[order],
    prompts=tuple(prompts[i] for i in order),
    generators=generators,
    lengths=lengths[order],
    prompt_tokens=prompt_tokens[order],
    tokenizer=tokenizer,
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
  """Row indices of a deterministic split by instruction id."""

  train: np.ndarray
  calib: np.ndarray
  test: np.ndarray


def split_by_id(ids: np.ndarray, *, seed: int = 0, test_frac: float = 0.2, calib_frac: float = 0.15) -> Split:
  """80/20 train/test by id; `calib_frac` of train is kept for calibration.

  The calibration rows never get gradient steps: they choose the best epoch
  and fit the safety-margin threshold, so the test rows stay untouched. The
  split depends only on the ids and the seed, not on file order.

  Raises:
    ValueError: a fraction outside [0, 1), or one that leaves no training prompt.
  """
  for name, frac in (("test_frac", test_frac), ("calib_frac", calib_frac)):
    if not 0 <= frac < 1:  # also rejects NaN
      raise ValueError(f"{name} must be in [0, 1) (a fraction of the prompts), got {frac}")
  order = np.argsort(ids)
  perm = order[np.random.default_rng(seed).permutation(len(ids))]
  n_test = int(round(test_frac * len(ids)))
  test, rest = perm[:n_test], perm[n_test:]
  n_calib = int(round(calib_frac * len(rest)))
  if len(rest) - n_calib < 1:
    raise ValueError(
      f"test_frac={test_frac} and calib_frac={calib_frac} leave no training prompt out of "
      f"{len(ids)} ({n_test} test, {n_calib} calibration); lower them or add prompts"
    )
  return Split(train=np.sort(rest[n_calib:]), calib=np.sort(rest[:n_calib]), test=np.sort(test))


def user_split_by_text(paths, *, seed: int = 0) -> dict[str, str]:
  """Each stripped instruction of user-format files -> "train", "calib" or "test": the split a head
  trained on them by ``scripts/train_predictor.py --data-file`` used (``load_user_lengths``' stable
  ids, ``split_by_id``'s default fractions). Those ids are not AlpacaEval's integer ids, so this
  split is not the shipped data's one: a script judging such a head must ask this, not re-split."""
  data = load_user_lengths(paths)
  split = split_by_id(data.ids, seed=seed)
  return {data.prompts[i].strip(): name for name in ("train", "calib", "test") for i in getattr(split, name)}


def describe(data: LengthData, split: Split | None = None) -> str:
  """A few lines for logs: prompts, each generator's answered prompts and median length, what is
  missing, and the split's sizes if given."""
  observed = data.observed
  missing = int((~observed).sum())
  lines = [f"{len(data.prompts)} prompts x {len(data.generators)} generators, lengths in {data.tokenizer}"]
  width = max([len("generator")] + [len(g) for g in data.generators])
  lines.append(f"  {'generator':<{width}}  answered  median length")
  for j, g in enumerate(data.generators):
    seen = data.lengths[observed[:, j], j]
    median = f"{np.median(seen):.0f}" if len(seen) else "-"
    lines.append(f"  {g:<{width}}  {len(seen):>8}  {median:>13}")
  lines.append(f"missing: {missing} of {observed.size} (prompt, generator) lengths")
  if split is not None:
    lines.append(f"split: {len(split.train)} train / {len(split.calib)} calibration / {len(split.test)} test prompts")
  return "\n".join(lines)
