"""``s3jax.flags.convert``: one text means one value of a field's type, wherever it is given."""

from __future__ import annotations

import pytest

from s3jax.flags import convert
from s3jax.scheduler import AdmissionOrder, Policy


def test_texts_convert_by_annotation():
  assert convert("7", int) == 7 and convert("0.25", float) == 0.25 and convert("7", float) == 7.0
  assert convert("shortest-first", AdmissionOrder) is AdmissionOrder.SHORTEST_FIRST
  assert convert("s3", Policy | None) is Policy.S3 and convert("none", Policy | None) is None
  assert convert("4,8, 16", tuple[int, ...]) == (4, 8, 16) and convert("4", tuple[int, ...] | None) == (4,)
  assert convert("yes", bool) is True and convert("false", bool) is False
  assert convert("none", str | None) == "none"  # a text field keeps its text


@pytest.mark.parametrize(
  "text, annotation, message",
  [("4.5", int, "not an integer"), ("x", float, "not a number"), ("lifo", AdmissionOrder, "choose one of fcfs")],
)
def test_wrong_texts_say_what_was_expected(text, annotation, message):
  with pytest.raises(ValueError, match=message):
    convert(text, annotation)
