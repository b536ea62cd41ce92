"""Length data: the user format, its errors, merging with the shipped lengths, splits, describe()."""

import json

import numpy as np
import pytest

from s3jax.assets import LENGTHS_FILE
from s3jax.predictor.data import (
  MISSING,
  describe,
  load_length_data,
  load_user_lengths,
  merge_length_data,
  split_by_id,
  stable_id,
  user_split_by_text,
)
from s3jax.tokenizer import load_tokenizer


def _write(path, *records):
  """Writes JSON Lines; a str record is written verbatim (for malformed lines)."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


def _row(data, instruction):
  return data.prompts.index(instruction)


@pytest.fixture(scope="module")
def shipped():
  return load_length_data()


@pytest.fixture(scope="module")
def gpt2():
  return load_tokenizer()  # the shipped GPT-2 BPE (tests/models checks it against transformers')


def test_foreign_string_and_int_ids_missing_answers_and_file_stem(tmp_path):
  a = _write(
    tmp_path / "model_a.jsonl",
    {"id": "ticket-9", "instruction": "Summarise the ticket.", "output_tokens": 40},
    {"id": 7, "instruction": "Name a colour.", "output_tokens": 2},
    {"instruction": "  Tell me a joke. ", "output_tokens": 30, "generator": "model_c"},
  )
  b = _write(
    tmp_path / "model_b.jsonl",
    {"id": "7", "instruction": "Name a colour. ", "output_tokens": 3},  # "7" is id 7
    {"instruction": "Tell me a joke.", "output_tokens": 25},
    "",  # blank lines are skipped
    {"instruction": "Write a poem.", "output_tokens": 120, "dataset": "ignored"},
  )
  data = load_user_lengths([a, b])
  assert data.generators == ("model_a", "model_b", "model_c")
  assert len(data.prompts) == 4  # the union: "Write a poem." is only in model_b.jsonl
  assert data.ids.dtype == np.int64 and np.all(np.diff(data.ids) > 0) and np.all(data.ids >= 0)
  expect = {
    "Summarise the ticket.": [40, MISSING, MISSING],
    "Name a colour.": [2, 3, MISSING],
    "  Tell me a joke. ": [MISSING, 25, 30],
    "Write a poem.": [MISSING, 120, MISSING],
  }
  for text, lengths in expect.items():
    r = _row(data, text)
    assert data.lengths[r].tolist() == lengths
    assert data.observed[r].tolist() == [n >= 0 for n in lengths]
  assert data.observed.dtype == bool and data.observed.sum() == 6
  assert data.ids[_row(data, "Name a colour.")] == stable_id("id:7")
  assert data.ids[_row(data, "Write a poem.")] == stable_id("text:Write a poem.")
  # Stable across runs and independent of file order.
  again = load_user_lengths([b, a])
  np.testing.assert_array_equal(again.ids, data.ids)
  np.testing.assert_array_equal(again.lengths, data.lengths)
  sub = data.subset(np.asarray([0, 2]))
  np.testing.assert_array_equal(sub.observed, data.observed[[0, 2]])


def test_record_without_id_joins_the_prompt_with_that_instruction(tmp_path):
  f = _write(
    tmp_path / "m.jsonl",
    {"instruction": "Hi there", "output_tokens": 5, "generator": "x"},
    {"id": 3, "instruction": "Hi there", "output_tokens": 6, "generator": "y"},
  )
  data = load_user_lengths(f)
  assert data.prompts == ("Hi there",) and data.lengths.tolist() == [[5, 6]]


def test_output_text_is_counted_with_the_tokenizer(tmp_path, gpt2):
  text = "Kickball is played like baseball, with a big rubber ball.\n\n1. Pitch it."
  prompt = "How is kickball played?"
  data = load_user_lengths(
    _write(tmp_path / "g.jsonl", {"instruction": prompt, "output": text}, {"instruction": "Say nothing.", "output": ""})
  )
  assert data.lengths[_row(data, prompt), 0] == len(gpt2.encode(text)) > 0
  assert data.lengths[_row(data, "Say nothing."), 0] == 0
  assert data.prompt_tokens[_row(data, prompt)] == len(gpt2.encode(prompt))
  assert "GPT-2" in data.tokenizer


@pytest.mark.parametrize(
  "line, message",
  [
    ('{"instruction": "x", "output": "y"', "invalid JSON"),
    ('["instruction", "output"]', "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object"),
    ('{"output": "y"}', 'missing "instruction"'),
    ('{"instruction": "   ", "output": "y"}', "blank"),
    ('{"instruction": 12, "output": "y"}', '"instruction" must be a string'),
    ('{"instruction": "x"}', "missing the answer"),
    ('{"instruction": "x", "answer": "y"}', "unrecognised fields: ['answer']"),
    ('{"instruction": "x", "output": "y", "output_tokens": 3}', "not both"),
    ('{"instruction": "x", "output": 3}', '"output" must be a string'),
    ('{"instruction": "x", "output_tokens": -1}', "must be >= 0"),
    ('{"instruction": "x", "output_tokens": 2.5}', "whole number"),
    ('{"instruction": "x", "output_tokens": 12.0}', "without a decimal point"),
    ('{"instruction": "x", "output_tokens": true}', "a boolean"),
    ('{"instruction": "x", "output_tokens": "12"}', "whole number"),
    ('{"instruction": "x", "output_tokens": {"g": -4}}', "must be >= 0"),
    ('{"instruction": "x", "output_tokens": {}}', "empty object"),
    ('{"instruction": "x", "output_tokens": {"g": 4}, "generator": "h"}', 'drop "generator"'),
    ('{"instruction": "x", "output_tokens": 4, "generator": 5}', '"generator" must be a non-blank string'),
    ('{"instruction": "x", "output_tokens": 4, "id": 1.5}', '"id" must be an integer or a non-blank string'),
    ('{"instruction": "x", "output_tokens": 4, "id": true}', '"id" must be'),
  ],
)
def test_malformed_record_names_file_and_line(tmp_path, line, message):
  f = _write(tmp_path / "bad.jsonl", {"instruction": "fine", "output_tokens": 1}, "", line)
  with pytest.raises(ValueError) as e:
    load_user_lengths([f])
  assert f"{f}:3: " in str(e.value) and message in str(e.value)


def test_duplicate_prompt_and_generator_names_both_lines(tmp_path):
  f = _write(
    tmp_path / "m.jsonl",
    {"instruction": "Same prompt", "output_tokens": 1},
    {"instruction": "Other", "output_tokens": 2},
    {"instruction": " Same prompt", "output_tokens": 3},
  )
  with pytest.raises(ValueError, match=rf"{f}:1 and {f}:3 both give generator 'm'"):
    load_user_lengths(f)
  # Across files too (the second file names the generator explicitly).
  g = _write(tmp_path / "n.jsonl", {"instruction": "Other", "output_tokens": 2, "generator": "m"})
  with pytest.raises(ValueError, match=rf"{f}:2 and {g}:1"):
    load_user_lengths(
      [
        _write(
          tmp_path / "m.jsonl", {"instruction": "x", "output_tokens": 1}, {"instruction": "Other", "output_tokens": 2}
        ),
        g,
      ]
    )


def test_same_id_with_two_instructions(tmp_path):
  f = _write(
    tmp_path / "m.jsonl",
    {"id": 1, "instruction": "A", "output_tokens": 1},
    {"id": 1, "instruction": "B", "output_tokens": 1, "generator": "other"},
  )
  with pytest.raises(ValueError, match=rf"{f}:2: id 1 .* at {f}:1"):
    load_user_lengths(f)


def test_empty_and_missing_files(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match=f"{empty}: no records"):
    load_user_lengths([empty])
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_user_lengths([tmp_path / "nope.jsonl"])
  with pytest.raises(ValueError, match="no length data files"):
    load_user_lengths([])
  ok = _write(tmp_path / "ok.jsonl", {"instruction": "x", "output_tokens": 1})
  with pytest.raises(ValueError, match="given twice"):
    load_user_lengths([ok, str(ok)])


def test_shipped_file_is_a_valid_user_file(shipped):
  data = load_user_lengths([LENGTHS_FILE])
  assert data.generators == shipped.generators and data.tokenizer == shipped.tokenizer
  rows = [_row(data, p) for p in shipped.prompts]
  assert sorted(rows) == list(range(len(data.prompts)))
  np.testing.assert_array_equal(data.lengths[rows], shipped.lengths)
  np.testing.assert_array_equal(data.prompt_tokens[rows], shipped.prompt_tokens)
  assert data.observed.all()


def test_merge_with_the_shipped_data(tmp_path, shipped):
  known = shipped.prompts[5]  # a shipped instruction, given with other whitespace
  f = _write(
    tmp_path / "my_llm.jsonl",
    {"instruction": f"\n{known}  ", "output_tokens": 77},
    {"instruction": "Something AlpacaEval never asked.", "output_tokens": 9},
  )
  mine = load_user_lengths([f])
  merged = merge_length_data(mine, shipped)
  assert merged.generators == tuple(sorted(shipped.generators + ("my_llm",)))
  assert len(merged.prompts) == len(shipped.prompts) + 1
  assert len(np.unique(merged.ids)) == len(merged.ids) and np.all(np.diff(merged.ids) > 0)
  mine_col, cols = merged.generator_index("my_llm"), [merged.generator_index(g) for g in shipped.generators]
  # The shipped prompts keep their lengths; the matching user prompt shares its row.
  for i, p in enumerate(shipped.prompts):
    r = _row(merged, f"\n{known}  " if i == 5 else p)
    assert merged.lengths[r, cols].tolist() == shipped.lengths[i].tolist()
    assert merged.lengths[r, mine_col] == (77 if i == 5 else MISSING)
  new = _row(merged, "Something AlpacaEval never asked.")
  assert merged.lengths[new, mine_col] == 9 and not merged.observed[new, cols].any()
  assert merged.observed.sum() == shipped.lengths.size + 2
  # Works for training: a deterministic split and a summary.
  split = split_by_id(merged.ids)
  assert len(split.train) + len(split.calib) + len(split.test) == len(merged.ids)
  assert "my_llm" in describe(merged, split)


def test_merge_rejects_a_generator_in_both(tmp_path, shipped):
  mine = load_user_lengths(_write(tmp_path / "gpt4.jsonl", {"instruction": "x", "output_tokens": 1}))
  with pytest.raises(ValueError, match=r"\['gpt4'\] are in both"):
    merge_length_data(mine, shipped)


def test_directory_loader_takes_the_union_of_ids(tmp_path):
  (tmp_path / "d").mkdir()
  _write(
    tmp_path / "d" / "a.jsonl",
    {"id": 1, "instruction": "one", "output": "one two three"},
    {"id": 2, "instruction": "two", "output": "x"},
  )
  _write(
    tmp_path / "d" / "b.jsonl",
    {"id": 2, "instruction": "two", "output_tokens": 4},
    {"id": 5, "instruction": "five", "output": "y"},
  )
  for _ in range(2):  # The second call reads the cache.
    data = load_length_data(tmp_path / "d", cache_dir=tmp_path / "cache")
    assert data.ids.tolist() == [1, 2, 5] and data.generators == ("a", "b")
    assert data.lengths[:, 1].tolist() == [MISSING, 4, 1] and data.lengths[0, 0] > 0
    assert data.tokenizer == load_length_data().tokenizer
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_split_default_unchanged_and_fractions_validated(shipped):
  split = split_by_id(shipped.ids)
  assert (len(split.train), len(split.calib), len(split.test)) == (461, 81, 136)
  ids = np.arange(10)
  for bad in (-0.1, 1.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"test_frac must be in \[0, 1\)"):
      split_by_id(ids, test_frac=bad)
    with pytest.raises(ValueError, match=r"calib_frac must be in \[0, 1\)"):
      split_by_id(ids, calib_frac=bad)
  with pytest.raises(ValueError, match="no training prompt"):
    split_by_id(np.arange(2), test_frac=0.5, calib_frac=0.9)
  with pytest.raises(ValueError, match="no training prompt"):
    split_by_id(np.arange(0))
  assert len(split_by_id(np.arange(3), test_frac=0.0, calib_frac=0.0).train) == 3


def test_describe_mentions_every_generator_and_the_split(shipped):
  text = describe(shipped, split_by_id(shipped.ids))
  assert all(g in text for g in shipped.generators)
  assert "678 prompts" in text and "missing: 0 of 10170" in text and "461 train" in text
  assert "split" not in describe(shipped)


def test_user_split_by_text_is_the_split_a_head_trained_on_the_file_used(tmp_path):
  """Integer ids in a user file do not make its split the shipped data's: training splits by the
  stable ids, and scripts judging a head trained on the file must ask that split."""
  records = [{"id": i, "instruction": f"Question {i}?", "output_tokens": i + 1, "generator": "m"} for i in range(60)]
  path = _write(tmp_path / "m.jsonl", *records)
  role = user_split_by_text(path)
  data = load_user_lengths(path)
  split = split_by_id(data.ids, seed=0)
  for name in ("train", "calib", "test"):
    assert sorted(t for t, r in role.items() if r == name) == sorted(data.prompts[i] for i in getattr(split, name))
  by_raw_id = {records[i]["instruction"] for i in split_by_id(np.arange(60), seed=0).test}
  assert by_raw_id != {t for t, r in role.items() if r == "test"}
