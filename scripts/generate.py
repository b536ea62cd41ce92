"""Generate text from a prompt: a thin wrapper over ``s3jax.cli`` (``s3jax-generate``).

python scripts/generate.py --prompt "Once upon a time" --max-tokens 32
"""

import sys

from s3jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
