"""report.py: the statistics against hand-computed values, the categoriser's validation, and the
page in a real headless browser (no console errors, every dataset text escaped)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from autointerp import CATEGORIES, parse_category, parse_rubric, populations
from helpers import CHROMIUM, TINY, chromium_dom, fake_store
from lora import adapters, apply_lora
from lora_files import adapter_identity, save_adapter
from model import Qwen2, Qwen2Config
from report import (ablation_summary, bootstrap_shares, category_shares, chi2_sf, chi2_test,
                    interference, lora_vs_mlp, main)

EVIL = "<script>document.title='pwned'</script>&\"x\""


def test_chi2_against_hand_computed_tables():
    # the paper's rubric counts (docs/paper.md A): expected 367*108/743 = 53.35 ...; dof 2, so
    # p = exp(-chi2 / 2)
    chi2, dof, p = chi2_test([[59, 146, 162], [49, 100, 227]])
    assert (round(chi2, 4), dof) == (20.2827, 2) and p == pytest.approx(math.exp(-chi2 / 2))
    assert p == pytest.approx(3.9416e-5, rel=1e-4)
    # 2 x 2: every expected count is 15, chi2 = 4 * 5^2 / 15; p = erfc(sqrt(chi2 / 2)), no Yates
    chi2, dof, p = chi2_test([[10, 20], [20, 10]])
    assert (chi2, dof) == (pytest.approx(20 / 3), 1) and p == pytest.approx(0.0098233, rel=1e-4)
    # an empty column is dropped (its expected count would be 0)
    assert chi2_test([[5, 0, 7], [3, 0, 9]])[1] == 1
    # the tables' 5% critical values, odd and even dof
    for x, dof in [(3.841, 1), (5.991, 2), (7.815, 3), (9.488, 4), (11.070, 5)]:
        assert chi2_sf(x, dof) == pytest.approx(0.05, abs=2e-5)
    assert chi2_sf(15.086, 5) == pytest.approx(0.01, abs=2e-5)


def test_bootstrap_shares_follow_the_binomial():
    """With 20 of 40 labels in class 0, a resampled share is Binomial(40, 1/2) / 40: its 2.5% and
    97.5% points are 14/40 (P(X <= 13) = 0.019, P(X <= 14) = 0.040) and 26/40 (P(X <= 25) =
    0.960, P(X <= 26) = 0.981); a 90% interval would be [15/40, 25/40]."""
    s = bootstrap_shares([0] * 20 + [1] * 12 + [2] * 8)
    assert s[0] == dict(share=0.5, ci95=[0.35, 0.65])
    assert s[2]["share"] == 0.2 and s[2]["ci95"][0] < 0.2 < s[2]["ci95"][1]
    assert bootstrap_shares([1] * 5)[1] == dict(share=1.0, ci95=[1.0, 1.0])


def test_category_mass_shares_by_hand():
    mass = {0: 3.0, 1: 1.0, 2: 4.0, 3: 2.0, 4: 5.0, 5: 5.0}
    cats = [dict(id=0, category="symbolic_manipulation", subcategory="latex_commands"),
            dict(id=1, category="symbolic_manipulation", subcategory="math_operators"),
            dict(id=2, category="reasoning_flow_control", subcategory="hesitation_markers"),
            dict(id=3, category="symbolic_manipulation", subcategory="latex_commands"),
            dict(id=4, error="unknown category"), dict(id=5, error="timeout")]
    shares, subs = category_shares(mass, cats)
    # the failed rows keep their mass as the official donut's "uncategorized" slice, drawn last
    assert shares == {"symbolic_manipulation": 0.3, "reasoning_flow_control": 0.2,
                      "uncategorized": 0.5}
    assert list(shares) == ["symbolic_manipulation", "reasoning_flow_control", "uncategorized"]
    assert subs["symbolic_manipulation"] == {"latex_commands": 5 / 6, "math_operators": 1 / 6}
    assert subs["reasoning_flow_control"] == {"hesitation_markers": 1.0}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_categoriser_and_rubric_replies_are_validated():
    assert len(CATEGORIES) == 7
    assert parse_category('Sure: {"category": "symbolic_manipulation", "subcategory": '
                          '"latex_commands"}') == ("symbolic_manipulation", "latex_commands")
    with pytest.raises(ValueError, match="unknown category 'arithmetic'"):
        parse_category('{"category": "arithmetic", "subcategory": "arithmetic_ops"}')
    with pytest.raises(ValueError, match="unknown subcategory 'latex_commands' of result_form"):
        parse_category('{"category": "result_formulation", "subcategory": "latex_commands"}')
    with pytest.raises(ValueError, match="no JSON object"):
        parse_category("symbolic_manipulation")
    assert parse_rubric('{"classification": 1, "classification_reasoning": "r"}') == (1, "r")
    assert parse_rubric('{"classification": "2"}') == (2, None)
    for bad in ('{"classification": 3}', '{"classification": true}', "1", '{"class": 0}'):
        assert parse_rubric(bad) == (None, None), bad


def test_paper_populations_and_dominant_polarity():
    rows = lambda names, r=0: [dict(name=n, rubric=r, top_value=v) for n, v in names]
    lora = rows([("L0.gate_proj+", 1), ("L0.q_proj+", 1), ("L3.down_proj-", 1), ("sae4", 1)])
    mlp = rows([("N0.1+", 2.0), ("N0.1-", 3.0), ("N1.0+", 5.0), ("N1.0-", 1.0), ("N2.3+", 4.0),
                ("N2.3-", 1.0)])
    mlp[4]["rubric"] = None  # the dominant polarity's rating failed: the neuron is left out
    a, b = populations(lora, mlp)
    assert [r["name"] for r in a] == ["L0.gate_proj+", "L3.down_proj-"]
    assert sorted(r["name"] for r in b) == ["N0.1-", "N1.0+"]
    a, b = populations(lora, mlp, "all")
    assert len(a) == 4 and len(b) == 5
    g = lora_vs_mlp(lora, mlp)["by_group"]
    assert set(g["lora"]) == {"layers 0-7", "polarity +", "polarity -", "type gate_proj",
                              "type gate_proj +", "type down_proj", "type down_proj -"}
    assert g["mlp"]["layers 0-7"]["n"] == 2 and g["mlp"]["polarity -"]["counts"] == [1, 0, 0]
    # MLP neurons by their index within the layer (N0.1 -> index 1, N1.0 -> index 0)
    assert {k: v["n"] for k, v in g["mlp"].items() if k.startswith("neuron")} == {
        "neuron index 0": 1, "neuron index 1": 1}
    mlp[0]["rubric"], mlp[1]["rubric"] = 2, 2  # N0.1's dominant polarity (-) rated 2
    assert lora_vs_mlp(lora, mlp)["by_group"]["mlp"]["neuron index 1"]["counts"] == [0, 0, 1]
    assert lora_vs_mlp(lora, mlp, "all")["by_group"]["lora"]["SAE latents"]["n"] == 1


def test_interference_cosines_by_hand():
    e = np.eye(4)
    vec = {(0, "down_proj"): (e[0], 0.6 * e[1] + 0.8 * e[2]),
           (1, "gate_proj"): (e[1], e[3]), (1, "up_proj"): (-e[2], e[3]),
           (1, "down_proj"): (e[0], e[3]), (2, "gate_proj"): (e[3], e[0])}
    i = interference(vec)
    # the official causal mask keeps writing layer j <= reading layer i: pairs (1 gate, 0 down)
    # 0.6, (1 up, 0 down) 0.8, (1 gate, 1 down) 0, (1 up, 1 down) 0, (2 gate, 0 down) 0,
    # (2 gate, 1 down) 1
    assert i["pairs"] == 6 and i["mean_abs_cos"] == pytest.approx(0.4)
    assert {(r["i"], r["j"]): r["mean_abs_cos"] for r in i["by_layers"]} == {
        (1, 0): pytest.approx(0.7), (1, 1): 0.0, (2, 0): 0.0, (2, 1): 1.0}
    # 3 full layers: 2 reading types x 6 (i, j <= i) = 12 pairs (4,160 at 64 layers)
    full = {(l, t): (e[0], e[1]) for l in range(3) for t in ("gate_proj", "up_proj", "down_proj")}
    assert interference(full)["pairs"] == 12
    # the baseline: random vectors of the residual stream's width (here 4, E|cos| = 0.424; the
    # 50-wide b of gate_proj must not set it), over 30 layers' 930 pairs
    rng = np.random.default_rng(0)
    vec = {(l, t): (rng.standard_normal(4), rng.standard_normal(50 if t == "gate_proj" else 4))
           for l in range(30) for t in ("gate_proj", "up_proj", "down_proj")}
    i = interference(vec)
    assert i["pairs"] == 930 and i["random_mean_abs_cos"] == pytest.approx(0.424, abs=0.04)
    assert i["mean_abs_cos"] == pytest.approx(0.424, abs=0.04)  # random adapters: the same


def report_inputs(tmp_path):
    """An adapter, its ablations, SAE features with masses, autointerp rows and categories, with
    dataset text that must be escaped."""
    torch.manual_seed(0)
    m = Qwen2(Qwen2Config(**TINY))
    m.init_weights()
    apply_lora(m, verbose=False)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.normal_(0, 0.1)
    save_adapter(m, tmp_path / "ad")
    ident = adapter_identity(str(tmp_path / "ad"))
    sites = [[l, t] for l in range(3) for t in ("gate_proj", "up_proj", "down_proj", "q_proj",
                                                  "k_proj", "v_proj", "o_proj")]
    row = lambda label, v: {"label": label, "kl_full_abl_assistant_mean": v,
                            "kl_full_abl_assistant_std": v / 3, "kl_full_abl_all_mean": v / 2}
    greedy = [dict(row(f"+L{i}", 0.01 * i * i), n_ablated=i + 1, added=f"L{i}") for i in range(9)]
    ab = dict(identity=dict(adapter=ident), made_from=dict(greedy_metric="max"),
              sequences=[EVIL], tokens=99, sites=sites,
              results=dict(layer=[row(EVIL, 0.1), row("L1", 0.2), row("L2", 0.3)],
                           single=[row(f"L{l}.{t}", 0.01 * (i + 1)) for i, (l, t)
                                   in enumerate(sites)],
                           type=[row("gate_proj", 0.3), row("q_proj", 0.01)],
                           mlp_vs_attn=[row("mlp", 0.5), row("attn", 0.05)], greedy=greedy))
    (tmp_path / "abl.json").write_text(json.dumps(ab))
    feats = dict(made_from=dict(store=dict(made_from=dict(adapter=ident))),
                 features=[dict(id=i, name=f"sae{i}", mass=float(i + 1)) for i in range(4)])
    (tmp_path / "features.json").write_text(json.dumps(feats))
    cats = [dict(id=0, category=EVIL, subcategory=EVIL),
            dict(id=1, category="result_formulation", subcategory="final_answer"),
            dict(id=2, error=EVIL)]
    (tmp_path / "categories.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cats))
    rated = lambda names, rs: "".join(json.dumps(dict(name=n, rubric=r, top_value=1.0,
                                                      explanation=EVIL)) + "\n"
                                      for n, r in zip(names, rs))
    (tmp_path / "lora.jsonl").write_text(rated([f"L{l}.gate_proj+" for l in range(3)]
                                               + [f"L{l}.up_proj-" for l in range(3)],
                                               [0, 1, 1, 2, 0, 1]))
    (tmp_path / "mlp.jsonl").write_text(rated([f"N{l}.{i}+" for l in range(3) for i in range(2)],
                                              [2, 2, 1, 2, 0, 2]))
    rec = dict(base=EVIL, full="f", lora="l", protocols=dict(base="s1", full="s1", lora="s1"),
               table=dict(math=dict(base=0.1, full=0.5, lora=0.4, gain=0.4, recovery=0.75,
                                    recovery_ci95=[0.6, 0.9], problems=50)))
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    steer = dict(residual="L1.up_proj", site=None, feature=0, results=[
        dict(strength=s, seed=0, n=2, mean_thinking_tokens=10.0 + s, word_counts={EVIL: 0.5},
             accuracy=0.5) for s in (0, 2)])
    (tmp_path / "steer.json").write_text(json.dumps(steer))
    return ["--recovery", str(tmp_path / "rec.json"), "--steer", str(tmp_path / "steer.json"),
            "--ablations", str(tmp_path / "abl.json"),
            "--adapter", str(tmp_path / "ad"),
            "--features", str(tmp_path / "features.json"),
            "--categories", str(tmp_path / "categories.jsonl"),
            "--autointerp", str(tmp_path / "lora.jsonl"),
            "--mlp-autointerp", str(tmp_path / "mlp.jsonl")]


def test_report_json_holds_every_section_and_checks_the_adapter(tmp_path):
    args = report_inputs(tmp_path)
    rep = main(args + ["--out", str(tmp_path / "r")])
    saved = json.load(open(tmp_path / "r" / "report.json"))
    assert saved["ablation"]["greedy_carriers_90"] == 6  # 0.01 n^2 <= 0.064 up to n = 2 (3 off)
    # the paper's statistics from the single-adapter matrix: row 7l + p holds 0.01 (7l + p + 1),
    # so type p's mean over the 3 layers is 0.01 (8 + p); MLP rows 0.09, attention rows 0.125
    a = saved["ablation"]
    assert a["types"] == pytest.approx({t: 0.01 * (8 + p) for p, t in enumerate(
        ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"))})
    assert a["most_important_type"] == "o_proj" and a["mlp_over_attn"] == pytest.approx(0.72)
    # the joint ablations stay beside them, labelled
    assert a["mlp_over_attn_joint"] == pytest.approx(10)
    assert a["most_important_type_joint"] == "gate_proj"
    assert (saved["ablation"]["peak_layer"], saved["ablation"]["peak_depth"]) == ("L2", 1.0)
    assert [r["all_positions"] for r in a["layers"]] == [0.05, 0.1, 0.15]  # beside ours
    html = open(tmp_path / "r" / "report.html").read()
    assert "all positions (the official script" in html
    assert saved["categories"]["shares"][EVIL] == pytest.approx(1 / 6)
    assert saved["categories"]["shares"]["uncategorized"] == pytest.approx(1 / 2)
    assert saved["lora_vs_mlp"]["lora"]["counts"] == [2, 3, 1]
    assert saved["lora_vs_mlp"]["chi2"] == pytest.approx(rep["lora_vs_mlp"]["chi2"])
    assert len(saved["geometry"]["norms"]) == 21
    with pytest.raises(SystemExit, match="exists"):
        main(args + ["--out", str(tmp_path / "r")])
    # another adapter's ablations are refused
    ab = json.load(open(tmp_path / "abl.json"))
    ab["identity"]["adapter"]["weights_sha256"] = "0" * 64
    (tmp_path / "abl.json").write_text(json.dumps(ab))
    with pytest.raises(SystemExit, match="--ablations and --features describe different"):
        main(args + ["--out", str(tmp_path / "r2")])
    # no inputs: every section names the command that makes its input
    main(["--out", str(tmp_path / "r3")])
    html = open(tmp_path / "r3" / "report.html").read()
    assert html.count("Not computed") == 8 and "interpret.py autointerp" in html


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_a_browser_with_all_text_escaped(tmp_path):
    main(report_inputs(tmp_path) + ["--out", str(tmp_path / "r")])
    page = tmp_path / "r" / "report.html"
    html = page.read_text()
    assert "<script" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    dom, log = chromium_dom(page.as_uri())
    assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
    assert "<title>rank1 report</title>" in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&amp;" in dom
    assert dom.count("<svg") >= 8  # layers, single, greedy, 3 norms, interference, donut
    assert "χ² =" in dom and "Paper:" in dom and "along a of L1.up_proj" in dom
    assert "75.0% [60.0%, 90.0%]" in dom and "not run with --protocol plain" in dom


def test_state_and_coactivation_sections_check_their_sae(tmp_path):
    """--acts gives the state's spectrum (numpy's SVD of the centred store), --sae its latents'
    co-activation (counted here from the SAE's own encoding); an SAE of another store and --sae
    without --acts are refused with one line."""
    from batchtopk import SAE
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 6)) * [1, 1, 2, 2, 3, 3]).astype(np.float32)
    store = fake_store(tmp_path / "acts", [100, 100], values=x)
    fake_store(tmp_path / "other", [100, 100], values=x[::-1].copy())
    sae = SAE(6, 16, k=2)
    sae.init_weights(generator=torch.Generator().manual_seed(0))
    sae.threshold.fill_(0.5)
    sae.save(str(tmp_path / "sae"), made_from=dict(store=store.identity()))
    main(["--acts", str(tmp_path / "acts"), "--sae", str(tmp_path / "sae"),
          "--state-scalars", "all", "--out", str(tmp_path / "r")])
    rep = json.load(open(tmp_path / "r" / "report.json"))
    xc = x.astype(np.float64) - x.mean(0)
    np.testing.assert_allclose(rep["state"]["variances"],
                               np.linalg.svd(xc, compute_uv=False) ** 2 / 200, rtol=1e-6)
    fired = (sae.encode(torch.from_numpy(x)) > 0).numpy()
    assert rep["coactivation"]["firing"] == int(fired.any(0).sum())
    i, j, v = rep["coactivation"]["top_pairs"][0]
    both, either = (fired[:, i] & fired[:, j]).sum(), (fired[:, i] | fired[:, j]).sum()
    assert v == pytest.approx(both / either)
    html = open(tmp_path / "r" / "report.html").read()
    assert "activation state" in html and "Co-activation" in html
    with pytest.raises(SystemExit, match="trained on another store"):
        main(["--acts", str(tmp_path / "other"), "--sae", str(tmp_path / "sae"),
              "--out", str(tmp_path / "r2")])
    with pytest.raises(SystemExit, match="--sae needs --acts"):
        main(["--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "r3")])


def test_blocks_against_their_layers_and_ablation_ce_by_hand():
    """Each block of layers off at once against the mean of its layers' leave-one-layer-out KLs
    (the official block-vs-mean comparison), and the ablated models' cross-entropy rows."""
    sites = [[l, "q_proj"] for l in range(4)]
    row = lambda label, kl, ce=None: {"label": label, "kl_full_abl_assistant_mean": kl,
                                      "kl_full_abl_assistant_std": 0.0,
                                      **({} if ce is None else {"ce_assistant_mean": ce,
                                                                "ce_assistant_maxpos_max": 2 * ce})}
    ab = dict(sequences=["a"], tokens=10, sites=sites, results=dict(
        none=[row("none", 0.0, 1.5)],
        layer=[row(f"L{l}", kl, 1.5 + kl) for l, kl in enumerate((0.1, 0.3, 0.2, 0.6))],
        block=[row("L0-1", 0.8, 2.3), row("L2-3", 0.4, 1.9)]))
    a = ablation_summary(ab)
    assert [(b["label"], b["kl"]) for b in a["blocks"]] == [("L0-1", 0.8), ("L2-3", 0.4)]
    assert [b["mean_of_layers"] for b in a["blocks"]] == pytest.approx([0.2, 0.4])
    assert [b["ratio"] for b in a["blocks"]] == pytest.approx([4.0, 1.0])
    assert a["ce"]["none"] == [dict(label="none", mean=1.5, max=3.0)]
    assert [r["mean"] for r in a["ce"]["layer"]] == pytest.approx([1.6, 1.8, 1.7, 2.1])
    assert [r["max"] for r in a["ce"]["block"]] == pytest.approx([4.6, 3.8])


def test_a_store_of_another_adapter_is_refused(tmp_path):
    report_inputs(tmp_path)  # writes the adapter tmp_path / "ad"
    store = fake_store(tmp_path / "acts", [5, 5])
    idx = json.load(open(tmp_path / "acts" / "index.json"))
    other = dict(adapter_identity(str(tmp_path / "ad")), weights_sha256="0" * 64)
    idx["made_from"] = dict(adapter=other)
    (tmp_path / "acts" / "index.json").write_text(json.dumps(idx))
    assert store.index["shape"] == [10, 3]
    with pytest.raises(SystemExit, match="--acts and --adapter describe different adapters"):
        main(["--acts", str(tmp_path / "acts"), "--adapter", str(tmp_path / "ad"),
              "--out", str(tmp_path / "r")])


def test_the_official_rubric_beside_ours(tmp_path):
    """--official-autointerp / --official-mlp-autointerp (interpret.py autointerp --rubric-mode
    official): their shares and chi-square are counted by hand and shown beside ours; rows of
    the other mode are refused in one line naming the file."""
    args = report_inputs(tmp_path)
    rows = lambda names, rs: "".join(json.dumps(dict(name=n, rubric=r, top_value=1.0,
                                                     rubric_mode="official", explanation="x"))
                                     + "\n" for n, r in zip(names, rs))
    (tmp_path / "lora_off.jsonl").write_text(rows([f"L{l}.gate_proj+" for l in range(3)],
                                                  [0, 0, 1]))
    (tmp_path / "mlp_off.jsonl").write_text(rows([f"N{l}.0+" for l in range(3)], [2, 2, 0]))
    off = ["--official-autointerp", str(tmp_path / "lora_off.jsonl"),
           "--official-mlp-autointerp", str(tmp_path / "mlp_off.jsonl")]
    main(args + off + ["--out", str(tmp_path / "r")])
    saved = json.load(open(tmp_path / "r" / "report.json"))
    assert saved["lora_vs_mlp_official"]["lora"]["counts"] == [2, 1, 0]
    assert saved["lora_vs_mlp_official"]["mlp"]["counts"] == [1, 0, 2]
    # expected 1.5 / 0.5 / 1 per cell: 2 x (0.25/1.5 + 0.25/0.5 + 1/1) = 10/3
    assert saved["lora_vs_mlp_official"]["chi2"] == pytest.approx(10 / 3)
    assert saved["lora_vs_mlp"]["lora"]["counts"] == [2, 3, 1]  # ours unchanged beside it
    html = open(tmp_path / "r" / "report.html").read()
    assert html.index("(F2)</h2>") < html.index("(F2), the official way</h2>")
    with pytest.raises(SystemExit, match=r"lora.jsonl: rubric mode 'ours', expected 'official'"):
        main(args + ["--official-autointerp", str(tmp_path / "lora.jsonl"),
                     "--official-mlp-autointerp", str(tmp_path / "mlp_off.jsonl"), "--out",
                     str(tmp_path / "r2")])
