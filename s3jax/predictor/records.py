"""Length data in the user format: JSON Lines records, read, checked and grouped into prompts.

`parse_file` reads one file into `Answer`s (errors name the file and line), `group_prompts` matches them
into `Prompt`s, `stable_id` gives each prompt its id, and `token_counter` counts texts with the served
model's tokenizer. `s3jax.predictor.data` builds `LengthData` from these (`load_user_lengths`,
`load_length_data(data_dir)`).

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
from collections.abc import Iterator

import numpy as np

from s3jax.assets import GPT2_TOKENIZER_DIR

DEFAULT_TOKENIZER_DIR = GPT2_TOKENIZER_DIR
SHIPPED_TOKENIZER = "GPT-2 BPE (50257 tokens, checkpoints/gpt2-tokenizer)"
_MAX_COUNT = 2**31 - 1  # lengths are int32
_EXAMPLE = '{"instruction": "...", "output": "..."}'


@dataclasses.dataclass(frozen=True)
class Answer:
  """One generator's answer to one prompt, as read from one line (an `output_tokens` object gives
  several)."""

  where: str  # "file:line", for error messages
  raw_id: int | str | None
  instruction: str
  generator: str
  output: str | None  # the text to count, or None when `tokens` is given
  tokens: int | None


def show_json(value) -> str:
  """A JSON value as the user wrote it, shortened, for error messages."""
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value) -> str:
  for kind, name in (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "an object"),
    (type(None), "null"),
  ):
    if isinstance(value, kind):
      return name
  return type(value).__name__


def _read_records(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
  """(1-based line number, record) for each non-blank line; errors name the file and line."""
  if path.is_dir():
    raise IsADirectoryError(
      f"{str(path)!r} is a directory; pass its .jsonl files, or the directory to load_length_data(data_dir)"
    )
  if not path.is_file():
    raise FileNotFoundError(f"length data file {str(path)!r} does not exist")
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:  # A BOM (Windows editors) would otherwise make line 1 invalid JSON.
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8 JSON Lines"
        ) from None
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(
          f"{path}:{line_no}: invalid JSON ({e.msg}, column {e.colno}); each line must be "
          f"one complete JSON object, e.g. {_EXAMPLE}"
        ) from None
      if not isinstance(record, dict):
        hint = " (a JSON array file? write one object per line instead)" if isinstance(record, list) else ""
        raise ValueError(
          f"{path}:{line_no}: expected a JSON object, got {_json_type(record)}{hint}; each "
          f"line must be one record like {_EXAMPLE}"
        )
      yield line_no, record


def _count(value, field: str, fail) -> int:
  """A token count from the user: a whole number in [0, 2**31)."""
  if isinstance(value, bool) or not isinstance(value, int):
    fail(
      f"{field} must be a whole number of tokens >= 0, got {_json_type(value)} {show_json(value)}"
      + ("; write it without a decimal point" if isinstance(value, float) and value.is_integer() else "")
    )
  if value < 0:
    fail(
      f"{field} is {value}; a length must be >= 0 (leave the record out if the generator has no answer for this prompt)"
    )
  if value > _MAX_COUNT:
    fail(f"{field} is {value}, more than {_MAX_COUNT} tokens; is it a length in tokens?")
  return value


def _parse_record(path: pathlib.Path, line_no: int, record: dict, default_generator: str) -> list[Answer]:
  where = f"{path}:{line_no}"

  def fail(message: str):
    raise ValueError(f"{where}: {message}")

  if "instruction" not in record:
    fail(f'missing "instruction" (the prompt text); each record needs one, e.g. {_EXAMPLE}')
  instruction = record["instruction"]
  if not isinstance(instruction, str):
    fail(f'"instruction" must be a string (the prompt text), got {_json_type(instruction)} {show_json(instruction)}')
  if not instruction.strip():
    fail('"instruction" is blank; give the prompt text, or delete the line')

  raw_id = record.get("id")
  if "id" in record and (
    isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)) or (isinstance(raw_id, str) and not raw_id.strip())
  ):
    fail(
      f'"id" must be an integer or a non-blank string, got {_json_type(raw_id)} {show_json(raw_id)}; or drop '
      '"id" to match prompts by their instruction text'
    )

  generator = default_generator
  if "generator" in record:
    generator = record["generator"]
    if not isinstance(generator, str) or not generator.strip():
      fail(
        f'"generator" must be a non-blank string (the model that answered), got {_json_type(generator)} '
        f'{show_json(generator)}; or drop it to use the file name "{default_generator}"'
      )

  has_output, has_tokens = "output" in record, "output_tokens" in record
  if has_output and has_tokens:
    fail('give either "output" (the answer text) or "output_tokens" (its length in tokens), not both')
  if not has_output and not has_tokens:
    unknown = sorted(set(record) - {"id", "instruction", "generator", "dataset", "prompt_tokens"})
    fail(
      'missing the answer: add "output" (the answer text; its tokens are counted) or "output_tokens" '
      "(its length in the served model's tokens)" + (f"; unrecognised fields: {unknown}" if unknown else "")
    )
  new = lambda gen, output, tokens: Answer(
    where=where, raw_id=raw_id, instruction=instruction, generator=gen, output=output, tokens=tokens
  )
  if has_output:
    output = record["output"]
    if not isinstance(output, str):
      fail(
        f'"output" must be a string (the answer text), got {_json_type(output)} {show_json(output)}; to give '
        'the length in tokens use "output_tokens"'
      )
    return [new(generator, output, None)]
  tokens = record["output_tokens"]
  if not isinstance(tokens, dict):
    return [new(generator, None, _count(tokens, '"output_tokens"', fail))]
  if "generator" in record:
    fail(
      '"output_tokens" is an object {generator: count}, which names the generators itself; drop '
      '"generator", or give one count: "output_tokens": 212'
    )
  if not tokens:
    fail('"output_tokens" is an empty object; give {generator: count} for at least one generator, or delete the line')
  answers = []
  for gen, count in tokens.items():
    if not gen.strip():
      fail('"output_tokens" has a blank generator name; its keys are the generators\' names')
    answers.append(new(gen, None, _count(count, f'"output_tokens"[{show_json(gen)}]', fail)))
  return answers


def parse_file(path: pathlib.Path, default_generator: str) -> list[Answer]:
  answers = [
    a for line_no, record in _read_records(path) for a in _parse_record(path, line_no, record, default_generator)
  ]
  if not answers:
    raise ValueError(f"{path}: no records (the file is empty or blank); add one JSON object per line, e.g. {_EXAMPLE}")
  return answers


@dataclasses.dataclass
class Prompt:
  key: str  # "id:<id>" or "text:<stripped instruction>": what the stable id hashes
  raw_id: int | str | None
  text: str  # the instruction as first given
  where: str


def group_prompts(answers: list[Answer]) -> tuple[list[Prompt], list[int]]:
  """The distinct prompts (in order of first appearance) and each answer's prompt index.

  Records with an id are grouped first, so that a record without one can join the prompt with an id
  whose instruction it repeats, wherever that record sits in the files.
  """
  prompts: list[Prompt] = []
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
      prompts.append(Prompt(key=key, raw_id=a.raw_id, text=a.instruction, where=a.where))
    p = prompts[by_key[key]]
    if a.instruction.strip() != p.text.strip():
      raise ValueError(
        f"{a.where}: id {show_json(a.raw_id)} has the instruction {show_json(a.instruction.strip())}, "
        f"but at {p.where} it has {show_json(p.text.strip())}; records with the same id must be the "
        "same prompt: fix the id or the text"
      )
    row[i] = by_key[key]
  for i, a in enumerate(answers):
    if a.raw_id is not None:
      continue
    text = a.instruction.strip()
    matches = with_id_by_text.get(text, [])
    if len(matches) > 1:
      ids = " and ".join(f"{show_json(prompts[p].raw_id)} ({prompts[p].where})" for p in matches)
      raise ValueError(
        f"{a.where}: this record has no id and its instruction is that of the ids {ids}; give "
        "it the id of the prompt it answers"
      )
    if matches:
      row[i] = matches[0]
      continue
    key = f"text:{text}"
    if key not in by_key:
      by_key[key] = len(prompts)
      prompts.append(Prompt(key=key, raw_id=None, text=a.instruction, where=a.where))
    row[i] = by_key[key]
  seen: dict[tuple[int, str], str] = {}
  for a, r in zip(answers, row):
    first = seen.setdefault((r, a.generator), a.where)
    if first != a.where:
      raise ValueError(
        f"{first} and {a.where} both give generator {a.generator!r}'s answer to the prompt "
        f"{show_json(prompts[r].text.strip())}; keep one of them (a generator answers a prompt "
        "at most once)"
      )
  return prompts, row


def stable_id(key: str) -> int:
  """A 62-bit id from the sha1 of `key`: the same on every run and machine (Python's `hash` is not),
  and non-negative in int64 with room to spare."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") >> 2


def is_shipped_tokenizer(tokenizer_dir: str | os.PathLike) -> bool:
  return pathlib.Path(tokenizer_dir).resolve() == pathlib.Path(DEFAULT_TOKENIZER_DIR).resolve()


def token_counter(tokenizer_dir: str | os.PathLike):
  """(count, name): count(texts) -> int32 token counts (no special tokens), and the tokenizer's name."""
  from s3jax.tokenizer import load_tokenizer

  shipped = is_shipped_tokenizer(tokenizer_dir)
  # None is the shipped BPE built with `tokenizers`: the same counts without importing transformers.
  tok = load_tokenizer(None if shipped else tokenizer_dir)
  directory = pathlib.Path(tokenizer_dir).resolve()
  name = SHIPPED_TOKENIZER if shipped else f"{directory.name} ({len(tok)} tokens, {directory})"

  def count(texts: list[str]) -> np.ndarray:
    if not texts:
      return np.zeros(0, np.int32)
    return np.asarray([len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]], np.int32)

  return count, name
