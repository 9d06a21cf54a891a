"""sae.py: planted-dictionary recovery, batch independence, unit-norm decoder, normalisation fold-back,
save/load, and the activation store (collection equals capture, resume, 2 processes, bad input)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, hf_tiny, save_hf
from sae import SAE, ActivationStore, SAEConfig, evaluate, train_sae
from test_data import tiny_tokenizer

PY = sys.executable


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
    return x, train_sae(x, SAEConfig(expansion=4, k=4, epochs=1, batch_size=128, dead_tokens=1000), log=None)


def test_encode_is_batch_independent(small):
    x, sae = small
    z = sae.encode(x[:300])
    assert sae.threshold > 0 and (z > 0).any()
    for i in (0, 17, 299):
        torch.testing.assert_close(sae.encode(x[i:i + 1])[0], z[i], atol=1e-5, rtol=1e-5)  # float rounding only


def test_decoder_rows_unit_norm_after_every_step(small):
    x, _ = small
    for steps in (1, 2, 3, 7):
        sae = train_sae(x, SAEConfig(expansion=2, k=4, steps=steps, batch_size=64, lr=1e-2), log=None)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents), atol=1e-5, rtol=0)


def test_normalisation_fold_back_is_exact(small):
    x, sae = small
    assert sae.scale.max() / sae.scale.min() > 10  # the inputs really have uneven scales
    xb = x[:50]
    # the normalised SAE, applied by hand to x / scale, reproduces the raw-space forward
    xn = xb / sae.scale
    p = torch.relu((xn - sae.b_dec) @ sae.W_enc + sae.b_enc)
    z = p * (p > sae.threshold)
    torch.testing.assert_close(sae(xb), (z @ sae.W_dec + sae.b_dec) * sae.scale, atol=1e-6, rtol=1e-5)
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


# --- collection --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    from lora import adapters, apply_lora, save_adapter
    from model import Qwen2
    d = tmp_path_factory.mktemp("collect")
    save_hf(hf_tiny(vocab_size=300), d / "model")
    tiny_tokenizer(d / "model")
    m = apply_lora(Qwen2.from_pretrained(str(d / "model")), verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
    save_adapter(m, d / "adapter")
    rows = [dict(question=f"What is {i}+{i}?", deepseek_thinking_trajectory=f"{i} plus {i} is {2 * i}. " * (1 + i % 3),
                 deepseek_attempt=str(2 * i)) for i in range(5)]
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def collect(env, out, *extra, nproc=1):
    args = ["collect", "--model", str(env / "model"), "--adapter", str(env / "adapter"), "--data", str(env / "rows.jsonl"),
            "--out", str(out), "--docs-per-shard", "2", "--window", "16", *extra]
    cmd = ([PY, os.path.join(ROOT, "sae.py")] if nproc == 1 else
           [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master-port", str(29300 + os.getpid() % 300),
            os.path.join(ROOT, "sae.py")])
    r = subprocess.run(cmd + args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_collection_equals_capture_resumes_and_matches_two_processes(model_env, tmp_path):
    from data import Tokenizer
    from lora import capture, load_adapter, sites
    from model import Qwen2
    collect(model_env, tmp_path / "a")
    st = ActivationStore(str(tmp_path / "a"))
    idx = st.index
    assert idx["shape"][1] == 21 and len(idx["shards"]) == 3 and idx["documents"] == 5
    m = Qwen2.from_pretrained(str(model_env / "model"))
    load_adapter(m, str(model_env / "adapter"), verbose=False)
    assert idx["sites"] == [list(s) for s in sites(m)]
    tok = Tokenizer(str(model_env / "model"))
    from data import read_rows, s1_example
    rows, _ = read_rows(str(model_env / "rows.jsonl"))
    for sh_i, sh in enumerate(idx["shards"]):
        acts, toks = st.shard(sh_i), st.tokens(sh_i)
        for doc in sh["docs"]:
            ids = s1_example(rows[doc["doc"]], tok)[0]
            with torch.no_grad(), capture(m) as cap:
                m(torch.tensor([ids]))
            seg = slice(doc["start"], doc["start"] + doc["length"])
            assert toks[seg].tolist() == ids
            np.testing.assert_allclose(acts[seg], cap.acts[0].numpy(), atol=1e-5, rtol=1e-5)  # windows of 16 == one forward
    # interrupted: the last shard never finished -> a re-run redoes it and nothing else
    os.remove(tmp_path / "a" / "shard-00002.json")
    os.remove(tmp_path / "a" / "acts-00002.npy")
    before = os.path.getmtime(tmp_path / "a" / "acts-00000.npy")
    first = np.load(tmp_path / "a" / "tokens-00002.npy")
    collect(model_env, tmp_path / "a")
    assert os.path.getmtime(tmp_path / "a" / "acts-00000.npy") == before
    assert np.array_equal(np.load(tmp_path / "a" / "tokens-00002.npy"), first)
    st2 = ActivationStore(str(tmp_path / "a"))
    np.testing.assert_array_equal(st2.load_all().numpy(), st.load_all().numpy())
    # two processes: the same shards
    collect(model_env, tmp_path / "b", nproc=2)
    sb = ActivationStore(str(tmp_path / "b"))
    assert [s["docs"] for s in sb.index["shards"]] == [s["docs"] for s in idx["shards"]]
    np.testing.assert_allclose(sb.load_all().numpy(), st.load_all().numpy(), atol=1e-6)
    # and the SAE trains on the store from the CLI
    r = subprocess.run([PY, "sae.py", "train", "--acts", str(tmp_path / "a"), "--out", str(tmp_path / "sae"),
                        "--expansion", "2", "--k", "4", "--batch-size", "32", "--epochs", "2", "--holdout", "0.2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    met = json.load(open(tmp_path / "sae" / "metrics.json"))["heldout"]
    assert np.isfinite(met["fvu"]) and met["l0"] > 0
    assert SAE.load(str(tmp_path / "sae")).d_in == 21


def test_store_errors(model_env, tmp_path):
    collect(model_env, tmp_path / "s")
    # a shard whose size does not match the index
    f = tmp_path / "s" / "acts-00001.npy"
    arr = np.load(f)
    np.save(f, arr[:-3])
    with pytest.raises(ValueError, match=r"acts-00001.npy: holds .* but index.json says"):
        ActivationStore(str(tmp_path / "s")).shard(1)
    # NaN in a stored shard, named with its row
    arr[5, 2] = np.nan
    np.save(f, arr)
    with pytest.raises(ValueError, match=r"acts-00001.npy: row 5 holds NaN or Inf"):
        ActivationStore(str(tmp_path / "s")).load_all()
    # an index from another layout
    idx = json.load(open(tmp_path / "s" / "index.json"))
    idx["sites"] = idx["sites"][:7]
    json.dump(idx, open(tmp_path / "s" / "index.json", "w"))
    with pytest.raises(ValueError, match="layout of 7 sites x rank 1 does not match the stored width 21"):
        ActivationStore(str(tmp_path / "s"))
