"""How users meet s3jax: the library API (``LLM``) and the OpenAI-compatible server."""

from s3jax.serving.llm import LLM, QueueFullError, RequestOutput, RequestStats, SamplingParams, StreamEvent

__all__ = ["LLM", "QueueFullError", "RequestOutput", "RequestStats", "SamplingParams", "StreamEvent"]
