"""s3jax: length-aware LLM serving on JAX/XLA (the S3 method).

Predict each request's output length, reserve only that much KV cache, batch
many more sequences in the same memory, and supervise mispredictions so no
answer is ever cut short.
"""

from s3jax.serving.llm import LLM, QueueFullError, RequestOutput, SamplingParams, StreamEvent

__all__ = ["LLM", "QueueFullError", "RequestOutput", "SamplingParams", "StreamEvent"]
