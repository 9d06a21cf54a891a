"""interop.py: the SAE as an SAELens folder (loaded by sae_lens where it is installed, and by
batchtopk.SAE.load everywhere), the mined features in Neuronpedia's export layout, and bad input.
sae-lens is optional (requirements-saelens.txt; in a venv of its own or beside the test
requirements):

    python -m venv --system-site-packages ~/saelens
    ~/saelens/bin/pip install -r requirements-saelens.txt
    ~/saelens/bin/python -m pytest tests/test_interop.py
"""
import json
import os

import pytest
import torch

from batchtopk import SAE
from helpers import fake_store, tiny_tokenizer
from interop import read_gz_jsonl, saelens_tensors
from interpret import main as interpret_main
from sae import main as sae_main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("interop")
    store = fake_store(d / "acts", [40, 30, 50, 20], d=7, ties=False, seed=3)
    sae_main(["train", "--acts", str(d / "acts"), "--out", str(d / "sae"), "--expansion", "2",
              "--k", "2", "--steps", "60", "--batch-size", "32", "--warmup", "5"])
    tiny_tokenizer(d)
    return d, store


def folded_encode(t, x):
    """The SAELens JumpReLU encoding written out: relu(pre) * (pre > threshold)."""
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    return torch.relu(pre) * (pre > t["threshold"])


