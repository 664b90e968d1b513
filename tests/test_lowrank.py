"""surgeon.lowrank: truncated SVD through the Gram matrix (the weight-space factors; tucker's
and svd's own tests check them inside the plugins)."""

from __future__ import annotations

import numpy as np
import pytest

from surgeon import lowrank


def test_leading_pairs_only_match_the_full_factorization():
    """matrix_factors(w, rank) (dsyrk Gram, index-subset eigensolver) gives the leading part of
    the full result: the same rank-r product within 1e-10, repeatably to the bit."""
    rng = np.random.default_rng(30)
    w = rng.standard_normal((600, 300)) * np.geomspace(10, 0.1, 300)  # in > out: the out side, 300 >= SUBSET_GRAM
    assert min(w.shape) >= lowrank.SUBSET_GRAM
    full = lowrank.matrix_factors(w)
    for r in (1, 75, 299):
        part = lowrank.matrix_factors(w, r)
        assert part.vectors.shape == (300, r)
        np.testing.assert_allclose(part.values, full.values[:r], rtol=1e-10)
        a, b = part.pair(r)
        fa, fb = full.pair(r)
        assert np.linalg.norm(a @ b - fa @ fb) <= 1e-10 * np.linalg.norm(fa @ fb)
    assert part.energy == pytest.approx(float(np.sum(full.values ** 2)), rel=1e-12)
    again = lowrank.matrix_factors(w, 75)
    assert again.vectors.tobytes() == lowrank.matrix_factors(w, 75).vectors.tobytes()
    np.testing.assert_allclose(lowrank.gram(w.T), w.T @ w, rtol=1e-12, atol=1e-9)
