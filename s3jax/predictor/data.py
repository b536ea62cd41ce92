"""Length data: prompts and each generator's answer length, for training the length predictor.

Output lengths are counted in tokens of the served model's tokenizer (GPT-2 BPE by default,
committed at `checkpoints/gpt2-tokenizer/`). Three sources:

- `load_length_data()`: the shipped lengths, `data/alpaca_eval/lengths.jsonl` (678 AlpacaEval
  instructions x 15 generators, GPT-2 tokens).
- `load_length_data(data_dir)`: a directory of full answers, one `<generator>.jsonl` per model (the
  user format below; every record needs an `id`, and the generator is always the file's name).
  Counting 15 x 678 answers takes a while on 2 cores, so counts are cached in a small `.npz` keyed by
  the files' sizes and the tokenizer.
- `load_user_lengths(paths)`: one or more files in the user format below.

`merge_length_data(mine, load_length_data())` adds the shipped generators to a user's data, and
`describe(data, split)` says in a few lines what a training run will use.

User format
-----------

JSON Lines (UTF-8): one JSON object per line, each one generator's answer to one prompt. Blank lines
are skipped. For example:

  {"id": 17, "instruction": "How do I wrap a present?", "output": "Start with...", "generator": "my-llm"}
  {"id": "ticket-9", "instruction": "Summarise this email: ...", "output_tokens": 212}
  {"instruction": "What is some cool music from the 1920s?", "output_tokens": {"gpt4": 212, "my-llm": 340}}

Fields:

- `instruction` (string, required): the prompt text; must not be blank.
- exactly one of:
  - `output` (string): the answer text. Its tokens are counted with the served model's tokenizer
    (`tokenizer_dir`, the shipped GPT-2 BPE by default), without special tokens.
  - `output_tokens`: the answer's length in the served model's tokens, a whole number >= 0 (not a
    boolean, not 12.0); or an object {generator: whole number >= 0} giving several generators' lengths
    for this prompt at once. The object form is the shipped `data/alpaca_eval/lengths.jsonl`'s, so
    that file is itself a valid user file. A record with the object form has no `generator` field.
- `generator` (string, optional, not blank): the model that gave the answer. Default: the file's stem
  (`my_model.jsonl` -> `my_model`).
- `id` (integer or string, optional): records with the same id are the same prompt and must have the
  same instruction text (after `.strip()`). Ids compare as text: `7` and `"7"` are the same prompt.
  Records without an id are the same prompt when their instruction texts are equal after `.strip()`;
  such a record joins the prompt with an id whose instruction is that text, if there is one.
- Any other field (`dataset`, `prompt_tokens`, ...) is ignored; `prompt_tokens` is always recounted
  from the instruction.

The prompts are the union over all files. A generator answers a prompt at most once: the same
(prompt, generator) twice is an error. Where a generator did not answer a prompt, its length is -1
(`LengthData.observed` is False there). Prompts are sorted by id; the ids are 62-bit integers taken
from the sha1 of the record's `id` (of the stripped instruction when there is none), so the ids, and
with them `split_by_id`'s split, are the same on every run and machine.

A malformed file raises `ValueError` naming the file, the line (1-based), what is wrong and how to fix
it: invalid JSON, a line that is not an object, a missing, blank or non-string `instruction`, neither
or both of `output` and `output_tokens`, a token count that is negative, not whole or a boolean, a
non-string `generator` or `id`, one id with two different instructions, the same (prompt, generator)
twice (both lines are named). A file with no records is a `ValueError`; a missing file a
`FileNotFoundError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np

from s3jax.assets import GPT2_TOKENIZER_DIR, LENGTHS_FILE

DEFAULT_TOKENIZER_DIR = GPT2_TOKENIZER_DIR
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "s3jax" / "predictor"
DEFAULT_GENERATOR = "llama-2-7b-chat-hf"
MISSING = -1  # `LengthData.lengths` where a generator did not answer a prompt
SHIPPED_TOKENIZER = "GPT-2 BPE (50257 tokens, checkpoints/gpt2-tokenizer)"
_MAX_COUNT = 2**31 - 1  # lengths are int32
_EXAMPLE = '{"instruction": "...", "output": "..."}'
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
                    tokenizer=SHIPPED_TOKENIZER)


# --- Reading the user format -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Answer:
  """One generator's answer to one prompt, as read from one line (an `output_tokens` object gives
  several)."""

  where: str  # "file:line", for error messages
  raw_id: int | str | None
  instruction: str
  generator: str
  output: str | None  # the text to count, or None when `tokens` is given
  tokens: int | None


def _show(value) -> str:
  """A JSON value as the user wrote it, shortened, for error messages."""
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value) -> str:
  for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                     (list, "an array"), (dict, "an object"), (type(None), "null")):
    if isinstance(value, kind):
      return name
  return type(value).__name__


def _read_records(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
  """(1-based line number, record) for each non-blank line; errors name the file and line."""
  if path.is_dir():
    raise IsADirectoryError(f"{str(path)!r} is a directory; pass its .jsonl files, or the directory to "
                            "load_length_data(data_dir)")
  if not path.is_file():
    raise FileNotFoundError(f"length data file {str(path)!r} does not exist")
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:  # A BOM (Windows editors) would otherwise make line 1 invalid JSON.
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start}); save the file "
                         "as UTF-8 JSON Lines") from None
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg}, column {e.colno}); each line must be "
                         f"one complete JSON object, e.g. {_EXAMPLE}") from None
      if not isinstance(record, dict):
        hint = " (a JSON array file? write one object per line instead)" if isinstance(record, list) else ""
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {_json_type(record)}{hint}; each "
                         f"line must be one record like {_EXAMPLE}")
      yield line_no, record


def _count(value, field: str, fail) -> int:
  """A token count from the user: a whole number in [0, 2**31)."""
  if isinstance(value, bool) or not isinstance(value, int):
    fail(f"{field} must be a whole number of tokens >= 0, got {_json_type(value)} {_show(value)}"
         + ("; write it without a decimal point" if isinstance(value, float) and value.is_integer() else ""))
  if value < 0:
    fail(f"{field} is {value}; a length must be >= 0 (leave the record out if the generator has no "
         "answer for this prompt)")
  if value > _MAX_COUNT:
    fail(f"{field} is {value}, more than {_MAX_COUNT} tokens; is it a length in tokens?")
  return value


def _parse_record(path: pathlib.Path, line_no: int, record: dict, default_generator: str) -> list[_Answer]:
  where = f"{path}:{line_no}"

  def fail(message: str):
    raise ValueError(f"{where}: {message}")

  if "instruction" not in record:
    fail(f'missing "instruction" (the prompt text); each record needs one, e.g. {_EXAMPLE}')
  instruction = record["instruction"]
  if not isinstance(instruction, str):
    fail(f'"instruction" must be a string (the prompt text), got {_json_type(instruction)} {_show(instruction)}')
  if not instruction.strip():
    fail('"instruction" is blank; give the prompt text, or delete the line')

  raw_id = record.get("id")
  if "id" in record and (isinstance(raw_id, bool) or not isinstance(raw_id, (int, str))
                         or (isinstance(raw_id, str) and not raw_id.strip())):
    fail(f'"id" must be an integer or a non-blank string, got {_json_type(raw_id)} {_show(raw_id)}; or drop '
         '"id" to match prompts by their instruction text')

  generator = default_generator
  if "generator" in record:
    generator = record["generator"]
    if not isinstance(generator, str) or not generator.strip():
      fail(f'"generator" must be a non-blank string (the model that answered), got {_json_type(generator)} '
           f'{_show(generator)}; or drop it to use the file name "{default_generator}"')

  has_output, has_tokens = "output" in record, "output_tokens" in record
  if has_output and has_tokens:
    fail('give either "output" (the answer text) or "output_tokens" (its length in tokens), not both')
  if not has_output and not has_tokens:
    unknown = sorted(set(record) - {"id", "instruction", "generator", "dataset", "prompt_tokens"})
    fail('missing the answer: add "output" (the answer text; its tokens are counted) or "output_tokens" '
         "(its length in the served model's tokens)" + (f"; unrecognised fields: {unknown}" if unknown else ""))
  new = lambda gen, output, tokens: _Answer(where=where, raw_id=raw_id, instruction=instruction,
                                            generator=gen, output=output, tokens=tokens)
  if has_output:
    output = record["output"]
    if not isinstance(output, str):
      fail(f'"output" must be a string (the answer text), got {_json_type(output)} {_show(output)}; to give '
           'the length in tokens use "output_tokens"')
    return [new(generator, output, None)]
  tokens = record["output_tokens"]
  if not isinstance(tokens, dict):
    return [new(generator, None, _count(tokens, '"output_tokens"', fail))]
  if "generator" in record:
    fail('"output_tokens" is an object {generator: count}, which names the generators itself; drop '
         '"generator", or give one count: "output_tokens": 212')
  if not tokens:
    fail('"output_tokens" is an empty object; give {generator: count} for at least one generator, or delete '
         "the line")
  answers = []
  for gen, count in tokens.items():
    if not gen.strip():
      fail('"output_tokens" has a blank generator name; its keys are the generators\' names')
    answers.append(new(gen, None, _count(count, f'"output_tokens"[{_show(gen)}]', fail)))
  return answers


def _parse_file(path: pathlib.Path, default_generator: str) -> list[_Answer]:
  answers = [a for line_no, record in _read_records(path)
             for a in _parse_record(path, line_no, record, default_generator)]
  if not answers:
    raise ValueError(f"{path}: no records (the file is empty or blank); add one JSON object per line, e.g. "
                     f"{_EXAMPLE}")
  return answers


@dataclasses.dataclass
class _Prompt:
  key: str  # "id:<id>" or "text:<stripped instruction>": what the stable id hashes
  raw_id: int | str | None
  text: str  # the instruction as first given
  where: str


def _group(answers: list[_Answer]) -> tuple[list[_Prompt], list[int]]:
  """The distinct prompts (in order of first appearance) and each answer's prompt index.

  Records with an id are grouped first, so that a record without one can join the prompt with an id
  whose instruction it repeats, wherever that record sits in the files.
  """
  prompts: list[_Prompt] = []
  by_key: dict[str, int] = {}
  with_id_by_text: dict[str, list[int]] = {}
  row = [-1] * len(answers)
  for i, a in enumerate(answers):
    if a.raw_id is None:
      continue
    key = f"id:{a.raw_id}"
    if key not in by_key:
      by_key[key] = len(prompts)
      with_id_by_text.setdefault(a.instruction.strip(), []).append(len(prompts))
      prompts.append(_Prompt(key=key, raw_id=a.raw_id, text=a.instruction, where=a.where))
    p = prompts[by_key[key]]
    if a.instruction.strip() != p.text.strip():
      raise ValueError(f"{a.where}: id {_show(a.raw_id)} has the instruction {_show(a.instruction.strip())}, "
                       f"but at {p.where} it has {_show(p.text.strip())}; records with the same id must be the "
                       "same prompt: fix the id or the text")
    row[i] = by_key[key]
  for i, a in enumerate(answers):
    if a.raw_id is not None:
      continue
    text = a.instruction.strip()
    matches = with_id_by_text.get(text, [])
    if len(matches) > 1:
      ids = " and ".join(f"{_show(prompts[p].raw_id)} ({prompts[p].where})" for p in matches)
      raise ValueError(f"{a.where}: this record has no id and its instruction is that of the ids {ids}; give "
                       "it the id of the prompt it answers")
    if matches:
      row[i] = matches[0]
      continue
    key = f"text:{text}"
    if key not in by_key:
      by_key[key] = len(prompts)
      prompts.append(_Prompt(key=key, raw_id=None, text=a.instruction, where=a.where))
    row[i] = by_key[key]
  seen: dict[tuple[int, str], str] = {}
  for a, r in zip(answers, row):
    first = seen.setdefault((r, a.generator), a.where)
    if first != a.where:
      raise ValueError(f"{first} and {a.where} both give generator {a.generator!r}'s answer to the prompt "
                       f"{_show(prompts[r].text.strip())}; keep one of them (a generator answers a prompt "
                       "at most once)")
  return prompts, row


def stable_id(key: str) -> int:
  """A 62-bit id from the sha1 of `key`: the same on every run and machine (Python's `hash` is not),
  and non-negative in int64 with room to spare."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") >> 2


