"""Files s3jax ships beside its code: model configs, GPT-2's tokenizer, the default predictor,
and the answer lengths of 15 LLMs on AlpacaEval.

A source checkout (``pip install -e .``) reads them where they are committed, ``configs/``,
``checkpoints/`` and ``data/`` at the repository root; a wheel carries copies under ``s3jax/_assets/``
(``setup.py`` puts them there), so ``LLM("gpt2-small")`` works from either.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# The repository root in a source checkout: the scripts, which only run from one, write results/
# and BENCHMARKS.md under it.
REPO_ROOT = _PACKAGE.parent
_ROOTS = (_PACKAGE / "_assets", REPO_ROOT)


def asset_path(relative: str) -> Path:
  """``relative`` (e.g. ``"configs/models"``) in the wheel's copy or the source checkout.

  A missing asset resolves to its source-checkout path, so the caller's error names where it was
  looked for.
  """
  for root in _ROOTS:
    if (root / relative).exists():
      return root / relative
  return REPO_ROOT / relative


CONFIG_DIR = asset_path("configs/models")
GPT2_TOKENIZER_DIR = asset_path("checkpoints/gpt2-tokenizer")
PREDICTOR_DIR = asset_path("checkpoints/predictor")
# Self-prediction heads: a served model's own hidden state -> its answer's length (issue 30).
SELF_HEAD_DIR = asset_path("checkpoints/self_head")
# 678 AlpacaEval instructions and the answer length of 15 LLMs for each, in GPT-2 tokens.
LENGTHS_FILE = asset_path("data/alpaca_eval/lengths.jsonl")
