"""``s3jax-serve``'s flags come from ``ServeArgs``' fields; ``--config FILE`` sets them, flags override."""

from __future__ import annotations

import dataclasses

import pytest

from s3jax.assets import REPO_ROOT
from s3jax.flags import flag_name
from s3jax.scheduler import AdmissionOrder, Policy
from s3jax.serving.cli import API_KEY_ENV, ServeArgs, parse_args

EXAMPLE = REPO_ROOT / "configs" / "server" / "example.toml"


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch):
  monkeypatch.delenv(API_KEY_ENV, raising=False)


def test_no_flags_is_the_dataclass_defaults():
  assert parse_args([]) == ServeArgs()


def test_every_field_is_a_flag_with_its_help(capsys):
  with pytest.raises(SystemExit):
    parse_args(["--help"])
  text = capsys.readouterr().out
  for f in dataclasses.fields(ServeArgs):
    switch = "--no-" + f.name.replace("_", "-") if f.default is True else flag_name(f.name)
    assert switch in text, switch
    assert f.metadata["help"].split()[0] in text
  assert "{max,constant,s3-reserve,s3,oracle,on-demand,adaptive}" in text  # choices from the enum
  assert "(default: s3)" in text and "Policy." not in text


def test_flags_are_typed_by_the_annotations():
  args = parse_args(
    ["--policy", "s3-reserve", "--admission-order", "shortest-first", "--admission-risk", "0.3", "--port", "9001"]
  )
  assert args.policy is Policy.S3_RESERVE and args.admission_order is AdmissionOrder.SHORTEST_FIRST
  assert args.admission_risk == 0.3 and args.port == 9001
  assert parse_args(["--allowed-origins", "http://a, http://b"]).allowed_origins == ("http://a", "http://b")
  assert parse_args(["--no-warmup", "--no-compilation-cache"]).warmup is False
  assert parse_args(["--no-compilation-cache"]).compilation_cache is None


def test_a_wrong_value_names_the_choices(capsys):
  with pytest.raises(SystemExit):
    parse_args(["--policy", "fastest"])
  assert "choose one of max, constant" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    parse_args(["--port", "eighty"])
  assert "'eighty' is not an integer" in capsys.readouterr().err


def test_the_example_config_loads():
  args = parse_args(["--config", str(EXAMPLE)])
  assert args.model == "tiny" and args.predictor is None and args.policy is Policy.MAX
  assert args.admission_order is AdmissionOrder.FCFS and args.memory_budget == "64MiB" and args.max_queue == 256
  assert args.allowed_origins == () and args.max_connections == 256


def test_a_flag_overrides_the_config_file():
  args = parse_args(["--port", "9002", "--config", str(EXAMPLE), "--policy", "constant", "--constant-output-len", "64"])
  assert args.port == 9002 and args.policy is Policy.CONSTANT and args.constant_output_len == 64
  assert args.model == "tiny"  # what no flag sets stays the file's


def test_config_file_errors_name_the_setting(tmp_path, capsys):
  cases = {
    "unknown.toml": ("[server]\nprot = 8000\n", "unknown setting 'prot'"),
    "group.toml": ("[server]\npolicy = 'max'\n", "'policy' belongs in [scheduler]"),
    "type.toml": ("port = 'eighty'\n", "'eighty' is not an integer"),
    "enum.toml": ("policy = 'fastest'\n", "choose one of"),
  }
  for name, (text, message) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit):
      parse_args(["--config", str(tmp_path / name)])
    assert message in capsys.readouterr().err, name


def test_json_config_and_top_level_keys(tmp_path):
  path = tmp_path / "serve.json"
  path.write_text(
    '{"model": "tiny", "predictor": "none", "policy": "max", "drain-timeout": 3, "allowed_origins": ["*"]}'
  )
  args = parse_args(["--config", str(path)])
  assert args.drain_timeout == 3.0 and isinstance(args.drain_timeout, float) and args.allowed_origins == ("*",)
