"""The README's code runs as written: its library blocks (the first at a small size), and every script
command it shows exists and takes the flags it is shown with. The set-up and test blocks are what
``.ci/run`` runs; the serving examples run against the default server in
``tests/serving/test_server_default.py``.

Each script's ``--help`` runs once (several commands share a script), in the background lane
(tests/background.py) from the start of the session."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from background import Job
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


def _helps() -> dict[str, subprocess.CompletedProcess]:
  """Each script's ``--help``, by script."""
  scripts = dict.fromkeys(shlex.split(command)[1] for command in _script_commands())
  return {
    script: subprocess.run(
      [sys.executable, script, "--help"], cwd=README.parent, capture_output=True, text=True, timeout=120
    )
    for script in scripts
  }


HELPS = Job(_helps)


def test_script_commands_exist_with_their_flags():
  commands = _script_commands()
  assert len(commands) >= 6
  helps = HELPS.result()
  for command in commands:
    argv = shlex.split(command)
    result = helps[argv[1]]
    assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
    for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
      assert flag in result.stdout, f"{command}: {argv[1]} has no flag {flag}"
