"""The memory model per device: what each device of a mesh holds, predicted before allocating.

On every device:
  * parameters: each block's arrays ÷ (stages × the tensor split of that array), the embedding
    and head ÷ their tensor split (every stage holds them: the first embeds, the last projects,
    and on small meshes they are a few percent of the weights);
  * KV cache: the pool ÷ (stages × model), its pages split by layer and by kv head (÷ stages
    only when ``model`` does not divide the kv heads: each of those devices holds them all);
  * workspace: the temporaries of the largest step (``workspace_bytes``, an estimate checked
    against XLA's own figure for the compiled executables at warm-up).

Every number comes from the same ``rules.spec_for`` the runner places arrays with, so the
prediction is exact for parameters and pool (tested against the arrays' shards). A memory
budget per device then becomes the pool's total size: (device bytes - parameters - workspace) ×
stages × model (``kv_budget_for_device``); the scheduler keeps counting the pool as a whole,
which is the same budget on every device.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from s3jax.models import gpt, kv_cache
from s3jax.models.config import ModelConfig
from s3jax.parallel import rules
from s3jax.parallel.mesh import AXES, MeshShape


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceMemory:
  """Bytes on the fullest device of a mesh."""

  params: int
  kv: int
  workspace: int

  @property
  def total(self) -> int:
    return self.params + self.kv + self.workspace

  def describe(self) -> str:
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    return (
      f"per device: parameters {mib(self.params)} + KV cache {mib(self.kv)} + workspace {mib(self.workspace)} "
      f"= {mib(self.total)}"
    )


def _sizes(shape: MeshShape) -> dict[str, int]:
  return {axis: getattr(shape, axis) for axis in AXES}


def param_bytes_per_device(cfg: ModelConfig, dtype, shape: MeshShape) -> int:
  """Parameter bytes each device holds under ``shape``: the embeddings and head, plus its stage's
  share of the blocks. The blocks are all alike, so one block's abstract state stands for them
  (tracing every block cost seconds for a 96-layer model at every engine start)."""
  sizes, dtype, units = _sizes(shape), jnp.dtype(dtype), rules.head_units(cfg)

  def split_bytes(make) -> int:
    abstract = nnx.state(nnx.eval_shape(make))
    return sum(
      leaf.size
      * leaf.dtype.itemsize
      // rules.ways(rules.spec_for(rules.param_axes(path), leaf.shape, sizes, units), sizes)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    )

  shell = split_bytes(lambda: gpt.GPT(cfg.replace(n_layers=0), dtype=dtype, rngs=nnx.Rngs(0)))
  block = split_bytes(lambda: gpt.Block(cfg, dtype, nnx.Rngs(0)))
  return shell + cfg.n_layers * block // shape.stage


def pool_ways(cfg: ModelConfig, shape: MeshShape, page_size: int = 64) -> int:
  """Into how many pieces the mesh cuts the KV pool: stages × model, or stages alone when
  ``model`` does not divide the kv heads (the pages themselves are never split)."""
  dims = kv_cache.layer_shape(cfg, 1, page_size, shape.stage)
  axes = ("stage",) * (len(dims) - len(rules.POOL_AXES)) + rules.POOL_AXES
  sizes = _sizes(shape)
  return rules.ways(rules.spec_for(axes, dims, sizes), sizes)


def kv_bytes_per_device(cfg: ModelConfig, num_pages: int, page_size: int, dtype, shape: MeshShape) -> int:
  """KV pool bytes each device holds."""
  return kv_cache.pool_bytes(cfg, num_pages, page_size, dtype) // pool_ways(cfg, shape, page_size)


def workspace_bytes(cfg: ModelConfig, shape: MeshShape, *, max_batch: int, max_prefill: int) -> int:
  """An estimate of the largest step's temporaries per device, in fp32: the prefill's attention
  (three [N, T, T] arrays live at once: the scores, the masked scores and the probabilities; XLA's
  figure for a packed prefill of 512 and 1,024 tokens was 3.0 N T^2 for GPT-2 and Llama shapes
  alike) and MLP activations for its heads and columns, or the decode's sampler (its radix search
  over the vocabulary keeps about a dozen [B, V] arrays: 12 B V matched XLA's own figure within 5%
  on one device and over-covers it split; BENCHMARKS.md "Multi-device"). The engine's warm-up
  compares it with the compiled executables and warns when it fell short."""
  model = shape.model
  prefill = 3 * max_prefill * max_prefill * cfg.n_heads // model + max_prefill * (4 * cfg.d_model + cfg.d_ff // model)
  decode = 12 * max_batch * cfg.vocab_size
  return 4 * max(prefill, decode) + (1 << 20)  # and a MiB of per-row vectors and scalars


def device_memory(
  cfg: ModelConfig, dtype, shape: MeshShape, *, num_pages: int, page_size: int, max_batch: int, max_prefill: int
) -> DeviceMemory:
  return DeviceMemory(
    params=param_bytes_per_device(cfg, dtype, shape),
    kv=kv_bytes_per_device(cfg, num_pages, page_size, dtype, shape),
    workspace=workspace_bytes(cfg, shape, max_batch=max_batch, max_prefill=max_prefill),
  )


def kv_budget_for_device(
  cfg: ModelConfig, dtype, shape: MeshShape, device_bytes: int, *, max_batch: int, max_prefill: int
) -> int:
  """The whole pool's bytes that leave each device ``device_bytes`` after parameters and
  workspace (times the pieces the pool is cut into); a clear error when the weights alone do not
  fit."""
  params = param_bytes_per_device(cfg, dtype, shape)
  workspace = workspace_bytes(cfg, shape, max_batch=max_batch, max_prefill=max_prefill)
  left = device_bytes - params - workspace
  if left <= 0:
    raise ValueError(
      f"{device_bytes / 2**20:,.0f} MiB per device does not hold {cfg.name}'s parameters "
      f"({params / 2**20:,.0f} MiB per device on mesh {shape}) and workspace "
      f"({workspace / 2**20:,.0f} MiB): give more memory per device or split the model over more "
      f"devices (--mesh stage=...,model=...)"
    )
  return left * pool_ways(cfg, shape)


def measured_bytes_per_device(tree) -> dict:
  """Bytes each device holds of ``tree``'s arrays, read from their shards."""
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return dict(out)
