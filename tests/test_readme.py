"""The README's code runs as written: its library blocks (the first at a small size), and every script
command it shows exists and takes the flags it is shown with. The set-up and test blocks are what
``.ci/run`` runs; the serving examples run against the default server in
``tests/serving/test_server_default.py``.

Each script's ``--help`` runs once (several commands share a script), in this process as
``python script --help`` would run it (``runpy``): a fresh interpreter per script cost a JAX
import each, most of a minute over the scripts."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys

import pytest
from readme_blocks import README, readme_blocks, shell_commands


def test_library_block_runs(capsys):
  code, _ = readme_blocks("As a library", "python")
  small = code.replace("LLM(predictor=", 'LLM("tiny", predictor=')  # the same calls on a 2-layer model
  assert small != code
  exec(compile(small, str(README), "exec"), {"__name__": "__main__"})
  out = capsys.readouterr().out
  assert out.count("RequestStats(") == 2 and "EngineMetrics(" in out


def test_training_loop_block_runs(capsys):
  _, code = readme_blocks("As a library", "python")
  exec(compile(code, str(README), "exec"), {"__name__": "__main__"})
  answers = capsys.readouterr().out.strip().splitlines()
  assert len(answers) == 4 and all(re.fullmatch(r"\[( *\d+){8}\]", a) for a in answers), answers


def test_predictor_block_runs(capsys):
  (code,) = readme_blocks("The length predictor", "python")
  exec(compile(code, str(README), "exec"), {"__name__": "__main__"})
  out = capsys.readouterr().out
  assert "'<any>'" in out and "llama-2-7b-chat-hf" in out


def test_multi_device_block_runs(capsys):
  (code,) = readme_blocks("On several devices", "python")
  # 2 layers, 4 heads: splits stage=2, model=4; 700 MiB per device (589 of them workspace for 256 rows
  # of logits) leaves the tiny model a 780 MiB pool
  small = code.replace('LLM("gpt2-small"', 'LLM("tiny"').replace('"1GiB"', '"700MiB"')
  assert small != code
  exec(compile(small, str(README), "exec"), {"__name__": "__main__"})
  out = capsys.readouterr().out
  assert "per device: parameters" in out and re.search(r"\[(\d+, ){7}\d+\]", out), out


def _script_commands() -> list[str]:
  return [
    c
    for section in ("As a server", "On several devices", "The length predictor", "As a benchmark")
    for block in readme_blocks(section, "bash")
    for c in shell_commands(block)
    if c.startswith("python scripts/")
  ]


def _help(script: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
  """``python <script> --help`` run in this process: (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  monkeypatch.setattr(sys, "argv", [script, "--help"])
  monkeypatch.syspath_prepend(str(README.parent / "scripts"))
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      runpy.run_path(str(README.parent / script), run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return code, out.getvalue(), err.getvalue()


def test_script_commands_exist_with_their_flags(monkeypatch):
  commands = _script_commands()
  assert len(commands) >= 6
  helps = {script: _help(script, monkeypatch) for script in dict.fromkeys(shlex.split(c)[1] for c in commands)}
  for command in commands:
    argv = shlex.split(command)
    code, out, err = helps[argv[1]]
    assert code == 0, f"{command}: {err[-2000:]}"
    for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
      assert flag in out, f"{command}: {argv[1]} has no flag {flag}"
