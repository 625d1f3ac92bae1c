"""CPU decode-path helpers of the reference kernels against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.grouped_gemm import _expert_of_rows, grouped_matmul_ref


@pytest.mark.parametrize("seed", range(6))
def test_expert_of_rows_is_searchsorted(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(1, 20))
    M = int(rng.integers(1, 4 * E + 1))
    sizes = rng.multinomial(int(rng.integers(0, M + 1)), np.ones(E) / E).astype(np.int32)
    sizes[rng.random(E) < 0.3] = 0                    # empty groups, also first and last
    ends = np.cumsum(sizes)
    want = np.searchsorted(ends, np.arange(M), side="right")   # E for rows past sum(sizes)
    got = np.asarray(jax.jit(_expert_of_rows, static_argnums=1)(jnp.asarray(sizes), M))
    np.testing.assert_array_equal(got, want)


def test_gather_path_edge_groups():
    """Few-row path: leading/trailing empty experts, all rows in one expert, no rows at all."""
    rng = np.random.default_rng(7)
    E, N, K, M = 6, 5, 7, 9
    x = rng.normal(size=(M, K)).astype(np.float32)
    w = rng.normal(size=(E, N, K)).astype(np.float32)
    for sizes in ([0, 0, 4, 0, 3, 0], [0, 0, 0, 0, 0, 9], [9, 0, 0, 0, 0, 0], [0] * 6, [1, 1, 1, 1, 1, 1]):
        got = np.asarray(grouped_matmul_ref(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32)))
        want = np.zeros((M, N))
        start = 0
        for e, s in enumerate(sizes):
            want[start:start + s] = x[start:start + s].astype(np.float64) @ w[e].T.astype(np.float64)
            start += s
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert np.all(got[start:] == 0.0)
