"""Peers in the same run: transformers' paged continuous batching (the vLLM design) on the same
trace, model shape and KV byte budget.

transformers 5.x ships continuous batching with a paged KV cache allocated on demand (pages as
sequences grow, no reservation) that runs on CPU with torch. It has no length predictor: every
request is forced to its trace length with ``max_new_tokens`` and ``eos_token_id=-1``. It is an
optional extra (``pip install -e ".[bench]"``), never a dependency of the engine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from s3jax.extras import missing_extra
from s3jax.models.config import Family, ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeerRun:
  name: str
  wall_s: float
  output_tokens: int
  settings: dict

  @property
  def tokens_per_s(self) -> float:
    return self.output_tokens / self.wall_s


def transformers_model(cfg: ModelConfig, seed: int = 0):
  """A random-weight transformers PyTorch model of ``cfg``'s shape (GPT-2 family)."""
  try:
    import torch
  except ModuleNotFoundError as e:
    raise missing_extra(e, "bench", "the transformers peer") from e
  from transformers import GPT2Config, GPT2LMHeadModel

  if cfg.family is not Family.GPT2:
    raise ValueError(f"the transformers peer is built for GPT-2 shapes, not {cfg.family.value}")
  torch.manual_seed(seed)
  return GPT2LMHeadModel(
    GPT2Config(
      vocab_size=cfg.vocab_size,
      n_positions=cfg.max_seq_len,
      n_embd=cfg.d_model,
      n_layer=cfg.n_layers,
      n_head=cfg.n_heads,
      n_inner=cfg.d_ff,
    )
  ).eval()


def transformers_continuous_batching(
  model,
  prompt_ids: Sequence[list[int]],
  output_lens: Sequence[int],
  *,
  budget_tokens: int,
  page_size: int = 32,
  max_batch_tokens: int = 512,
  warmup: bool = True,
) -> PeerRun:
  """Replays the requests (all at once) through ``model.init_continuous_batching``.

  Args:
    model: a transformers causal LM (fp32, eval).
    prompt_ids, output_lens: the trace: each request generates exactly its length.
    budget_tokens: the KV budget in tokens (``num_blocks * page_size``), as s3jax's byte budget.
    page_size, max_batch_tokens: the paged cache's page and the tokens one forward may take.
    warmup: run one short request first (untimed) so lazy initialization is not timed.
  """
  from transformers import GenerationConfig
  from transformers.generation.configuration_utils import ContinuousBatchingConfig

  cb = ContinuousBatchingConfig(
    page_size=page_size,
    num_blocks=budget_tokens // page_size,
    max_batch_tokens=max_batch_tokens,
    allow_block_sharing=False,
    use_cuda_graph=False,
  )
  generation = GenerationConfig(do_sample=False, max_new_tokens=max(output_lens), eos_token_id=-1)

  def run(prompts, lens) -> float:
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=cb)
    manager.start()
    t0 = time.perf_counter()
    for i, (ids, n) in enumerate(zip(prompts, lens)):
      manager.add_request(list(ids), request_id=f"r{i}", max_new_tokens=int(n), eos_token_id=-1)
    done: dict[str, int] = {}
    while len(done) < len(prompts):
      result = manager.get_result(timeout=1)
      if result is not None and result.is_finished():
        done[result.request_id] = len(result.generated_tokens)
    wall = time.perf_counter() - t0
    manager.stop(block=True)
    if [done[f"r{i}"] for i in range(len(prompts))] != [int(n) for n in lens]:
      raise RuntimeError("the transformers peer did not generate the requested lengths")
    return wall

  if warmup:
    run(prompt_ids[:1], [4])
  wall = run(prompt_ids, output_lens)
  return PeerRun(
    name="transformers continuous batching",
    wall_s=wall,
    output_tokens=int(sum(output_lens)),
    settings={
      "page_size": page_size,
      "num_blocks": budget_tokens // page_size,
      "max_batch_tokens": max_batch_tokens,
      "budget_tokens": budget_tokens,
    },
  )


def static_batches(prompt_lens: Sequence[int], output_lens: Sequence[int], budget_tokens: int) -> list[list[int]]:
  """Requests in arrival order cut into static batches whose KV fits ``budget_tokens``.

  A static batch pads every prompt to its longest and runs until its longest answer ends, so it
  holds ``size x (longest prompt + longest answer)`` tokens of KV by its last step.
  """
  batches: list[list[int]] = []
  prompt_max = output_max = 0
  for i, (p, n) in enumerate(zip(prompt_lens, output_lens)):
    wide_p, wide_n = max(prompt_max, p), max(output_max, n)
    if batches and (len(batches[-1]) + 1) * (wide_p + wide_n) <= budget_tokens:
      batches[-1].append(i)
      prompt_max, output_max = wide_p, wide_n
    else:
      if p + n > budget_tokens:
        raise ValueError(f"request {i} ({p} + {n} tokens) alone exceeds the budget of {budget_tokens} tokens")
      batches.append([i])
      prompt_max, output_max = p, n
  return batches


def transformers_static_batching(
  model, prompt_ids: Sequence[list[int]], output_lens: Sequence[int], *, budget_tokens: int, warmup: bool = True
) -> PeerRun:
  """Hugging Face ``generate`` on static batches (``static_batches``) at the same KV budget.

  Every batch runs to its longest answer (``eos_token_id=None``: random weights never stop); only
  each request's own trace length counts as output, so the padding rows' work is the cost of
  static batching.
  """
  try:
    import torch
  except ModuleNotFoundError as e:
    raise missing_extra(e, "bench", "the transformers peer") from e

  batches = static_batches([len(p) for p in prompt_ids], output_lens, budget_tokens)

  def run(batch: list[int]) -> None:
    width = max(len(prompt_ids[i]) for i in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(batch):  # left padding: every answer starts at the same column
      ids[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
      mask[row, width - len(prompt_ids[i]) :] = 1
    longest = max(int(output_lens[i]) for i in batch)
    with torch.no_grad():
      out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=longest,
        min_new_tokens=longest,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )
    if out.shape[1] != width + longest:
      raise RuntimeError("the static-batching peer did not generate the requested lengths")

  if warmup:
    run([0])
  t0 = time.perf_counter()
  for batch in batches:
    run(batch)
  wall = time.perf_counter() - t0
  return PeerRun(
    name="HF generate, static batches",
    wall_s=wall,
    output_tokens=int(sum(output_lens)),
    settings={"batches": len(batches), "mean_batch": len(output_lens) / len(batches), "budget_tokens": budget_tokens},
  )
