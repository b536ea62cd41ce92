"""The wheel carries the repository's ``configs/``, ``checkpoints/`` and ``data/`` as ``s3jax/_assets/``
(``s3jax.assets`` finds them there); everything else is in ``pyproject.toml``."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSETS = ("configs", "checkpoints", "data")


class BuildPyWithAssets(build_py):
  def run(self):
    super().run()
    if self.editable_mode:  # an editable install reads them in place
      return
    for name in ASSETS:
      if Path(name).is_dir():
        self.copy_tree(name, str(Path(self.build_lib) / "s3jax" / "_assets" / name))


setup(cmdclass={"build_py": BuildPyWithAssets})
