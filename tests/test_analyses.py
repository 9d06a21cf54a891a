"""The official code's further analyses (issue 24), each against a hand computation or brute
force: the activation state's spectrum, co-activation of SAE latents and its clusters."""
import numpy as np
import pytest
import torch

from analyses import clusters, cofiring, frequent_only, jaccard, spectrum, state_spectrum
from helpers import fake_store


def test_state_spectrum_equals_numpy_svd_of_the_centred_state(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 2)) @ rng.normal(size=(2, 6)) * [1, 2, 3, 4, 5, 6]
         + 0.01 * rng.normal(size=(300, 6)) + 3.0).astype(np.float32)
    store = fake_store(tmp_path / "acts", [70, 80, 90, 60], values=x, docs_per_shard=1)
    s = state_spectrum(store, "all", max_tokens=0)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    sv = np.linalg.svd(xc, compute_uv=False)
    lam = sv ** 2 / len(x)
    np.testing.assert_allclose(s["variances"], lam, rtol=1e-7, atol=1e-12)
    p = lam / lam.sum()
    assert s["tokens"] == 300 and s["dims"] == 6
    assert s["participation_ratio"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum())
    assert s["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert s["components_for"]["0.9"] <= 2 and s["components_for"]["0.99"] <= 2
    np.testing.assert_allclose(s["cumulative"], np.cumsum(p))


def test_state_spectrum_defaults_to_the_official_input(tmp_path):
    """By default the MLP adapters' scalars (gate, up, down: columns 0-2 of this store's layer 0)
    over the first 100,000 tokens, the official analysis's input; here max_tokens 100 cuts the
    second shard."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)).astype(np.float32) * [1, 2, 3, 4, 5, 6]
    store = fake_store(tmp_path / "acts", [70, 80, 90, 60], values=x, docs_per_shard=1)
    assert [t for _, t in store.index["sites"][:3]] == ["gate_proj", "up_proj", "down_proj"]
    s = state_spectrum(store, max_tokens=100)
    sub = x[:100, :3].astype(np.float64)
    lam = np.linalg.svd(sub - sub.mean(0), compute_uv=False) ** 2 / 100
    np.testing.assert_allclose(s["variances"], lam, rtol=1e-7, atol=1e-12)
    assert (s["tokens"], s["dims"], s["scalars"]) == (100, 3, "mlp")
    assert state_spectrum(store)["tokens"] == 300  # fewer than 100,000: all of them


def test_spectrum_limits_by_hand():
    iso = spectrum([2.0] * 8)
    assert iso["effective_rank"] == pytest.approx(8) and iso["participation_ratio"] == 8
    assert iso["components_for"] == {"0.5": 4, "0.9": 8, "0.99": 8}
    line = spectrum([5.0, 0, 0])
    assert line["effective_rank"] == 1 and line["participation_ratio"] == 1
    assert spectrum([3.0, 1.0])["components_for"]["0.5"] == 1  # 75% in the first
    with pytest.raises(ValueError, match="no variance"):
        spectrum([0.0, 0.0])


class Identity:
    """An 'SAE' whose latents are the stored values themselves (0/1 firing patterns)."""
    def __init__(self, n):
        self.n_latents = n

    def to(self, device):
        return self

    def encode(self, x):
        return x


def test_cofiring_jaccard_and_clusters_against_brute_force(tmp_path):
    """Two planted groups of latents that always fire together, one independent latent and one
    that never fires: Jaccard equals a count over tokens, and the clusters are the two groups."""
    rng = np.random.default_rng(1)
    N = 400
    a, b, c = rng.random(N) < 0.3, rng.random(N) < 0.2, rng.random(N) < 0.5
    fire = np.stack([a, a, a, b, b, c, np.zeros(N, bool)], 1).astype(np.float32)
    store = fake_store(tmp_path / "acts", [100, 150, 150], values=fire, docs_per_shard=2)
    counts, both = cofiring(store, Identity(7), chunk=64)
    J = jaccard(counts, both)
    for i in range(7):
        for j in range(7):
            inter = sum(fire[t, i] and fire[t, j] for t in range(N))
            union = sum(fire[t, i] or fire[t, j] for t in range(N))
            assert J[i, j] == pytest.approx(inter / union if union else 0.0)
    assert clusters(J, threshold=0.5) == [[0, 1, 2], [3, 4]]
    assert clusters(J, threshold=0.5, min_size=1)[-1] == [6]
    assert clusters(J, threshold=1.01) == []


def test_cofiring_with_a_real_sae_counts_its_encoded_firing(tmp_path):
    from batchtopk import SAE
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    store = fake_store(tmp_path / "acts", [60, 60], values=x)
    sae = SAE(5, 12, k=3)
    sae.init_weights(generator=torch.Generator().manual_seed(0))
    sae.threshold.fill_(0.1)
    counts, both = cofiring(store, sae, chunk=50)
    f = (sae.encode(torch.from_numpy(x)) > 0).double().numpy()
    np.testing.assert_array_equal(counts, f.sum(0))
    np.testing.assert_array_equal(both, f.T @ f)


def test_rare_latents_leave_pairs_and_clusters():
    """Two latents that fire once, together, have J = 1: below the firing cut they are dropped."""
    counts = np.array([1.0, 1.0, 40.0, 40.0])
    both = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 40, 30], [0, 0, 30, 40]], dtype=float)
    J = jaccard(counts, both)
    assert J[0, 1] == 1 and clusters(J) == [[0, 1], [2, 3]]
    F = frequent_only(J, counts, min_firing=16)
    assert F[0, 1] == 0 and F[2, 3] == pytest.approx(30 / 50) and clusters(F) == [[2, 3]]
    assert J[0, 1] == 1  # the input is left as it was
