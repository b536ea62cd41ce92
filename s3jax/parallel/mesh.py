"""The device mesh: named axes over the devices a model runs on.

Two axes, always in this order:
  * ``stage``: pipeline stages; the layers are split into ``stage`` contiguous groups, one per
    group of devices, and batches flow from stage to stage (``s3jax.parallel.pipeline``);
  * ``model``: tensor parallelism inside a stage; attention heads and MLP columns are split
    Megatron-style over ``model`` devices, which exchange partial sums once per block half.

A ``MeshShape`` is what a user writes (``--mesh stage=2,model=4``); ``make_mesh`` lays it over
``jax.devices()`` (every process's devices under ``jax.distributed``), neighbouring devices in
one stage so that the heavy ``model`` collectives stay between devices that are close. There is
no ``data`` axis: replicas of a whole model are separate servers behind a load balancer, which
share nothing a mesh would help with.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("stage", "model")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MeshShape:
  """How many devices along each mesh axis."""

  stage: int = 1
  model: int = 1

  def __post_init__(self):
    for axis in AXES:
      if getattr(self, axis) < 1:
        raise ValueError(f"mesh axis {axis!r} must be at least 1, got {getattr(self, axis)}")

  @property
  def num_devices(self) -> int:
    return self.stage * self.model

  @property
  def is_single(self) -> bool:
    return self.num_devices == 1

  def __str__(self) -> str:
    return ",".join(f"{axis}={getattr(self, axis)}" for axis in AXES)

  @classmethod
  def parse(cls, text: str | MeshShape | None) -> MeshShape:
    """``"stage=2,model=4"`` (either axis may be left out: 1); None or "" is one device."""
    if isinstance(text, MeshShape):
      return text
    sizes = {}
    for part in filter(None, re.split(r"[,\s]+", text or "")):
      match = re.fullmatch(r"(\w+)=(\d+)", part)
      if match is None or match.group(1) not in AXES:
        raise ValueError(
          f"bad mesh axis {part!r} in {text!r}: write AXIS=N with AXIS one of {AXES}, e.g. --mesh stage=2,model=4"
        )
      sizes[match.group(1)] = int(match.group(2))
    return cls(**sizes)


def make_mesh(shape: MeshShape | str | None, devices=None) -> Mesh:
  """The mesh of ``shape`` over the first ``shape.num_devices`` of ``devices`` (default: every
  device of every process), stage-major."""
  shape = MeshShape.parse(shape)
  devices = list(jax.devices() if devices is None else devices)
  if shape.num_devices > len(devices):
    raise ValueError(
      f"mesh {shape} needs {shape.num_devices} devices, {len(devices)} are visible; on CPU force "
      f"more with XLA_FLAGS=--xla_force_host_platform_device_count={shape.num_devices}"
    )
  grid = np.array(devices[: shape.num_devices], dtype=object).reshape(shape.stage, shape.model)
  return Mesh(grid, AXES)


def as_mesh(mesh: Mesh | MeshShape | str | None) -> Mesh | None:
  """A mesh of more than one device, or None for one device (the unsharded path)."""
  if mesh is None or isinstance(mesh, Mesh):
    return mesh
  shape = MeshShape.parse(mesh)
  return None if shape.is_single else make_mesh(shape)


def mesh_shape(mesh: Mesh) -> MeshShape:
  return MeshShape(**{axis: mesh.shape[axis] for axis in AXES})


def check_divisible(what: str, size: int, axis: str, degree: int) -> None:
  """A model dimension a mesh axis splits must divide evenly (a clear error otherwise)."""
  if size % degree:
    divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
    raise ValueError(f"{what} = {size} does not split over {axis}={degree}; choose {axis} among {divisors}")
