"""Running a model on the device: the runner, its device-resident step state, sampling, and the
decode ceiling (its decode executable timed alone).

This package sits above the model math (``s3jax.models``) and the device layout
(``s3jax.parallel``) and joins them: ``models`` and ``parallel`` never import it.
"""

from s3jax.executor.runner import ModelRunner, xla_compilations
from s3jax.executor.step_state import Admission, DecodeState, PrefillPack, StepShapes, StepUpdates

__all__ = ["Admission", "DecodeState", "ModelRunner", "PrefillPack", "StepShapes", "StepUpdates", "xla_compilations"]
