"""GGUF files (llama.cpp's format) as a model source: config, weights and tokenizer in one file.

A ``.gguf`` path, or a directory holding one, is accepted wherever a model is named. It is read
with the ``gguf`` package (pure Python, numpy): the metadata gives the ``ModelConfig`` and the
tokenizer, and every tensor is dequantized to fp32 on the host (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0 and Q5_1; SmolLM2-135M's Q4_1/Q8_0 file in about 1.5 s after 3 s of parsing, so nothing is
cached), renamed to its Hugging Face name and imported by ``checkpoint.params_from_tensors`` in
the served dtype.

llama.cpp's converter permutes the rows of a Llama's Q and K projections so that each head's
rotated pairs are adjacent (GGML's "normal" RoPE rotates pairs (0, 1), (2, 3)...), where
Hugging Face rotates halves (0, H/2), (1, H/2 + 1)...; ``unpermute`` undoes it, so the weights are
in Hugging Face's layout and the model is the one ``transformers`` builds from the same file
(tests/models/test_gguf.py proves it). Qwen2 files are not permuted (GGML rotates them NeoX-style).

The tokenizer is byte-level BPE (``tokenizer.ggml.model = gpt2``): the vocabulary and merges,
the pre-tokenizer llama.cpp uses for the file's ``tokenizer.ggml.pre``, control tokens as special
tokens, bos/eos and the chat template, wrapped as a ``transformers`` fast tokenizer so chat
templates render as for any checkpoint.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from s3jax.models.config import Family, ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# A quantization tag at the end of a file's stem ("SmolLM2-135M-Instruct.Q4_1") is not the model's name.
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.I)

# llama.cpp tensor name -> Hugging Face name ({i}: the block).
_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# llama.cpp's pre-tokenizer regexes for byte-level BPE, by ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "smollm", *_SPLITS)


def find_gguf(path: str | Path) -> Path | None:
  """The GGUF file ``path`` names: itself, or the one ``.gguf`` in a directory; None otherwise.

  Raises:
    ValueError: the directory holds several, so which one is meant is not clear.
  """
  path = Path(path)
  if path.is_file():
    return path if path.suffix.lower() == ".gguf" else None
  if not path.is_dir():
    return None
  found = sorted(path.glob("*.gguf"))
  if len(found) > 1:
    raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}): pass the file itself")
  return found[0] if found else None


def model_name(path: Path) -> str:
  """The served name of a GGUF file: its stem without a quantization tag."""
  return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _reader(path: Path):
  """The file's ``gguf.GGUFReader`` (a memory map; parsing SmolLM2's header takes 3 s, so the
  weights and the tokenizer share one)."""
  path = path.resolve()
  return _cached_reader(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int):
  try:
    import gguf
  except ModuleNotFoundError as e:
    raise ValueError(f"reading {Path(path).name} needs the gguf package: pip install gguf") from e
  return gguf.GGUFReader(path)


def _metadata(reader) -> dict:
  """Every metadata field but the long tokenizer arrays, as Python values."""
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
  return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def config_from_metadata(meta: dict, tensor_shapes: dict[str, tuple[int, ...]], name: str) -> ModelConfig:
  """The ``ModelConfig`` a GGUF file describes.

  Args:
    meta: the file's metadata (``_metadata``).
    tensor_shapes: each tensor's name and GGUF shape (fastest-varying dimension first).
    name: the served name.

  Raises:
    ValueError: naming an unsupported architecture or option.
  """
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  d, n = get("embedding_length"), get("attention.head_count")
  scaling = get("rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in tensor_shapes:
    raise ValueError(f"unsupported GGUF rope scaling ({scaling}, rope_freqs): only plain RoPE is read from GGUF")
  for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
    if get(key, d // n) != d // n:
      raise ValueError(f"unsupported GGUF {arch}.{key} = {get(key)}: s3jax needs head size {d // n} (width / heads)")
  qwen2 = arch == "qwen2"
  return ModelConfig(
    family=Family.LLAMA,
    vocab_size=get("vocab_size") or tensor_shapes["token_embd.weight"][-1],
    max_seq_len=get("context_length"),
    d_model=d,
    n_layers=get("block_count"),
    n_heads=n,
    kv_heads=get("attention.head_count_kv") or n,
    d_ff=get("feed_forward_length"),
    rotary_dim=d // n,
    tie_embeddings="output.weight" not in tensor_shapes,
    activation="silu",
    layer_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
    rotary_base=float(get("rope.freq_base", 10000.0)),
    attn_bias=qwen2 or "blk.0.attn_q.bias" in tensor_shapes,
    out_bias=False,
    mlp_bias=False,
    eos_token_id=meta.get("tokenizer.ggml.eos_token_id", 2),
    name=name,
  )


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (``convert_hf_to_gguf.LlamaModel.permute``).

  The converter reshapes each head's H rows as [2, H/2] and swaps the axes, so that rows
  ``i`` and ``H/2 + i`` (one rotated pair in Hugging Face's layout) become neighbours ``2i`` and
  ``2i + 1``. This reshapes them as [H/2, 2] and swaps back.

  Args:
    w: [heads H, ...] a projection's weight (rows = output features) or bias.
    heads: query heads for Q, kv heads for K.
  """
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
  """One GGUF tensor as fp32, shaped like the Hugging Face tensor ([out, in] for a matrix).

  Raises:
    ValueError: naming the tensor and its type when it is not one of ``SUPPORTED_TENSOR_TYPES``.
  """
  from gguf.quants import dequantize as gguf_dequantize

  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TENSOR_TYPES:
    raise ValueError(
      f"GGUF tensor {tensor.name} has type {kind}, which s3jax does not dequantize; "
      f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
    )
  return np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def hf_tensors(reader, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
  """Every tensor dequantized and renamed to its Hugging Face name, Q and K un-permuted (Llama).

  Raises:
    ValueError: a tensor of an unsupported type, or one this reader does not know (it would be
      silently ignored otherwise).
  """
  out, unknown = {}, []
  for tensor in reader.tensors:
    block = _BLOCK.match(tensor.name)
    if block is None:
      hf = _GLOBAL_NAMES.get(tensor.name)
    else:
      hf = _BLOCK_NAMES.get(block.group(2))
      hf = hf and f"model.layers.{block.group(1)}.{hf}"
    if hf is None:
      unknown.append(tensor.name)
      continue
    w = dequantize(tensor)
    if arch == "llama" and block is not None and block.group(2).startswith(("attn_q.", "attn_k.")):
      w = unpermute(w, cfg.n_heads if block.group(2).startswith("attn_q.") else cfg.n_kv_heads)
    out[hf] = w
  if unknown:
    raise ValueError(f"unexpected tensors in the GGUF file for a {arch} model: {', '.join(unknown[:8])}")
  return out


def load_gguf(path: str | Path, dtype=None):
  """``(config, graphdef, params)`` from a GGUF file, in ``dtype`` (default fp32)."""
  import jax.numpy as jnp

  from s3jax.models.checkpoint import params_from_tensors

  path = Path(path)
  reader = _reader(path)
  meta = _metadata(reader)
  cfg = config_from_metadata(meta, {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}, model_name(path))
  tensors = hf_tensors(reader, cfg, meta["general.architecture"])
  graphdef, params = params_from_tensors(cfg, tensors, jnp.float32 if dtype is None else dtype)
  return cfg, graphdef, params


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("default", "gpt2"):
    return byte_level
  if pre == "smollm":  # every digit alone, then GPT-2's split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _SPLITS:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  raise ValueError(
    f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
    f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}; pass a Hugging Face tokenizer directory with --tokenizer"
  )


