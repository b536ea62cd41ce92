"""Splitting a model over devices: the mesh, the sharding rules, pipeline stages, memory per device."""

from s3jax.parallel.mesh import AXES, MeshShape, make_mesh

__all__ = ["AXES", "MeshShape", "make_mesh"]
