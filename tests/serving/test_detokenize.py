"""TextStream on its own: text that is final only, across UTF-8 sequences and stop strings split
over tokens (a byte-level tokenizer, so a token can be part of a character)."""

from __future__ import annotations

from s3jax.serving.detokenize import TextStream


class ByteTokenizer:
  """Token id = one UTF-8 byte; decoding replaces an incomplete sequence with U+FFFD, as HF does."""

  def encode(self, text: str) -> list[int]:
    return list(text.encode())

  def decode(self, ids) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stops=(), chunk: int = 1) -> tuple[TextStream, list[str]]:
  tok = ByteTokenizer()
  stream, deltas = TextStream(tok, stops), []
  ids = tok.encode(text)
  for i in range(0, len(ids), chunk):
    stream.push(ids[i : i + chunk])
    deltas.append(stream.delta(final=False))
  deltas.append(stream.delta(final=True))
  return stream, deltas


def test_a_character_split_over_tokens_waits_for_its_last_byte():
  stream, deltas = _stream("aé€😀b")  # 1, 2, 3 and 4 bytes
  assert "".join(deltas) == "aé€😀b" and all("\ufffd" not in d for d in deltas)
  assert deltas[:4] == ["a", "", "é", ""]  # é's first byte emits nothing; its second emits é


def test_a_stop_string_split_over_tokens_is_held_back_then_cut():
  stream, deltas = _stream("one END two", stops=("END",))
  assert "".join(deltas) == "one " and stream.emitted == "one "
  assert stream.stop_index() == 4
  assert "E" not in "".join(deltas[:6])  # "E" and "EN" might start the stop: held back, never sent


def test_held_back_text_that_is_no_stop_after_all_is_sent():
  _, deltas = _stream("ENd ENDING", stops=("END!",))
  assert "".join(deltas) == "ENd ENDING"


def test_a_stop_string_inside_a_multibyte_token_stream():
  stream, deltas = _stream("été—fin—", stops=("—fin",), chunk=2)
  assert "".join(deltas) == "été" and stream.emitted == "été"
