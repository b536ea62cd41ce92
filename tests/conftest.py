"""Suite-wide settings: one persistent XLA compilation cache for the whole run, in a temporary
directory (set before s3jax is imported, so every ``LLM`` and every server process uses it):
engines of the same shapes in different tests load their executables instead of compiling."""

import os
import tempfile

os.environ.setdefault("S3JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="s3jax-test-xla-"))
