"""sae.py: planted-dictionary recovery, batch independence, unit-norm decoder, normalisation
fold-back, save/load."""
import json
import os
import xml.etree.ElementTree as ET

import pytest
import torch

from batchtopk import SAE, SAEConfig, batch_topk, evaluate, train_step, update
from helpers import fake_store, run_script
from sae import convergence, main, schedule, train_sae


def planted(d=64, n_atoms=256, N=200_000, seed=0, active=(4, 4), decades=2):
    """Sparse non-negative combinations (active[0]..active[1] of n_atoms unit atoms, coefficients
    U(0.5, 2.5)) with per-dimension scales spread over `decades` orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    n_act = torch.randint(active[0], active[1] + 1, (N,), generator=g)
    scores = torch.rand(N, n_atoms, generator=g)
    kth = scores.sort(dim=1, descending=True).values.gather(1, (n_act - 1)[:, None])
    coef = (torch.rand(N, n_atoms, generator=g) * 2 + 0.5) * (scores >= kth)
    scales = 10 ** ((torch.rand(d, generator=g) - 0.5) * decades)
    return (coef @ atoms) * scales, atoms, scales


def recovered(sae, atoms, scales):
    """The fraction of atoms that some decoder row matches at cosine > 0.9 (in raw space)."""
    a = atoms * scales
    w = sae.W_dec * sae.scale
    cos = (a / a.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    return (cos.max(dim=1).values > 0.9).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("seed,init", [(1, "data"), (0, "random")])
def test_planted_dictionary_is_recovered(seed, init):
    """d 64, 256 atoms, 4 active, scales over two decades, 200k samples; expansion 8, k 4, 8
    epochs: >= 95% of the atoms found at cosine > 0.9, held-out FVU <= 0.14, from either start.
    (With AuxK firing on a dead window relative to the run, a random start finds them all; with
    the old fixed 1M-token window AuxK never fired here and it found 81-86%.)"""
    x, atoms, scales = planted(seed=seed)
    sae = train_sae(x, SAEConfig(expansion=8, k=4, epochs=8, seed=seed, init=init), log=None)
    assert recovered(sae, atoms, scales) >= 0.95
    assert sae.metrics["fvu"] <= 0.14
    assert 3 <= sae.metrics["l0"] <= 5


@pytest.fixture(scope="module")
def small():
    x, _, _ = planted(d=16, n_atoms=32, N=4000, seed=1, active=(4, 8), decades=4)
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
        loss, m = train_step(sae, xn, cfg, dict(since=since, threshold_steps=0, dead_tokens=1000))
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


def test_decoder_rows_start_at_data_rows():
    """Each row starts at a different data row (unit norm); a zero row and the latents beyond the
    rows get random directions; W_enc = c W_dec^T with c the least-squares scale of the first
    reconstructions."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, 4, generator=g)
    data[2] = 0.0
    sae = SAE(4, 8, 2)
    sae.init_weights(data, torch.Generator().manual_seed(1))
    unit = data / data.norm(dim=1, keepdim=True)
    cos = (sae.W_dec @ unit.t()).abs()
    matched = (cos > 1 - 1e-6).any(1)
    assert matched.sum() == 4 and (cos > 1 - 1e-6).sum(0).tolist() == [1, 1, 0, 1, 1]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(8))
    c = sae.W_enc[0, 0] / sae.W_dec[0, 0]
    torch.testing.assert_close(sae.W_enc, c * sae.W_dec.t())
    raw = data @ sae.W_dec.t()  # c rescales the reconstruction of BatchTopK's choice
    rows, cols = batch_topk(raw, 2)
    xh = torch.zeros(5, 4).index_add_(0, rows, raw[rows, cols, None] * sae.W_dec[cols])
    torch.testing.assert_close(c, (xh * data).sum() / (xh * xh).sum())


