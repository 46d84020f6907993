import math

import numpy as np
import pytest
import torch

from uq_box.methods.predictive_classification import (
    classification_predictive,
    confidence_score,
    variance_decomposition,
)


def _logits(s: int = 7, n: int = 13, c: int = 5, scale: float = 3.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(s, n, c, generator=gen, dtype=torch.float64)


def _numpy_entropies(logits: np.ndarray):
    """Direct float64 numpy reference: softmax, then entropies by the textbook formulas."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    pbar = p.mean(0)
    total = -(pbar * np.log(pbar)).sum(-1)
    aleatoric = -(p * np.log(p)).sum(-1).mean(0)
    return pbar, total, aleatoric, total - aleatoric


def test_predictive_matches_numpy_reference():
    logits = _logits()
    out = classification_predictive(logits)
    pbar, total, aleatoric, mi = _numpy_entropies(logits.numpy())
    np.testing.assert_allclose(out["pred"].numpy(), pbar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["pred_uct"].numpy(), total, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["aleatoric_uct"].numpy(), aleatoric, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["epistemic_uct"].numpy(), mi, rtol=1e-8, atol=1e-12)
    assert out["logits"] is logits
    assert out["pred"].shape == (13, 5)
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert out[key].shape == (13,)


def test_predictive_float32_close_to_float64():
    logits = _logits(scale=5.0)
    out64 = classification_predictive(logits)
    out32 = classification_predictive(logits.float())
    for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert out32[key].dtype == torch.float32
        torch.testing.assert_close(out32[key].double(), out64[key], rtol=1e-4, atol=1e-5)


def test_predictive_identities():
    c = 6
    out = classification_predictive(_logits(c=c, scale=4.0))
    torch.testing.assert_close(out["pred"].sum(-1), torch.ones(13, dtype=torch.float64))
    assert (out["epistemic_uct"] >= 0).all()
    assert (out["aleatoric_uct"] >= 0).all()
    assert (out["pred_uct"] <= math.log(c) + 1e-12).all()
    torch.testing.assert_close(
        out["pred_uct"], out["aleatoric_uct"] + out["epistemic_uct"], rtol=1e-12, atol=1e-12
    )


def test_mutual_information_zero_when_samples_agree():
    one = _logits(s=1)
    agreeing = one.expand(9, -1, -1)
    out = classification_predictive(agreeing)
    torch.testing.assert_close(out["epistemic_uct"], torch.zeros(13, dtype=torch.float64))
    torch.testing.assert_close(out["pred_uct"], out["aleatoric_uct"])
    # A single sample has no epistemic part either.
    assert (classification_predictive(one)["epistemic_uct"] == 0).all()


def test_uniform_entropy_is_log_c():
    c = 10
    out = classification_predictive(torch.zeros(4, 3, c))
    torch.testing.assert_close(out["pred_uct"], torch.full((3,), math.log(c)))
    torch.testing.assert_close(out["aleatoric_uct"], torch.full((3,), math.log(c)))
    torch.testing.assert_close(out["epistemic_uct"], torch.zeros(3))


def test_disagreeing_one_hot_samples_have_all_epistemic():
    # Two confident samples voting for different classes: H[pbar] = log 2, E H[p_s] = 0.
    logits = torch.tensor([[[1e4, -1e4]], [[-1e4, 1e4]]])
    out = classification_predictive(logits)
    torch.testing.assert_close(out["pred"], torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(out["pred_uct"], torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(out["aleatoric_uct"], torch.tensor([0.0]))
    torch.testing.assert_close(out["epistemic_uct"], torch.tensor([math.log(2.0)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_with_saturated_logits(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = 1e4 * torch.randn(5, 20, 4, generator=gen).sign().to(dtype)
    logits[..., 0] = -float("inf")  # a masked class: probability exactly 0
    out = classification_predictive(logits)
    for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert torch.isfinite(out[key]).all(), key
    assert (out["aleatoric_uct"] >= 0).all()
    assert (out["pred"][:, 0] == 0).all()


def test_gradients_finite_with_masked_class():
    logits = _logits(s=3, n=4, c=3).clone()
    logits[..., 0] = -float("inf")
    logits.requires_grad_(True)
    out = classification_predictive(logits)
    (out["pred_uct"] + out["epistemic_uct"]).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_predictive_bad_input():
    with pytest.raises(ValueError, match=r"`logits` must have shape \[S, N, C\]"):
        classification_predictive(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="`logits` holds NaN"):
        classification_predictive(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(ValueError, match="only -inf"):
        classification_predictive(torch.full((2, 1, 3), -float("inf")))


def _probs(s: int = 8, n: int = 11, c: int = 4, seed: int = 0):
    return _logits(s, n, c, scale=2.0, seed=seed).softmax(-1)


def test_variance_decomposition_matches_seed_formula():
    probs = _probs()
    p = probs.numpy()
    aleatoric, epistemic = variance_decomposition(probs)
    np.testing.assert_allclose(aleatoric.numpy(), np.mean(p - np.square(p), axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        epistemic.numpy(), np.mean(np.square(p - p.mean(0)), axis=0), rtol=1e-12
    )
    assert aleatoric.shape == epistemic.shape == (11, 4)


def test_variance_decomposition_full_matrices_sum_to_total_covariance():
    probs = _probs()
    pbar = probs.mean(0)
    aleatoric, epistemic = variance_decomposition(probs, full=True)
    assert aleatoric.shape == epistemic.shape == (11, 4, 4)
    total = torch.diag_embed(pbar) - pbar[:, :, None] * pbar[:, None, :]
    torch.testing.assert_close(aleatoric + epistemic, total, rtol=1e-12, atol=1e-14)
    # Direct per-sample outer products, and the diagonals equal the default output.
    p = probs.numpy()
    ref_alea = np.mean([np.stack([np.diag(q) - np.outer(q, q) for q in ps]) for ps in p], axis=0)
    d = p - p.mean(0)
    ref_epi = np.mean([np.stack([np.outer(q, q) for q in ds]) for ds in d], axis=0)
    np.testing.assert_allclose(aleatoric.numpy(), ref_alea, atol=1e-14)
    np.testing.assert_allclose(epistemic.numpy(), ref_epi, atol=1e-14)
    diag_alea, diag_epi = variance_decomposition(probs)
    torch.testing.assert_close(torch.diagonal(aleatoric, dim1=1, dim2=2), diag_alea)
    torch.testing.assert_close(torch.diagonal(epistemic, dim1=1, dim2=2), diag_epi)
    # Covariance matrices: symmetric and positive semi-definite.
    torch.testing.assert_close(epistemic, epistemic.transpose(1, 2))
    assert (torch.linalg.eigvalsh(aleatoric) > -1e-12).all()
    assert (torch.linalg.eigvalsh(epistemic) > -1e-12).all()
    # Diagonal identity: per-class total variance is pbar (1 - pbar).
    torch.testing.assert_close(diag_alea + diag_epi, pbar * (1 - pbar))


def _seed_confidence_score(p: np.ndarray) -> np.ndarray:
    """Verbatim from the vinn package README (Deodato et al. 2020)."""
    p_mean = np.mean(p, axis=0)
    aleatoric = np.mean(p - np.square(p), axis=0)
    epistemic = np.mean(np.square(p - p_mean), axis=0)
    u = aleatoric + epistemic
    u = u[np.arange(len(p_mean)), np.argmax(p_mean, axis=1)]
    return 1 - 2 * np.sqrt(u)


def test_confidence_score_matches_seed():
    probs = _probs(seed=3)
    aleatoric, epistemic = variance_decomposition(probs)
    k = probs.mean(0).argmax(-1, keepdim=True)
    score = confidence_score((aleatoric + epistemic).gather(-1, k).squeeze(-1))
    np.testing.assert_allclose(score.numpy(), _seed_confidence_score(probs.numpy()), rtol=1e-12)
    assert ((score >= 0) & (score <= 1)).all()


def test_confidence_score_range_and_errors():
    torch.testing.assert_close(
        confidence_score(torch.tensor([0.0, 0.25])), torch.tensor([1.0, 0.0])
    )
    with pytest.raises(ValueError, match="`uncertainty`"):
        confidence_score(torch.tensor([-0.1]))
    with pytest.raises(ValueError, match=r"`probs` must have shape \[S, N, C\]"):
        variance_decomposition(torch.ones(2, 3))
