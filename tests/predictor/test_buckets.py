"""Bucket scheme: hand-written label <-> length cases, JSON round trips."""

import numpy as np
import pytest

from s3jax.buckets import BucketKind, BucketScheme


def test_equal_width_paper_setting():
  s = BucketScheme.equal_width(10, 2048)
  assert s.upper_bounds == (205, 410, 614, 819, 1024, 1229, 1434, 1638, 1843, 2048)
  assert s.num_buckets == 10 and s.max_length == 2048
  cases = {0: 0, 1: 0, 205: 0, 206: 1, 410: 1, 411: 2, 2047: 9, 2048: 9, 2049: 9, 9500: 9}
  for length, bucket in cases.items():
    assert s.bucket_of(length) == bucket, length
  assert s.upper_bound(0) == 205 and s.upper_bound(9) == 2048
  assert s.lower_bounds[:3] == (0, 206, 411)


def test_round_trip_every_bucket():
  for s in (BucketScheme.equal_width(10, 2048), BucketScheme.geometric(), BucketScheme.equal_width(4, 100)):
    for b in range(s.num_buckets):
      assert s.bucket_of(s.upper_bound(b)) == b
      assert s.bucket_of(s.lower_bounds[b]) == b
    # A length always fits the reservation of its own bucket.
    lengths = np.arange(0, s.max_length + 1)
    assert np.all(s.upper_bound(s.bucket_of(lengths)) >= lengths)


def test_vectorised_matches_scalar():
  s = BucketScheme.equal_width(4, 100)  # bounds 25, 50, 75, 100
  lengths = np.array([[0, 25, 26], [50, 99, 1000]])
  got = s.bucket_of(lengths)
  assert got.shape == (2, 3) and got.dtype == np.int32
  np.testing.assert_array_equal(got, [[0, 0, 1], [1, 3, 3]])
  np.testing.assert_array_equal(s.upper_bound(np.array([0, 3, 1])), [25, 100, 50])
  assert isinstance(s.bucket_of(30), int)
  assert isinstance(s.upper_bound(2), int)


def test_geometric_and_quantile():
  g = BucketScheme.geometric(10, 2048, min_bound=32)
  assert g.upper_bounds[0] == 32 and g.upper_bounds[-1] == 2048
  assert g.kind is BucketKind.GEOMETRIC
  ratios = np.diff(np.log(g.upper_bounds))
  assert np.allclose(ratios, ratios[0], atol=0.02)
  lengths = np.arange(1, 1001)
  q = BucketScheme.quantile(lengths, 4, 2048)
  assert q.upper_bounds == (251, 501, 751, 2048)
  counts = np.bincount(q.bucket_of(lengths))
  assert counts.tolist() == [251, 250, 250, 249]
  # Heavy ties still give strictly increasing bounds.
  tied = BucketScheme.quantile([5] * 100 + [10], 4, 50)
  assert tied.upper_bounds == (5, 6, 7, 50)


def test_json_and_file_round_trip(tmp_path):
  for s in (BucketScheme.equal_width(), BucketScheme.geometric(8, 1024, 16), BucketScheme.quantile(np.arange(500), 5)):
    assert BucketScheme.from_json(s.to_json()) == s
    s.save(tmp_path)
    assert BucketScheme.load(tmp_path) == s


def test_invalid():
  with pytest.raises(ValueError):
    BucketScheme(upper_bounds=(10, 10))
  with pytest.raises(ValueError):
    BucketScheme(upper_bounds=())
  s = BucketScheme.equal_width(4, 100)
  with pytest.raises(ValueError):
    s.bucket_of(-1)
  with pytest.raises(ValueError):
    s.upper_bound(4)
