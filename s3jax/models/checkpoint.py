"""Import of Hugging Face checkpoints into the Flax ``GPT`` module.

A checkpoint directory holds ``config.json`` and ``*.safetensors`` (or
``pytorch_model.bin``). Each family has a table from our parameter paths to
the Hugging Face tensor names, plus how to reshape each tensor (Hugging Face
``nn.Linear`` stores [out, in]; GPT-2's ``Conv1D`` stores [in, out] with q, k,
v fused; NeoX fuses q, k, v per head as [N, 3, H]; the Llama family keeps
q, k, v, o and gate, up, down apart). ``params_from_tensors`` is also how a
GGUF file's dequantized tensors, renamed to these names, become parameters
(``s3jax.models.gguf``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3jax.models.config import Family, ModelConfig, load_model_config
from s3jax.models.gpt import GPT

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embed_positions")


def read_tensors(ckpt_dir: Path) -> dict[str, np.ndarray]:
  """Reads every tensor of a checkpoint directory into fp32 numpy arrays."""
  files = sorted(ckpt_dir.glob("*.safetensors"))
  tensors: dict[str, np.ndarray] = {}
  if files:
    from safetensors import safe_open

    for f in files:
      with safe_open(str(f), framework="numpy") as fh:
        for name in fh.keys():
          tensors[name] = fh.get_tensor(name)
    return tensors
  bins = sorted(ckpt_dir.glob("pytorch_model*.bin"))
  if not bins:
    raise ValueError(f"{ckpt_dir} has no *.safetensors and no pytorch_model.bin")
  try:
    import torch
  except ImportError as e:  # torch is only needed for the legacy pickle format
    raise ValueError(f"{bins[0]} is a PyTorch pickle; install torch or convert it to safetensors") from e
  for f in bins:
    for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
      tensors[name] = t.float().numpy()
  return tensors


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, t in tensors.items():
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    for prefix in ("transformer.", "gpt_neox.", "model."):
      if name.startswith(prefix):
        name = name[len(prefix) :]
    out[name] = np.asarray(t, dtype=np.float32)
  return out


def _hf_table(cfg: ModelConfig) -> dict[tuple, tuple[str, callable]]:
  """Maps each of our parameter paths to (hf tensor name, transform)."""
  d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
  t = lambda w: w.T  # nn.Linear [out, in] -> our [in, out]
  same = lambda w: w
  table: dict[tuple, tuple[str, callable]] = {}
  if cfg.family is Family.GPT2:
    table[("wte",)] = ("wte.weight", same)
    table[("wpe",)] = ("wpe.weight", same)
    table[("ln_f", "scale")] = ("ln_f.weight", same)
    table[("ln_f", "bias")] = ("ln_f.bias", same)
    for i in range(cfg.n_layers):
      p = f"h.{i}."
      for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
        table[("blocks", i, ours, "scale")] = (p + theirs + ".weight", same)
        table[("blocks", i, ours, "bias")] = (p + theirs + ".bias", same)
      for j, name in enumerate(("q", "k", "v")):  # Conv1D [D, 3D], fused q|k|v
        table[("blocks", i, "attn", name, "kernel")] = (
          p + "attn.c_attn.weight",
          lambda w, j=j: w[:, j * d : (j + 1) * d],
        )
        table[("blocks", i, "attn", name, "bias")] = (p + "attn.c_attn.bias", lambda w, j=j: w[j * d : (j + 1) * d])
      table[("blocks", i, "attn", "out", "kernel")] = (p + "attn.c_proj.weight", same)
      table[("blocks", i, "attn", "out", "bias")] = (p + "attn.c_proj.bias", same)
      table[("blocks", i, "mlp", "fc_in", "kernel")] = (p + "mlp.c_fc.weight", same)
      table[("blocks", i, "mlp", "fc_in", "bias")] = (p + "mlp.c_fc.bias", same)
      table[("blocks", i, "mlp", "fc_out", "kernel")] = (p + "mlp.c_proj.weight", same)
      table[("blocks", i, "mlp", "fc_out", "bias")] = (p + "mlp.c_proj.bias", same)
  elif cfg.family is Family.GPTJ:
    table[("wte",)] = ("wte.weight", same)
    table[("ln_f", "scale")] = ("ln_f.weight", same)
    table[("ln_f", "bias")] = ("ln_f.bias", same)
    table[("lm_head", "kernel")] = ("lm_head.weight", t)
    table[("lm_head", "bias")] = ("lm_head.bias", same)
    for i in range(cfg.n_layers):
      p = f"h.{i}."
      table[("blocks", i, "ln_1", "scale")] = (p + "ln_1.weight", same)
      table[("blocks", i, "ln_1", "bias")] = (p + "ln_1.bias", same)
      for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
        table[("blocks", i, "attn", ours, "kernel")] = (p + f"attn.{theirs}.weight", t)
      for ours, theirs in (("fc_in", "fc_in"), ("fc_out", "fc_out")):
        table[("blocks", i, "mlp", ours, "kernel")] = (p + f"mlp.{theirs}.weight", t)
        table[("blocks", i, "mlp", ours, "bias")] = (p + f"mlp.{theirs}.bias", same)
  elif cfg.family is Family.LLAMA:
    table.update(_llama_table(cfg))
  else:  # GPT-NeoX
    table[("wte",)] = ("embed_in.weight", same)
    table[("ln_f", "scale")] = ("final_layer_norm.weight", same)
    table[("ln_f", "bias")] = ("final_layer_norm.bias", same)
    if not cfg.tie_embeddings:
      table[("lm_head", "kernel")] = ("embed_out.weight", t)
    for i in range(cfg.n_layers):
      p = f"layers.{i}."
      for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
        table[("blocks", i, ours, "scale")] = (p + theirs + ".weight", same)
        table[("blocks", i, ours, "bias")] = (p + theirs + ".bias", same)
      for j, name in enumerate(("q", "k", "v")):  # Linear [N*3*H, D], per head q|k|v
        table[("blocks", i, "attn", name, "kernel")] = (
          p + "attention.query_key_value.weight",
          lambda w, j=j: w.reshape(n, 3, h, d)[:, j].reshape(d, d).T,
        )
        if cfg.attn_bias:
          table[("blocks", i, "attn", name, "bias")] = (
            p + "attention.query_key_value.bias",
            lambda w, j=j: w.reshape(n, 3, h)[:, j].reshape(d),
          )
      table[("blocks", i, "attn", "out", "kernel")] = (p + "attention.dense.weight", t)
      table[("blocks", i, "attn", "out", "bias")] = (p + "attention.dense.bias", same)
      table[("blocks", i, "mlp", "fc_in", "kernel")] = (p + "mlp.dense_h_to_4h.weight", t)
      table[("blocks", i, "mlp", "fc_in", "bias")] = (p + "mlp.dense_h_to_4h.bias", same)
      table[("blocks", i, "mlp", "fc_out", "kernel")] = (p + "mlp.dense_4h_to_h.weight", t)
      table[("blocks", i, "mlp", "fc_out", "bias")] = (p + "mlp.dense_4h_to_h.bias", same)
  return table


def _llama_table(cfg: ModelConfig) -> dict[tuple, tuple[str, callable]]:
  """Llama, Mistral and Qwen2 (``model.`` stripped): every projection an ``nn.Linear`` of its own."""
  t = lambda w: w.T
  same = lambda w: w
  table = {("wte",): ("embed_tokens.weight", same), ("ln_f", "scale"): ("norm.weight", same)}
  if not cfg.tie_embeddings:
    table[("lm_head", "kernel")] = ("lm_head.weight", t)
  for i in range(cfg.n_layers):
    p = f"layers.{i}."
    table[("blocks", i, "ln_1", "scale")] = (p + "input_layernorm.weight", same)
    table[("blocks", i, "ln_2", "scale")] = (p + "post_attention_layernorm.weight", same)
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "o_proj")):
      table[("blocks", i, "attn", ours, "kernel")] = (p + f"self_attn.{theirs}.weight", t)
      table[("blocks", i, "attn", ours, "bias")] = (p + f"self_attn.{theirs}.bias", same)
    for ours, theirs in (("gate", "gate_proj"), ("fc_in", "up_proj"), ("fc_out", "down_proj")):
      table[("blocks", i, "mlp", ours, "kernel")] = (p + f"mlp.{theirs}.weight", t)
      table[("blocks", i, "mlp", ours, "bias")] = (p + f"mlp.{theirs}.bias", same)
  return table


def params_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype=jnp.float32):
  """Builds the ``GPT`` module's parameter state from Hugging Face tensors.

  Raises:
    ValueError: listing every missing or mis-shaped tensor at once.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
  tensors = _strip_prefix(tensors)
  table = _hf_table(cfg)
  missing, misshaped, leaves = [], [], {}
  for path, leaf in nnx.to_flat_state(abstract):
    entry = table.get(tuple(path))
    if entry is None:
      missing.append(".".join(map(str, path)) + " (no mapping)")
      continue
    name, transform = entry
    if name not in tensors:
      missing.append(name)
      continue
    arr = transform(tensors[name])
    if arr.shape != leaf.get_value().shape:
      misshaped.append(f"{name}: got {tensors[name].shape}, need {leaf.get_value().shape} after transform")
      continue
    leaves[path] = jnp.asarray(arr, dtype=dtype)
  if missing or misshaped:
    raise ValueError(
      f"checkpoint does not match the {cfg.family.value} config: "
      f"missing {missing or 'none'}; mis-shaped {misshaped or 'none'}"
    )
  state = nnx.from_flat_state([(path, leaf.replace(leaves[path])) for path, leaf in nnx.to_flat_state(abstract)])
  return graphdef, state


