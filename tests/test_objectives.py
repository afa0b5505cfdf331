"""AT, TRADES and MART objectives against independent NumPy computations (ALGORITHMS.md section 2)."""

import numpy as np
import pytest

from tfrobust.defenses import at, mart, trades


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ce(z, y):
    return -np.log(softmax(z)[np.arange(len(y)), y])


def kl(z_p, z_q):
    p, q = softmax(z_p.astype(np.float64)), softmax(z_q.astype(np.float64))
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(42)
    clean = (rng.standard_normal((32, 10)) * 2).astype("float32")
    adv = (clean + rng.standard_normal((32, 10))).astype("float32")
    y = rng.integers(0, 10, 32)
    return clean, adv, y


def total(module, clean, adv, y, beta):
    primary, regulariser, terms = module.loss_terms(clean, adv, y, beta)
    return (primary + regulariser).numpy().mean(), {k: v.numpy() for k, v in terms.items()}


def test_at(batch):
    clean, adv, y = batch
    value, terms = total(at, clean, adv, y, None)
    np.testing.assert_allclose(value, ce(adv, y).mean(), rtol=1e-5)
    np.testing.assert_allclose(terms["ce_adv"], ce(adv, y), rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades(batch, beta):
    clean, adv, y = batch
    value, terms = total(trades, clean, adv, y, beta)
    # PyTorch KLDivLoss(reduction="sum") / B over log p(x') and p(x).
    expected = ce(clean, y).mean() + beta * kl(clean, adv).sum() / len(y)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(terms["kl"], kl(clean, adv), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [5.0, 6.0])
def test_mart(batch, beta):
    clean, adv, y = batch
    value, terms = total(mart, clean, adv, y, beta)
    p_adv, p_nat = softmax(adv.astype(np.float64)), softmax(clean.astype(np.float64))
    order = np.argsort(p_adv, axis=1)
    k_star = np.where(order[:, -1] == y, order[:, -2], order[:, -1])
    bce = ce(adv, y) - np.log(1.0001 - p_adv[np.arange(len(y)), k_star] + 1e-12)
    true_prob = p_nat[np.arange(len(y)), y]
    weighted = kl(clean, adv) * (1.0000001 - true_prob)
    expected = bce.mean() + beta * weighted.mean()
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(terms["bce"], bce, rtol=1e-5)


def test_trades_kl_is_zero_at_identical_logits(batch):
    clean, _, y = batch
    _, terms = total(trades, clean, clean, y, 6.0)
    np.testing.assert_allclose(terms["kl"], 0.0, atol=1e-6)
