"""sae.py: planted-dictionary recovery, batch independence, unit-norm decoder, normalisation
fold-back, save/load."""
import os

import pytest
import torch

from sae import SAE, SAEConfig, evaluate, train_sae, train_step


def planted(d=128, n_atoms=256, N=200_000, seed=0):
    """Sparse non-negative combinations (4-8 of n_atoms unit atoms, coefficients in [0.5, 2]) with
    per-dimension scales spread over four orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    n_act = torch.randint(4, 9, (N,), generator=g)
    scores = torch.rand(N, n_atoms, generator=g)
    kth = scores.sort(dim=1, descending=True).values.gather(1, (n_act - 1)[:, None])
    coef = (torch.rand(N, n_atoms, generator=g) * 1.5 + 0.5) * (scores >= kth)
    scales = 10 ** (torch.rand(d, generator=g) * 4 - 2)
    return (coef @ atoms) * scales, atoms, scales


@pytest.mark.slow
def test_planted_dictionary_is_recovered():
    x, atoms, scales = planted()
    sae = train_sae(x, SAEConfig(expansion=4, k=6, epochs=2, lr=3e-3, dead_tokens=20_000, seed=0))
    a = atoms * scales / sae.scale  # the atoms as seen in the SAE's normalised space
    a /= a.norm(dim=1, keepdim=True)
    cos = (a @ sae.W_dec.t()).max(dim=1).values
    assert (cos >= 0.9).float().mean() >= 0.9
    assert sae.metrics["fvu"] <= 0.1
    assert 4 <= sae.metrics["l0"] <= 8


@pytest.fixture(scope="module")
def small():
    x, _, _ = planted(d=16, n_atoms=32, N=4000, seed=1)
    return x, train_sae(x, SAEConfig(expansion=4, k=4, epochs=1, batch_size=128, dead_tokens=1000),
                        log=None)


def test_encode_is_batch_independent(small):
    x, sae = small
    z = sae.encode(x[:300])
    assert sae.threshold > 0 and (z > 0).any()
    for i in (0, 17, 299):
        torch.testing.assert_close(sae.encode(x[i:i + 1])[0], z[i], atol=1e-5,
                                   rtol=1e-5)  # float rounding only


def test_decoder_rows_unit_norm_after_every_step(small):
    x, _ = small
    for steps in (1, 2, 3, 7):
        sae = train_sae(x, SAEConfig(expansion=2, k=4, steps=steps, batch_size=64, lr=1e-2),
                        log=None)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents), atol=1e-5,
                                   rtol=0)


def test_normalisation_fold_back_is_exact(small):
    x, sae = small
    assert sae.scale.max() / sae.scale.min() > 10  # the inputs really have uneven scales
    xb = x[:50]
    # the normalised SAE, applied by hand to x / scale, reproduces the raw-space forward
    xn = xb / sae.scale
    p = torch.relu((xn - sae.b_dec) @ sae.W_enc + sae.b_enc)
    z = p * (p > sae.threshold)
    torch.testing.assert_close(sae(xb), (z @ sae.W_dec + sae.b_dec) * sae.scale, atol=1e-6,
                               rtol=1e-5)
    # and so do the folded raw-space weights
    We, be, Wd, bd = sae.folded()
    p2 = torch.relu((xb - bd) @ We + be)
    torch.testing.assert_close(p2 * (p2 > sae.threshold) @ Wd + bd, sae(xb), atol=1e-5, rtol=1e-4)


def test_save_load_identical(small, tmp_path):
    x, sae = small
    sae.save(tmp_path / "sae", SAEConfig(), {"fvu": 0.1})
    assert set(os.listdir(tmp_path / "sae")) == {"cfg.json", "sae.safetensors"}
    back = SAE.load(str(tmp_path / "sae"))
    torch.testing.assert_close(back(x[:100]), sae(x[:100]), atol=0, rtol=0)
    assert back.threshold == sae.threshold


def test_nan_inputs_are_refused():
    x = torch.randn(100, 8)
    x[42, 3] = float("nan")
    with pytest.raises(ValueError, match="row 42 holds NaN or Inf"):
        train_sae(x, SAEConfig(), log=None)


def test_evaluate_counts():
    sae = SAE(4, 8, 2)
    sae.init_weights()
    m = evaluate(sae, torch.randn(64, 4))
    assert m["tokens"] == 64 and sum(m["freq_hist_log10"]["counts"]) == 8


# --- the spec points a mutation could break unnoticed --------------------------------------------


def planted_dead(d=8, n=32, B=64, seed=0):
    """An SAE whose latents 16..31 cannot fire (b_enc far below zero) and have not fired for long:
    dead; a batch of inputs; the dead-latent state."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(d, n, 2)
    sae.init_weights(generator=g)
    with torch.no_grad():
        sae.b_enc[16:] = -100.0
    xn = torch.randn(B, d, generator=g) + 1.0
    since = torch.zeros(n, dtype=torch.long)
    since[16:] = 10**6
    return sae, xn, since


def test_auxk_target_is_detached_and_k_aux_is_half_the_width():
    """AuxK fits the dead latents to the residual e = x - x_hat with e detached: the aux loss
    trains dead decoder rows and no live one. k_aux defaults to d_in // 2 (here 4 of 16 dead)."""
    grads, metrics = [], []
    for coeff in (0.0, 1000.0):
        sae, xn, since = planted_dead()
        cfg = SAEConfig(aux_coeff=coeff, dead_tokens=1000)
        loss, m = train_step(sae, xn, cfg, dict(since=since, threshold_steps=0))
        loss.backward()
        grads.append(sae.W_dec.grad.clone())
        metrics.append(m)
    assert metrics[1]["k_aux"] == 4 and metrics[1]["dead"] == 0.5 and metrics[0]["k_aux"] == 0
    torch.testing.assert_close(grads[0][:16], grads[1][:16], atol=0, rtol=0)  # live rows
    assert grads[1][16:].abs().sum() > 0 and grads[0][16:].abs().sum() == 0  # dead rows


def test_b_dec_starts_at_the_data_mean():
    """b_dec is the mean of the normalised training inputs before the first update (lr 0 here,
    so the first step changes nothing); the scale is their standard deviation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g) * torch.tensor([1, 2, 3, 4, 5, 6.0]) + 3.0
    sae = train_sae(x, SAEConfig(steps=1, lr=0.0, warmup=1, holdout=0.0, expansion=2, k=2),
                    log=None)
    torch.testing.assert_close(sae.scale, x.std(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(sae.b_dec, (x / x.std(0)).mean(0), rtol=1e-5, atol=1e-6)