def _is_shipped_tokenizer(tokenizer_dir: str | os.PathLike) -> bool:
  return pathlib.Path(tokenizer_dir).resolve() == pathlib.Path(DEFAULT_TOKENIZER_DIR).resolve()


def _counter(tokenizer_dir: str | os.PathLike):
  """(count, name): count(texts) -> int32 token counts (no special tokens), and the tokenizer's name."""
  from s3jax.tokenizer import load_tokenizer

  shipped = _is_shipped_tokenizer(tokenizer_dir)
  # None is the shipped BPE built with `tokenizers`: the same counts without importing transformers.
  tok = load_tokenizer(None if shipped else tokenizer_dir)
  directory = pathlib.Path(tokenizer_dir).resolve()
  name = SHIPPED_TOKENIZER if shipped else f"{directory.name} ({len(tok)} tokens, {directory})"

  def count(texts: list[str]) -> np.ndarray:
    if not texts:
      return np.zeros(0, np.int32)
    return np.asarray([len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]], np.int32)

  return count, name


def _count_lengths(answers: list[_Answer], row: list[int], prompts: list[_Prompt], generators: tuple[str, ...],
                   count) -> tuple[np.ndarray, np.ndarray]:
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


def load_user_lengths(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                      tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER_DIR) -> LengthData:
  """Answer lengths from one or more files in the user format (see the module docstring).

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
  answers = [a for p in _as_paths(paths) for a in _parse_file(p, default_generator=p.stem)]
  prompts, row = _group(answers)
  ids = np.asarray([stable_id(p.key) for p in prompts], np.int64)
  if len(np.unique(ids)) != len(ids):  # 62-bit sha1 prefixes: never in practice, but a split would break
    raise ValueError("two prompts got the same 62-bit id; give the colliding records explicit ids")
  generators = tuple(sorted({a.generator for a in answers}))
  count, name = _counter(tokenizer_dir)
  lengths, prompt_tokens = _count_lengths(answers, row, prompts, generators, count)
  order = np.argsort(ids)
  return LengthData(ids=ids[order], prompts=tuple(prompts[i].text for i in order), generators=generators,
                    lengths=lengths[order], prompt_tokens=prompt_tokens[order], tokenizer=name)


def load_length_data(data_dir: str | pathlib.Path | None = None,
                     tokenizer_dir: str | pathlib.Path = DEFAULT_TOKENIZER_DIR,
                     cache_dir: str | pathlib.Path | None = DEFAULT_CACHE_DIR,
                     generators: list[str] | None = None) -> LengthData:
  """Every generator's answer lengths, aligned by instruction id.

  Args:
    data_dir: None for the shipped lengths (GPT-2 tokens); else a directory of answers, one
      ``<generator>.jsonl`` per model in the user format (module docstring) where every record has an
      ``id`` and the generator is the file's name. Texts are counted with ``tokenizer_dir`` (cached in
      ``cache_dir``). The prompts are the union of the files' ids (-1 where a file lacks one); the ids
      are the files' own when all are integers, else the user format's stable ids.
    generators: keep only these.
  """
  if data_dir is None:
    if not _is_shipped_tokenizer(tokenizer_dir):
      raise ValueError(f"the shipped lengths are GPT-2 tokens; to count with {str(tokenizer_dir)!r}, pass a "
                       f"directory of full answers (one <generator>.jsonl per model) as data_dir / --data")
    return _shipped_length_data(generators)
  data_dir = pathlib.Path(data_dir).resolve()
  files = sorted(data_dir.glob("*.jsonl"))
  if generators is not None:
    files = [f for f in files if f.stem in set(generators)]
  if not files:
    raise FileNotFoundError(f"no *.jsonl generator files in {data_dir}")
  answers = []
  for f in files:
    for a in _parse_file(f, default_generator=f.stem):
      if a.raw_id is None:
        raise ValueError(f'{a.where}: missing "id"; a data directory aligns answers by id, so every record '
                         "needs one (or load the files with load_user_lengths, which matches by instruction)")
      if a.generator != f.stem:
        raise ValueError(f"{a.where}: generator {a.generator!r} in {f.name}; in a data directory the file name "
                         f"is the generator: rename the file or load it with load_user_lengths")
      answers.append(a)
  prompts, row = _group(answers)
  if all(isinstance(p.raw_id, int) for p in prompts):  # e.g. AlpacaEval's indices, which splits depend on
    ids = np.asarray([p.raw_id for p in prompts], np.int64)
  else:
    ids = np.asarray([stable_id(p.key) for p in prompts], np.int64)
  gens = tuple(sorted(f.stem for f in files))

  key = hashlib.sha1(json.dumps(
      [_CACHE_VERSION, str(pathlib.Path(tokenizer_dir).resolve())]
      + [(f.name, f.stat().st_size) for f in files]).encode())
  cache = (pathlib.Path(cache_dir) / f"lengths-{key.hexdigest()[:16]}.npz" if cache_dir else None)
  if cache and cache.exists():
    z = np.load(cache)
    lengths, prompt_tokens, name = z["lengths"], z["prompt_tokens"], str(z["tokenizer"])
  else:
    count, name = _counter(tokenizer_dir)
    lengths, prompt_tokens = _count_lengths(answers, row, prompts, gens, count)
    if cache:
      cache.parent.mkdir(parents=True, exist_ok=True)
      np.savez(cache, lengths=lengths, prompt_tokens=prompt_tokens, tokenizer=np.asarray(name))
  order = np.argsort(ids)
  return LengthData(ids=ids[order], prompts=tuple(prompts[i].text for i in order), generators=gens,
                    lengths=lengths[order], prompt_tokens=prompt_tokens[order], tokenizer=name)


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
    raise ValueError(f"generator(s) {both} are in both data sets; a generator's lengths must come from one of "
                     "them: rename it in one (its files' \"generator\" field or file name) or leave one out")
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
      raise ValueError(f"the instruction {_show(ambiguous[0])} is in both data sets but more than once in the "
                       f"{name}, so its rows cannot be matched by text; give it once")
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
    names = [_show(prompts[r].strip()) for r in np.flatnonzero(ids == dup)]
    raise ValueError(f"id {dup} names different prompts in the two data sets ({' and '.join(names)}); load the "
                     "user files with load_user_lengths, whose ids are 62-bit hashes that do not collide")
  generators = tuple(sorted(a.generators + b.generators))
  lengths = np.full((len(ids), len(generators)), MISSING, np.int32)
  for j, g in enumerate(generators):
    if g in a.generators:
      lengths[:n_a, j] = a.lengths[:, a.generator_index(g)]
    else:
      rows = np.asarray(b_of)
      has = rows >= 0
      lengths[has, j] = b.lengths[rows[has], b.generator_index(g)]
  prompt_tokens = np.concatenate([np.asarray(a.prompt_tokens, np.int32),
                                  np.asarray(b.prompt_tokens, np.int32)[extra]])
  tokenizer = (a.tokenizer if a.tokenizer == b.tokenizer else
               f"{a.tokenizer} for {', '.join(a.generators)}; {b.tokenizer} for {', '.join(b.generators)}")
  order = np.argsort(ids)
  return LengthData(ids=ids[order], prompts=tuple(prompts[i] for i in order), generators=generators,
                    lengths=lengths[order], prompt_tokens=prompt_tokens[order], tokenizer=tokenizer)


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
    raise ValueError(f"test_frac={test_frac} and calib_frac={calib_frac} leave no training prompt out of "
                     f"{len(ids)} ({n_test} test, {n_calib} calibration); lower them or add prompts")
  return Split(train=np.sort(rest[n_calib:]), calib=np.sort(rest[:n_calib]),
               test=np.sort(test))


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
    lines.append(f"split: {len(split.train)} train / {len(split.calib)} calibration / {len(split.test)} test "
                 "prompts")
  return "\n".join(lines)
