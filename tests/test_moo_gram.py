"""dist_soup.moo.gram: per-tensor Grams, the unbiased cross-worker estimate, PSD clipping."""

import pytest
import torch

from dist_soup.moo.gram import check_finite, cross_gram, local_grams, psd_clip


def test_local_grams_per_tensor_and_additive():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, generator=g)]
    grams = local_grams(rows)
    assert grams.shape == (3, 3, 3) and grams.dtype == torch.float64
    for l, r in enumerate(rows):
        flat = r.reshape(3, -1).double()
        torch.testing.assert_close(grams[l], flat @ flat.T, rtol=1e-6, atol=1e-6)
    full = torch.cat([r.reshape(3, -1) for r in rows], dim=1).double()
    torch.testing.assert_close(grams.sum(0), full @ full.T, rtol=1e-6, atol=1e-6)
    exact = local_grams(rows, dtype=torch.float64)
    torch.testing.assert_close(exact.sum(0), full @ full.T)


def test_local_grams_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        local_grams([])
    with pytest.raises(ValueError, match="same K"):
        local_grams([torch.zeros(3, 2), torch.zeros(2, 2)])
    with pytest.raises(TypeError):
        local_grams([[1.0, 2.0]])


def test_cross_gram_is_unbiased_and_plain_is_biased_on_the_diagonal():
    # Synthetic workers: true rows J (K x n), worker p sees J + noise_p (independent, var s^2).
    g = torch.Generator().manual_seed(1)
    k, n, p, sigma, trials = 3, 40, 4, 0.5, 4000
    true_j = torch.randn(k, n, generator=g, dtype=torch.float64) * 0.3
    true_g = true_j @ true_j.T
    noisy = true_j + sigma * torch.randn(trials, p, k, n, generator=g, dtype=torch.float64)
    jbar = noisy.mean(dim=1)  # (trials, K, n)
    mean_grams = jbar @ jbar.transpose(-1, -2)
    sum_local = (noisy @ noisy.transpose(-1, -2)).sum(dim=1)
    cross = cross_gram(mean_grams, sum_local, p)
    # Definition check on one trial: average of products of different workers' rows.
    t = noisy[0]
    pairs = sum(t[a] @ t[b].T for a in range(p) for b in range(p) if a != b) / (p * (p - 1))
    torch.testing.assert_close(cross[0], pairs)
    est = cross.mean(0)
    se = cross.std(0) / trials**0.5
    assert torch.all((est - true_g).abs() < 5 * se + 1e-9), (est, true_g, se)
    # Plain (the Gram of the averaged rows): the diagonal carries n * sigma^2 / P of noise on average.
    plain = mean_grams.mean(0)
    bias = torch.diagonal(plain - true_g)
    expected = n * sigma**2 / p
    assert torch.allclose(bias, torch.full_like(bias, expected), rtol=0.1)
    assert float(bias.min()) > 20 * float(torch.diagonal(se).max())


def test_cross_gram_one_worker_is_plain_and_errors():
    m = torch.eye(2, dtype=torch.float64)
    assert cross_gram(m, 3 * m, 1) is m
    with pytest.raises(ValueError, match="world_size"):
        cross_gram(m, m, 0)
    with pytest.raises(ValueError, match="same shape"):
        cross_gram(m, torch.eye(3), 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., K, K\)"):
        cross_gram(torch.zeros(2, 3), torch.zeros(2, 3), 2)


def test_psd_clip_single_and_batched():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    sym = a + a.T  # indefinite
    assert float(torch.linalg.eigvalsh(sym).min()) < 0
    clipped = psd_clip(sym)
    evals, evecs = torch.linalg.eigh(sym)
    expected = evecs @ torch.diag(evals.clamp(min=0)) @ evecs.T
    torch.testing.assert_close(clipped, expected)
    assert float(torch.linalg.eigvalsh(clipped).min()) > -1e-12
    psd = a @ a.T
    torch.testing.assert_close(psd_clip(psd), psd)
    batch = torch.stack([sym, psd, -psd])
    out = psd_clip(batch)
    assert out.shape == (3, 4, 4)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[2], torch.zeros(4, 4, dtype=torch.float64), atol=1e-10, rtol=0)
    assert psd_clip(sym.float()).dtype == torch.float32


def test_check_finite():
    check_finite(torch.eye(2), "gram")
    with pytest.raises(ValueError, match="my gram"):
        check_finite(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "my gram")
    with pytest.raises(ValueError, match="non-finite"):
        psd_clip(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]))