def test_saelens_folder_encodes_as_ours_and_loads_back(env, tmp_path):
    """Export, then the folder's JumpReLU formula and the folder loaded back by SAE.load encode
    the store as our SAE does (to float32 rounding) and decode alike; a second round trip is
    bitwise the first; the metadata names the store, the layout and k."""
    d, store = env
    sae = SAE.load(str(d / "sae"))
    sae_main(["export", "--sae", str(d / "sae"), "--out", str(tmp_path / "sl")])
    x = store.load_all()
    back = SAE.load(str(tmp_path / "sl"))
    t = saelens_tensors(back)
    z = sae.encode(x)
    assert (z > 0).sum() > 0
    for got in (folded_encode(t, x), back.encode(x)):
        torch.testing.assert_close(got, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.decode(z), sae.decode(z), atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    meta = cfg["metadata"]["rank1"]
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (7, 14)
    assert meta["k"] == 2 and meta["store"]["digest"] == store.identity()["digest"]
    assert "7 * layer + p" in meta["layout"]
    sae_main(["export", "--sae", str(tmp_path / "sl"), "--out", str(tmp_path / "sl2")])
    again = SAE.load(str(tmp_path / "sl2"))
    assert torch.equal(again.encode(x), back.encode(x))
    assert back.made_from["store"]["digest"] == store.identity()["digest"]


def hand_built():
    """d_in 2, 3 latents, threshold 0.5: latent 0 sits exactly at it, latent 1 just above,
    latent 2 below zero."""
    sae = SAE(2, 3, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
        sae.threshold.fill_(0.5)
    return sae, torch.tensor([[0.5, 0.5 + 2 ** -20]])


def test_the_threshold_is_strict_in_both_formats(tmp_path):
    sae, x = hand_built()
    sae.made_from = None
    assert sae.encode(x).tolist() == [[0.0, 0.5 + 2 ** -20, 0.0]]
    from interop import export_saelens
    export_saelens(sae, "hand", str(tmp_path / "sl"))
    assert SAE.load(str(tmp_path / "sl")).encode(x).tolist() == [[0.0, 0.5 + 2 ** -20, 0.0]]


def test_sae_lens_loads_the_folder_and_encodes_as_ours(env, tmp_path):
    """sae_lens.SAE.load_from_disk on the export: encode and decode equal ours (max abs error
    printed), and the hand-built case at the threshold."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (optional: "
                                   "requirements-saelens.txt)")
    d, store = env
    sae = SAE.load(str(d / "sae"))
    sae_main(["export", "--sae", str(d / "sae"), "--out", str(tmp_path / "sl")])
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    x = store.load_all()
    with torch.no_grad():
        z_theirs, z = theirs.encode(x), sae.encode(x)
        err = (z_theirs - z).abs().max().item()
        dec = (theirs.decode(z) - sae.decode(z)).abs().max().item()
    print(f"sae_lens vs rank1 on {len(x)} tokens: encode max abs error {err:.2e}, decode {dec:.2e}")
    assert err < 1e-5 and dec < 1e-5 and torch.equal(z_theirs > 0, z > 0)
    hand, hx = hand_built()
    hand.made_from = None
    from interop import export_saelens
    export_saelens(hand, "hand", str(tmp_path / "hand"))
    h = sae_lens.SAE.load_from_disk(str(tmp_path / "hand"), device="cpu")
    with torch.no_grad():
        assert h.encode(hx).tolist() == hand.encode(hx).tolist() == [[0.0, 0.5 + 2 ** -20, 0.0]]


def test_neuronpedia_export_holds_the_mined_examples(env, tmp_path):
    """interpret.py mine --sae, then the Neuronpedia export: its rows parse, there is a feature
    row per latent with its decoder vector, and one latent's activation rows are exactly the top
    examples mine wrote (tokens as text, values, the max and its position)."""
    d, _ = env
    interpret_main(["mine", "--acts", str(d / "acts"), "--sae", str(d / "sae"), "--tokenizer",
                    str(d), "--out", str(tmp_path / "interp"), "--k", "4", "--context", "3"])
    auto = tmp_path / "auto"
    auto.mkdir()
    (auto / "autointerp.json").write_text(json.dumps(dict(llm_model="judge-1")))
    feats = json.loads((tmp_path / "interp" / "features.json").read_text())["features"]
    first = next(f for f in feats if f["name"] == "sae0")
    (auto / "autointerp.jsonl").write_text(json.dumps(dict(id=first["id"], name="sae0",
                                                           explanation="counts steps")) + "\n")
    sae_main(["export", "--sae", str(d / "sae"), "--format", "neuronpedia", "--features",
              str(tmp_path / "interp" / "features.json"), "--autointerp", str(auto), "--out",
              str(tmp_path / "np")])
    rows = {n: read_gz_jsonl(tmp_path / "np" / n / "batch-0.jsonl.gz")
            for n in ("features", "activations", "explanations")}
    sae = SAE.load(str(d / "sae"))
    assert sorted(r["index"] for r in rows["features"]) == list(range(14))
    f0 = next(r for r in rows["features"] if r["index"] == 0)
    assert f0["decoder_weights"] == saelens_tensors(sae)["W_dec"][0].tolist()
    assert f0["frac_nonzero"] == first["freq"]
    got = [r for r in rows["activations"] if r["index"] == 0]
    assert [(r["tokens"], r["values"], r["maxValue"]) for r in got] == \
        [(e["tokens"], e["acts"], e["value"]) for e in first["top"]]
    assert all(r["values"][r["maxValueTokenIndex"]] == max(r["values"]) for r in got)
    assert rows["explanations"] == [dict(modelId="qwen2.5-32b-instruct",
                                         layer="rank1-lora-batchtopk", index=0,
                                         description="counts steps",
                                         explanationModelName="judge-1",
                                         typeName="rank1-autointerp", score=None)]


def test_bad_input_is_one_line(env, tmp_path):
    """A folder that is not an SAE, an SAELens cfg of another architecture, weights of the wrong
    shape, an SAE whose width is not the store's, features mined without the SAE."""
    d, _ = env
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not an SAE directory .no cfg.json"):
        sae_main(["export", "--sae", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")])
    sae_main(["export", "--sae", str(d / "sae"), "--out", str(tmp_path / "sl")])
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SystemExit, match=r"sl/cfg.json: architecture 'gated'; rank1 reads "
                                         "SAELens's 'jumprelu'"):
        sae_main(["export", "--sae", str(tmp_path / "sl"), "--out", str(tmp_path / "o2")])
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 8}))
    with pytest.raises(SystemExit, match=r"sae_weights.safetensors: expected W_enc of shape "
                                         r"\(8, 14\)"):
        sae_main(["export", "--sae", str(tmp_path / "sl"), "--out", str(tmp_path / "o3")])
    other = fake_store(tmp_path / "acts5", [20, 20], d=5, seed=1)
    with pytest.raises(SystemExit, match="an SAE of width 7, but .*acts5 stores 5 scalars"):
        interpret_main(["mine", "--acts", str(other.path), "--sae", str(d / "sae"),
                        "--tokenizer", str(d), "--out", str(tmp_path / "m")])
    interpret_main(["mine", "--acts", str(d / "acts"), "--tokenizer", str(d), "--out",
                    str(tmp_path / "plain")])
    with pytest.raises(SystemExit, match="features.json: not mined with the SAE in"):
        sae_main(["export", "--sae", str(d / "sae"), "--format", "neuronpedia", "--features",
                  str(tmp_path / "plain" / "features.json"), "--out", str(tmp_path / "o4")])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert os.path.isdir(tmp_path / "sl")
