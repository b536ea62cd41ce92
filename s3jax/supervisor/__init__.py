"""Supervision of mispredictions: the record of observed lengths for retraining.

The overflow decision itself (move a sequence to a longer arena, or preempt
it) is host-side scheduling and lives beside the scheduler it must agree
with: ``s3jax.scheduler``.
"""

from s3jax.supervisor.log import LengthObservation, MispredictionLog

__all__ = ["LengthObservation", "MispredictionLog"]