def load_hf_checkpoint(ckpt_dir: str | Path, dtype=jnp.float32):
  """Loads ``(config, graphdef, params)`` from a Hugging Face checkpoint directory."""
  ckpt_dir = Path(ckpt_dir)
  cfg = load_model_config(ckpt_dir)
  graphdef, params = params_from_tensors(cfg, read_tensors(ckpt_dir), dtype)
  return cfg, graphdef, params


def cap_max_len(cfg: ModelConfig, params, max_len: int, dtype=jnp.float32):
  """``(config, graphdef, params)`` serving at most ``max_len`` tokens: learned position rows
  beyond it are dropped (RoPE models keep every parameter).

  Raises:
    ValueError: ``max_len`` is not in [1, the model's maximum].
  """
  if not 0 < max_len <= cfg.max_seq_len:
    raise ValueError(f"max_model_len must be in [1, {cfg.max_seq_len}] (the model's maximum), got {max_len}")
  cfg = cfg.replace(max_seq_len=max_len)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
  if cfg.rotary_dim == 0:
    params = jax.tree_util.tree_map_with_path(
      lambda path, x: x[:max_len] if path[0].key == "wpe" else x,
      params,
    )
  return cfg, graphdef, params


def random_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32):
  """Random ``(graphdef, params)`` of the config's shape (GPT-2 style N(0, 0.02) init)."""
  model = jax.jit(lambda: nnx.split(GPT(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1])
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
  return graphdef, model()
