"""Output-length buckets: the S3 paper's length classes, which label reservations.

A `BucketScheme` is an increasing tuple of inclusive upper bounds
`u_0 < u_1 < ... < u_{N-1}` in output tokens. Bucket `b` holds the lengths
`u_{b-1} < length <= u_b` (with `u_{-1} = -1`, so length 0 is in bucket 0).
The predictor reserves a token count, not a bucket (see
`s3jax/predictor/calibration.py`); buckets name it in metrics and logs, give
the paper's exact / within-one accuracy, and `upper_bound(b) = u_b` is the
reservation of the fixed-bucket baseline. `max_length`, the last bound, is
the longest reservation: the engine never generates past it.

Three ways to place the bounds (`BucketKind`):
  * EQUAL_WIDTH: `N` equal buckets over `max_length` (the S3 paper: 10 buckets
    over 2048 tokens). Simple, but on short-answer models almost everything
    lands in bucket 0, so exact accuracy says little.
  * QUANTILE: bounds at the `1/N ... (N-1)/N` quantiles of observed lengths,
    so each bucket holds about the same number of requests.
  * GEOMETRIC: bounds grow by a constant ratio from `min_bound` to
    `max_length`, so the worst relative over-reservation inside a bucket is
    the same everywhere (length uncertainty is multiplicative).

Kept free of JAX (numpy only): the scheme is plain host data, read by the predictor, its
checkpoints and its evaluation without a device.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np

SCHEME_FILENAME = "buckets.json"


class BucketKind(enum.Enum):
  EQUAL_WIDTH = "equal_width"
  QUANTILE = "quantile"
  GEOMETRIC = "geometric"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BucketScheme:
  """Bucket boundaries and the label <-> length mapping.

  Attributes:
    upper_bounds: inclusive upper bound of each bucket, strictly increasing,
      in output tokens; the last one is the maximum output length.
    kind: how the bounds were chosen (for provenance only).
  """

  upper_bounds: tuple[int, ...]
  kind: BucketKind = BucketKind.EQUAL_WIDTH

  def __post_init__(self):
    bounds = tuple(int(u) for u in self.upper_bounds)
    if not bounds:
      raise ValueError("a bucket scheme needs at least one bucket")
    if bounds[0] < 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
      raise ValueError(f"upper bounds must be >= 0 and increasing: {bounds}")
    object.__setattr__(self, "upper_bounds", bounds)

  # Constructors.

  @classmethod
  def equal_width(cls, num_buckets: int = 10, max_length: int = 2048) -> BucketScheme:
    """`num_buckets` buckets of width `max_length / num_buckets` (rounded)."""
    bounds = [round(max_length * (i + 1) / num_buckets) for i in range(num_buckets)]
    return cls(upper_bounds=tuple(bounds), kind=BucketKind.EQUAL_WIDTH)

  @classmethod
  def geometric(cls, num_buckets: int = 10, max_length: int = 2048, min_bound: int = 32) -> BucketScheme:
    """Bounds `min_bound * r**i` up to `max_length`, r constant."""
    if num_buckets == 1:
      return cls(upper_bounds=(max_length,), kind=BucketKind.GEOMETRIC)
    ratio = (max_length / min_bound) ** (1.0 / (num_buckets - 1))
    bounds = [round(min_bound * ratio**i) for i in range(num_buckets - 1)]
    return cls(upper_bounds=_strictly_increasing(bounds + [max_length]), kind=BucketKind.GEOMETRIC)

  @classmethod
  def quantile(cls, lengths: Sequence[int] | np.ndarray, num_buckets: int = 10, max_length: int = 2048) -> BucketScheme:
    """Bounds at the quantiles of `lengths`, the last one at `max_length`.

    Ties (many equal lengths) can merge quantiles; bounds are then nudged up
    by one token so the scheme still has `num_buckets` buckets.
    """
    lengths = np.minimum(np.asarray(lengths, dtype=np.float64), max_length)
    qs = np.arange(1, num_buckets) / num_buckets
    bounds = [int(math.ceil(q)) for q in np.quantile(lengths, qs)]
    return cls(upper_bounds=_strictly_increasing(bounds + [max_length]), kind=BucketKind.QUANTILE)

  @classmethod
  def make(
    cls, kind: BucketKind, *, num_buckets: int = 10, max_length: int = 2048, lengths=None, min_bound: int = 32
  ) -> BucketScheme:
    """Builds a scheme of `kind`; QUANTILE needs `lengths`."""
    if kind is BucketKind.EQUAL_WIDTH:
      return cls.equal_width(num_buckets, max_length)
    if kind is BucketKind.GEOMETRIC:
      return cls.geometric(num_buckets, max_length, min_bound)
    if lengths is None:
      raise ValueError("a quantile scheme needs observed lengths")
    return cls.quantile(lengths, num_buckets, max_length)

  # Mapping.

  @property
  def num_buckets(self) -> int:
    return len(self.upper_bounds)

  @property
  def max_length(self) -> int:
    return self.upper_bounds[-1]

  @property
  def lower_bounds(self) -> tuple[int, ...]:
    """Inclusive lower bound of each bucket (0 for the first)."""
    return (0,) + tuple(u + 1 for u in self.upper_bounds[:-1])

  def bucket_of(self, length):
    """Bucket index of an output length (int, or numpy array of any shape).

    Negative lengths raise; lengths above `max_length` map to the last bucket.
    """
    arr = np.asarray(length)
    if np.any(arr < 0):
      raise ValueError("lengths must be >= 0")
    idx = np.searchsorted(np.asarray(self.upper_bounds), arr, side="left")
    idx = np.minimum(idx, self.num_buckets - 1)
    return int(idx) if idx.ndim == 0 else idx.astype(np.int32)

  def upper_bound(self, bucket):
    """Tokens to reserve for `bucket` (int, or numpy array of indices)."""
    arr = np.asarray(bucket)
    if np.any((arr < 0) | (arr >= self.num_buckets)):
      raise ValueError(f"bucket out of range [0, {self.num_buckets})")
    out = np.asarray(self.upper_bounds, dtype=np.int64)[arr]
    return int(out) if out.ndim == 0 else out

  # Serialisation.

  def to_dict(self) -> dict:
    return {"kind": self.kind.value, "upper_bounds": list(self.upper_bounds)}

  @classmethod
  def from_dict(cls, d: dict) -> BucketScheme:
    return cls(upper_bounds=tuple(d["upper_bounds"]), kind=BucketKind(d.get("kind", BucketKind.EQUAL_WIDTH.value)))

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> BucketScheme:
    return cls.from_dict(json.loads(text))

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes `buckets.json` into `directory` (beside a checkpoint)."""
    path = pathlib.Path(directory) / SCHEME_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
    return path

  @classmethod
  def load(cls, directory: str | pathlib.Path) -> BucketScheme:
    path = pathlib.Path(directory)
    if path.is_dir():
      path = path / SCHEME_FILENAME
    return cls.from_json(path.read_text())

  def describe(self) -> str:
    return f"{self.kind.value}[{','.join(map(str, self.upper_bounds))}]"


def _strictly_increasing(bounds: list[int]) -> tuple[int, ...]:
  """Nudges duplicate bounds up by one token; the last bound stays fixed."""
  out = []
  for u in bounds:
    out.append(max(int(u), out[-1] + 1) if out else max(int(u), 0))
  if out[-1] != bounds[-1]:
    raise ValueError(f"too many buckets for max_length {bounds[-1]}")
  return tuple(out)
