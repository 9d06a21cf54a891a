"""End to end: `demo.py --fast`, the CI variant of the default run, through every script."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import CHROMIUM, ROOT, chromium_dom

STAGES = ("data", "base", "rank1", "full", "eval", "interpret")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, os.path.join(ROOT, "demo.py"), "--fast", "--out", str(out)]
    env = {**os.environ, "RANK1_DEMO_QUIET": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return out, r.stdout, again.stdout


def test_every_stage_finished_and_second_run_is_cached(demo_run):
    out, first, second = demo_run
    for s in STAGES:
        assert json.load(open(out / s / "stage.json"))["key"]
        assert f"[{s}] running" in first and f"[{s}] cached" in second
    assert "rank-1 LoRA recovers" in first and (out / "summary.txt").read_text().strip() in second


def test_training_artifacts(demo_run):
    out, _, _ = demo_run
    for run in ("base", "rank1", "full"):
        res = json.load(open(out / run / "result.json"))
        assert res["steps"] > 0 and math.isfinite(res["final_loss"])
        lines = [json.loads(l) for l in open(out / run / "metrics.jsonl")]
        assert [l["step"] for l in lines] == list(range(1, res["steps"] + 1))
    # pretraining learned something: the loss fell well below its start
    base = json.load(open(out / "base" / "result.json"))["losses"]
    assert base[-1] < 0.5 * base[0]


def test_adapter_loads_in_peft_and_matches_ours(demo_run):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_files import load_adapter
    from model import Qwen2
    out, _, _ = demo_run
    base, adapter = out / "base" / "model", out / "rank1" / "adapter"
    hf = peft.PeftModel.from_pretrained(transformers.Qwen2ForCausalLM.from_pretrained(str(base)),
                                        str(adapter)).eval()
    ours = Qwen2.from_pretrained(str(base))
    load_adapter(ours, str(adapter), verbose=False)
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours.eval()(idx)
        plain = Qwen2.from_pretrained(str(base)).eval()(idx)
    assert (got - ref).abs().max() < 1e-4
    assert (got - plain).abs().max() > 1e-3  # the trained adapter changes the model


def test_eval_results_schema(demo_run):
    out, _, _ = demo_run
    n = len(open(out / "data" / "heldout.jsonl").readlines())
    for run, protocol in (("base_plain", "plain"), ("base_textbook", "completion"),
                          ("base", "s1"), ("full", "s1"), ("rank1", "s1")):
        res = json.load(open(out / "eval" / run / "results.json"))
        r = res["results"]["math"]
        assert res["protocol"] == protocol
        assert r["problems"] == n == len(r["per_problem"]) and 0 <= r["accuracy"] <= 1
        lo, hi = r["ci95"]
        assert lo <= r["accuracy"] <= hi
        assert sum(1 for _ in open(out / "eval" / run / "samples.jsonl")) == n
    t = json.load(open(out / "eval" / "recovery.json"))
    assert t["protocols"] == dict(base="plain", full="s1", lora="s1")
    assert t["table"]["math"]["problems"] == n
    s = json.load(open(out / "summary.json"))
    assert s["accuracy"]["full"]["accuracy"] == pytest.approx(t["table"]["math"]["full"])
    # the premise, measured: the base given a textbook page's opening, and the share of it
    ceiling = json.load(open(out / "eval" / "base_textbook" / "results.json"))
    c = ceiling["results"]["math"]["accuracy"]
    assert s["accuracy"]["base_textbook"]["accuracy"] == c
    assert ceiling["settings"]["generation"]["template"] == "Problem: {question}\nSolution:\n"
    if c:
        assert s["of_ceiling"]["rank1"] == pytest.approx(s["accuracy"]["rank1"]["accuracy"] / c)
    # what the figures came from
    env = s["environment"]
    assert env["packages"]["torch"] == torch.__version__
    assert env["pins"]["OMP_NUM_THREADS"] and "cpu_capability" in env
    assert s["recovery"]["recovery"] == t["table"]["math"]["recovery"]
    s1 = json.load(open(out / "eval" / "recovery_s1.json"))
    assert s1["protocols"]["base"] == "s1"
    assert s["recovery"]["over_s1_base"] == s1["table"]["math"]["recovery"]


def test_heldout_problems_stay_at_two_digits(demo_run):
    """Every number on a held-out problem's way, worked step by step, has two digits."""
    from demo import PROFILES
    out, _, _ = demo_run
    rows = [json.loads(l) for l in open(out / "data" / "heldout.jsonl")]
    lo, hi = PROFILES["fast"]["heldout_steps"]
    for r in rows:
        v, verb, d, n = re.match(r"Start at (\d+) and (add|subtract) (\d), (\d) times",
                                 r["problem"]).groups()
        v, d, n = int(v), int(d) * (1 if verb == "add" else -1), int(n)
        path = [v + k * d for k in range(n + 1)]
        assert lo <= n <= hi and all(10 <= x <= 99 for x in path) and str(path[-1]) == r["answer"]


