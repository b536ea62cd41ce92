"""The optional parts of s3jax and what installs them (``[project.optional-dependencies]`` in
``pyproject.toml``): the core runs ``LLM(...).generate`` with the default predictor; ``serve`` adds
the HTTP server, ``train`` the predictor's training and its plots, ``bench`` the benchmarks' peers,
plots and load tools. Code that needs an extra imports it where it is used and, when it is absent,
raises ``missing_extra(...)``, which says what to install."""

from __future__ import annotations


def missing_extra(error: ModuleNotFoundError, extra: str, purpose: str) -> ImportError:
  """The error to raise (``from error``) when a package of the extra ``extra`` is not installed.

  Args:
    error: the failed import's error (its ``name`` is the missing module).
    extra: the extra that installs it: ``serve``, ``train`` or ``bench``.
    purpose: what needed it, e.g. ``"s3jax-serve"``.
  """
  return ImportError(
    f'{error.name} is not installed ({purpose} needs it): pip install "s3jax[{extra}]" '
    f'(in a source checkout: pip install -e ".[{extra}]")',
    name=error.name,
  )
