#!/usr/bin/env python
"""Starts the s3jax OpenAI-compatible server; the same as the ``s3jax-serve`` command.

python scripts/serve.py --model tiny --port 8000
python scripts/serve.py --help
"""

import sys

from s3jax.serving.cli import main

if __name__ == "__main__":
  sys.exit(main())
