"""The scripts' one ``--engine-option NAME=VALUE`` parser: values typed by the config field."""

from __future__ import annotations

import argparse

import pytest

from s3jax.bench.experiment import add_engine_option_flag, engine_options, parse_engine_options, system_options
from s3jax.engine import EngineConfig
from s3jax.scheduler import AdmissionOrder, Policy


def test_values_take_the_fields_types():
  options = parse_engine_options(
    ["admission_order=shortest-first", "scan_chunk_pages=4", "admission_risk=0.3", "batch_sizes=4,8,16", "max_slots=8"]
  )
  assert options == {
    "admission_order": AdmissionOrder.SHORTEST_FIRST,  # a text value (int() used to crash on it)
    "scan_chunk_pages": 4,
    "admission_risk": 0.3,
    "batch_sizes": (4, 8, 16),
    "max_slots": 8,
  }
  assert isinstance(parse_engine_options(["admission_risk=1"])["admission_risk"], float)
  assert EngineConfig.create(policy="s3", memory_budget="1MiB", **options).scheduler.batch_sizes == (4, 8, 16)


@pytest.mark.parametrize(
  "item, message",
  [
    ("scan_chunk_pages", "NAME=VALUE"),
    ("scan_chunks=4", "unknown engine option 'scan_chunks'; known: "),
    ("scan_chunk_pages=4.5", "engine option scan_chunk_pages: '4.5' is not an integer"),
    ("admission_order=lifo", "choose one of fcfs"),
    ("policy=max", "unknown engine option 'policy'"),  # a system name sets it
  ],
)
def test_wrong_options_say_why(item, message):
  with pytest.raises(ValueError, match=message):
    parse_engine_options([item])


def test_the_flag_keeps_its_defaults_unless_given_again(capsys):
  p = argparse.ArgumentParser()
  add_engine_option_flag(p, {"min_prefill_len": 128})
  assert engine_options(p.parse_args([])) == {"min_prefill_len": 128}
  given = p.parse_args(["--engine-option", "min_prefill_len=64", "--engine-option", "admission_order=fcfs"])
  assert engine_options(given) == {"min_prefill_len": 64, "admission_order": AdmissionOrder.FCFS}
  assert engine_options(p.parse_args([])) == {"min_prefill_len": 128}  # the default list was not appended to
  with pytest.raises(SystemExit):
    p.parse_args(["--engine-option", "max_slots=many"])
  assert "'many' is not an integer" in capsys.readouterr().err


def test_system_names():
  assert system_options("constant@300") == {"policy": "constant", "constant_output_len": 300}
  assert system_options("s3+fcfs") == {"policy": "s3", "admission_order": "fcfs"}
  assert EngineConfig.create(memory_budget="1MiB", **system_options("oracle")).policy is Policy.ORACLE