def test_dead_window_is_relative_to_the_run_with_a_floor():
    cfg = SAEConfig(batch_size=512, k=16, epochs=1)
    # the paper's scale: 10M tokens -> the official 1M
    assert schedule(cfg, 10_000_000, 3584)[2] == (10_000_000 // 512) * 512 // 10
    # a small corpus: a tenth of the run, but not below 100 mean firing intervals (n / k)
    assert schedule(cfg, 20_000, 3584)[2] == 100 * 3584 // 16
    assert schedule(SAEConfig(dead_tokens=777), 20_000, 3584)[2] == 777
    # the default trains on min_tokens: whole epochs, at least one
    per_epoch, total, _ = schedule(SAEConfig(batch_size=100, min_tokens=10_000), 3000, 64)
    assert (per_epoch, total) == (30, 120)


def test_auxk_revives_dead_latents():
    """Latents forced dead (zero encoder columns and b_enc -1: they cannot fire) come back under
    AuxK, and the dead fraction falls; without AuxK they stay dead."""
    x, _, _ = planted(d=16, n_atoms=64, N=20_000, seed=3)  # as many atoms as latents: all needed
    xn = x / x.std(0)
    dead_after = {}
    for coeff in (0.0, 1 / 32):
        sae = SAE(16, 64, 4)
        with torch.no_grad():
            sae.b_dec.copy_(xn.mean(0))
            sae.init_weights(xn - sae.b_dec, torch.Generator().manual_seed(0))
            sae.W_enc[:, 32:] = 0.0
            sae.b_enc[32:] = -1.0
        opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
        cfg = SAEConfig(aux_coeff=coeff)
        state = dict(since=torch.zeros(64, dtype=torch.long), threshold_steps=0, dead_tokens=2048)
        before = ((sae.encode(xn[-4000:]) > 0).float().mean(0)[32:] == 0).float().mean().item()
        for step in range(1000):
            i = step % (len(xn) // 256)
            update(sae, opt, xn[i * 256:(i + 1) * 256], cfg, state)
        freq = (sae.encode(xn[-4000:]) > 0).float().mean(0)
        dead_after[coeff] = (freq[32:] == 0).float().mean().item()
    assert before == 1.0
    assert dead_after[0.0] == 1.0 and dead_after[1 / 32] <= 0.5


def test_training_reports_convergence_and_warns_when_still_falling():
    """Held-out FVU at each tenth of the run; its fall from 70% to 80% (where the lr decay starts)
    decides the plateau; training that ends still falling says so."""
    x, _, _ = planted(d=16, n_atoms=32, N=20_000, seed=4)
    logs = []
    sae = train_sae(x, SAEConfig(expansion=2, k=4, steps=1500, lr=2e-3, batch_size=256, seed=0,
                                 plateau=1e-4), log=logs.append)
    conv = sae.metrics["convergence"]
    steps, fvu = zip(*conv["curve"])
    assert steps == tuple(range(150, 1501, 150)) and fvu[0] > fvu[6] > fvu[7]
    assert conv["fall"] == pytest.approx(fvu[6] - fvu[7]) and conv["fall"] > 1e-4
    assert conv["plateau"] is False and any("still fell" in line for line in logs)
    assert convergence(conv["curve"], conv["fall"] * 1.01)["plateau"] is True
    assert convergence(conv["curve"][:5], 1.0)["plateau"] is None  # too short to tell


def test_sweep_writes_json_and_figure_and_resumes(tmp_path):
    """sae.py sweep over 2 k x 2 expansions on a store: sweep.json rows and an SVG whose points
    and labels are the rows; a rerun reuses the trained SAEs."""
    store = tmp_path / "acts"
    fake_store(store, [500] * 12, docs_per_shard=4, values=planted(d=8, n_atoms=16, N=6000,
                                                                  seed=5)[0])
    args = ["sweep", "--acts", str(store), "--out", str(tmp_path / "sw"), "--ks", "2,4",
            "--expansions", "2,4", "--steps", "60", "--warmup", "5", "--batch-size", "128"]
    rows = main(args)
    assert [(r["k"], r["expansion"]) for r in rows] == [(2, 2), (4, 2), (2, 4), (4, 4)]
    saved = json.load(open(tmp_path / "sw" / "sweep.json"))
    assert saved["rows"] == rows and all(0 < r["fvu"] < 1.5 and r["l0"] > 0 for r in rows)
    svg = ET.parse(tmp_path / "sw" / "sweep.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f".//{ns}circle")) == 4 and len(svg.findall(f".//{ns}polyline")) == 2
    mtime = os.path.getmtime(tmp_path / "sw" / "k2-x2" / "sae.safetensors")
    r = run_script("sae.py", args)
    assert "already holds this SAE" in r.stdout
    assert os.path.getmtime(tmp_path / "sw" / "k2-x2" / "sae.safetensors") == mtime
    r = run_script("sae.py", args[:-2] + ["--batch-size", "64"], check=False)
    assert r.returncode != 0 and "made from other inputs or settings" in r.stderr
