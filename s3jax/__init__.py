"""s3jax: length-aware LLM serving on JAX/XLA (the S3 method).

Predict each request's output length, reserve only that much KV cache, batch
many more sequences in the same memory, and supervise mispredictions so no
answer is ever cut short.

The library API is imported lazily, so ``import s3jax.buckets`` or
``s3jax.scheduler`` (plain host code) does not pull in JAX and the server.
"""

__all__ = ["LLM", "QueueFullError", "RequestError", "RequestOutput", "SamplingParams", "StreamEvent"]


def __getattr__(name: str):
  if name in __all__:
    import s3jax.serving

    return getattr(s3jax.serving, name)
  raise AttributeError(f"module 's3jax' has no attribute {name!r}")