def test_sae_and_ablation_artifacts(demo_run):
    out, _, _ = demo_run
    m = json.load(open(out / "interpret" / "sae" / "metrics.json"))["heldout"]
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    assert 0 <= m["fvu"] < 1
    acts = json.load(open(out / "interpret" / "acts" / "index.json"))
    assert acts["shape"][1] == 7 * 4
    a = json.load(open(out / "interpret" / "ablate" / "ablations.json"))
    none = a["results"]["none"][0]["kl_full_abl_assistant_mean"]
    assert none == 0 and all(r["kl_full_abl_assistant_mean"] > 0 for r in a["results"]["layer"])
    carry = json.load(open(out / "summary.json"))["carry"]
    assert carry["lines"] > carry["carries"] > 0


def test_carry_scalar_is_the_best_column_by_brute_force(demo_run):
    """The summary's carry scalar against AUROC counted pair by pair over every column."""
    from demo import carry_rows
    out, _, _ = demo_run
    carry = json.load(open(out / "summary.json"))["carry"]
    x, y = carry_rows(str(out / "interpret" / "acts"), str(out / "base" / "model"))
    assert (len(y), int(y.sum())) == (carry["lines"], carry["carries"])
    pos, neg = x[y], x[~y]
    gt = (pos[:, None, :] > neg[None, :, :]).mean((0, 1))
    eq = (pos[:, None, :] == neg[None, :, :]).mean((0, 1))
    auc = gt + eq / 2  # P(carry scores higher), ties one half
    best = int(np.argmax(np.abs(auc - 0.5)))
    assert carry["scalar"]["column"] == best
    assert carry["scalar"]["sign"] == ("+" if auc[best] >= 0.5 else "-")
    assert carry["scalar"]["auroc"] == pytest.approx(max(auc[best], 1 - auc[best]), abs=1e-9)


def test_auroc_hand_values():
    from demo import auroc
    y = np.array([False, False, True, True])
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auroc(np.array([0.1, 0.3, 0.2, 0.4]), y) == 0.75
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), y) == 0.5  # ties count one half


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium is not installed (.ci/run installs it)")
def test_dashboard_opens_without_console_errors(demo_run):
    out, _, _ = demo_run
    page = out / "interpret" / "interp" / "dashboard.html"
    dom, log = chromium_dom(page.as_uri())
    assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
    assert "<title>rank1 dashboard</title>" in dom and "L0.gate_proj+" in dom


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium is not installed (.ci/run installs it)")
def test_rollout_page_of_the_first_trace(demo_run):
    """rollout.py on the demo's first trace: every per-trace analysis written, the page opens."""
    out, _, _ = demo_run
    d = out / "interpret" / "rollout"
    r = json.load(open(d / "rollout.json"))
    assert {"state", "kl", "attribution", "interaction", "norms"} <= set(r)
    assert len(r["state"]) == r["doc"]["tokens"] and len(r["kl"]["heads"]) == 8
    s = json.load(open(out / "summary.json"))
    assert s["top_heads"] == r["kl"]["heads"][:3] and s["rollout"] == str(d / "rollout.html")
    for view in ("state", "attention", "attribution", "interaction", "norms"):
        dom, log = chromium_dom((d / "rollout.html").as_uri() + "#view=" + view)
        assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
        assert "rank1 rollout" in dom


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium is not installed (.ci/run installs it)")
def test_report_opens_and_shows_the_llm_commands(demo_run):
    """The demo's report: ablations (with the greedy curve) and geometry drawn, the LLM sections
    naming the command that makes their input."""
    out, _, _ = demo_run
    rep = json.load(open(out / "interpret" / "report" / "report.json"))
    n_mlp = 3 * len({l for l, _ in json.load(open(out / "interpret" / "ablate" /
                                                   "ablations.json"))["sites"]})
    assert len(rep["ablation"]["greedy"]) == n_mlp and rep["geometry"]["interference"]["pairs"]
    assert set(rep["missing"]) == {"lora_vs_mlp", "categories"}
    dom, log = chromium_dom((out / "interpret" / "report" / "report.html").as_uri())
    assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
    assert "Greedy MLP ablation" in dom and "interpret.py autointerp" in dom


@pytest.mark.multiseed
def test_two_seeds_report_the_spread(demo_run):
    """`--seeds 0,1` on the fast profile: seed 0's stages are reused, seed 1 trains and evaluates
    its own base and finetunes, and every headline number is reported as mean [min, max]. Not in
    the default run (`python -m pytest -m multiseed`)."""
    out, _, _ = demo_run
    cmd = [sys.executable, os.path.join(ROOT, "demo.py"), "--fast", "--out", str(out),
           "--seeds", "0,1"]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "RANK1_DEMO_QUIET": "1"}, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[base] cached" in r.stdout and "[interpret] cached" in r.stdout
    s = json.load(open(out / "summary.json"))
    assert s["seeds"] == [0, 1] and set(s["per_seed"]) == {"0", "1"}
    ceilings = [f["accuracy"]["base_textbook"]["accuracy"] for f in s["per_seed"].values()]
    assert all(0 <= c <= 1 for c in ceilings)
    assert s["spread"]["ceiling"] == dict(mean=sum(ceilings) / 2, min=min(ceilings),
                                          max=max(ceilings))
    assert (out / "seed-1" / "eval" / "base_textbook" / "results.json").exists()
    assert "over seeds 0,1 (mean [min, max]): ceiling" in r.stdout
