"""How users meet s3jax: the library API (``LLM``) and the OpenAI-compatible server."""

from s3jax.errors import QueueFullError, RequestError
from s3jax.serving.inputs import SamplingParams
from s3jax.serving.llm import LLM
from s3jax.serving.outputs import RequestOutput, RequestStats, StreamEvent

__all__ = ["LLM", "QueueFullError", "RequestError", "RequestOutput", "RequestStats", "SamplingParams", "StreamEvent"]