def load_tokenizer(path: str | Path):
  """The tokenizer in a GGUF file's metadata, as a ``transformers.PreTrainedTokenizerFast``.

  Raises:
    ValueError: the file's tokenizer is not byte-level BPE or its pre-tokenizer is unknown.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors
  from transformers import PreTrainedTokenizerFast

  path = Path(path)
  reader = _reader(path)
  field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default
  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
      f"unsupported GGUF tokenizer {kind!r} (tokenizer.ggml.model) in {path.name}: s3jax reads byte-level BPE "
      "('gpt2'); pass a Hugging Face tokenizer directory with --tokenizer"
    )
  tokens = field("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
  backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  backend.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", "default"))
  backend.decoder = decoders.ByteLevel()
  types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  # 3: control (<|im_end|>), never split and skipped by skip_special_tokens; 4: user-defined.
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
  backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
  special = lambda key: None if field(key) is None else tokens[field(key)]
  bos = special("tokenizer.ggml.bos_token_id")
  if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
    bos_id = field("tokenizer.ggml.bos_token_id")
    backend.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
  return PreTrainedTokenizerFast(
    tokenizer_object=backend,
    bos_token=bos,
    eos_token=special("tokenizer.ggml.eos_token_id"),
    unk_token=special("tokenizer.ggml.unknown_token_id"),
    pad_token=special("tokenizer.ggml.padding_token_id"),
    chat_template=field("tokenizer.chat_template"),
    clean_up_tokenization_spaces=False,
  )
