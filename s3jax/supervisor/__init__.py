"""Supervision of mispredictions: the record of observed lengths, and online retraining from it.

The overflow decision itself (grow a sequence's reservation, or preempt it) is host-side scheduling
and lives beside the scheduler it must agree with: ``s3jax.scheduler``. ``s3jax.supervisor.retrainer``
(imported on demand: it brings Optax and Orbax) retrains the length predictor from the log.
"""

from s3jax.supervisor.log import LengthObservation, MispredictionLog

__all__ = ["LengthObservation", "MispredictionLog"]
