"""The fenced code blocks of README.md, by section, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(section: str, language: str) -> list[str]:
  """The ```language blocks under the heading ``## section``, in order."""
  text = README.read_text()
  assert f"\n## {section}\n" in text, f"README.md has no section {section!r}"
  body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def shell_commands(block: str) -> list[str]:
  """A bash block's commands: continuation lines joined, comments dropped."""
  joined = block.replace("\\\n", " ")
  return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
