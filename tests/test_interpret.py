"""interpret.py mining against brute force on random activation stores (ties, negative polarity,
per-document cap, de-duplication), quantiles against numpy, and the CLI output."""
import json

import numpy as np
import pytest
import torch

from autointerp import autointerp, balanced_accuracy, compare_populations, explain_messages
from batchtopk import SAE
from collect import main as collect_main
from helpers import FakeLLM, fake_store, hf_tiny, save_hf, tiny_tokenizer
from data import Tokenizer
from interpret import feature_names, feature_values, main, mine, quantiles
from llm import LLM
from lora import adapters, apply_lora, capture, sites, steer
from lora_files import load_adapter, save_adapter
from model import Qwen2
from steering import attention_norm, sae_offsets, steer_residual
from store import ActivationStore


def brute_force(store, sae, k, dedup, per_doc):
    """Per feature and document: greedy picks in plain Python; then the global (value desc, index
    asc) top k."""
    vals = feature_values(store.load_all(), sae).numpy()
    starts = []
    base = 0
    for sh in store.index["shards"]:
        starts += [(base + d["start"], d["length"]) for d in sh["docs"]]
        base += sh["tokens"]
    res = []
    for f in range(vals.shape[1]):
        cands = []
        for st, n in starts:
            v = vals[st:st + n, f].astype(np.float64).copy()
            for _ in range(min(per_doc, k)):
                best = max(range(n), key=lambda t: (v[t], -t))
                if v[best] <= 0:
                    break
                cands.append((float(vals[st + best, f]), st + best))
                v[max(0, best - dedup):best + dedup + 1] = -np.inf
        cands.sort(key=lambda c: (-c[0], c[1]))
        res.append(cands[:k])
    return res


@pytest.mark.parametrize("k,dedup,per_doc", [(5, 0, 5), (4, 2, 4), (6, 1, 2), (3, 0, 1)])
def test_topk_matches_brute_force(tmp_path, k, dedup, per_doc):
    store = fake_store(tmp_path / "s", [7, 1, 12, 5, 9], seed=k + dedup)
    top_v, top_i, _, _, fired, _, mass = mine(store, None, k, dedup, per_doc, n_random=4)
    ref = brute_force(store, None, k, dedup, per_doc)
    for f, want in enumerate(ref):
        got = [(v, i) for v, i in zip(top_v[:, f].tolist(), top_i[:, f].tolist()) if i >= 0]
        assert got == want, f
    vals = feature_values(store.load_all()).numpy()
    assert fired.tolist() == (vals > 0).sum(0).tolist()
    np.testing.assert_allclose(mass.numpy(), np.where(vals > 0, vals, 0).sum(0), rtol=1e-6)


def test_topk_with_sae_features(tmp_path):
    store = fake_store(tmp_path / "s", [6, 9, 4], seed=3, ties=False)
    sae = SAE(3, 5, 2)
    sae.init_weights(generator=torch.Generator().manual_seed(0))
    assert len(feature_names(store.index["sites"], sae)) == 3 * 2 + 5
    top_v, top_i, *_ = mine(store, sae, 4, 1, 2)
    for f, want in enumerate(brute_force(store, sae, 4, 1, 2)):
        got = [(v, i) for v, i in zip(top_v[:, f].tolist(), top_i[:, f].tolist()) if i >= 0]
        assert [i for _, i in got] == [i for _, i in want] and np.allclose([v for v, _ in got],
                                                                           [v for v, _ in want])


def test_random_sample_is_non_zero_and_distinct(tmp_path):
    store = fake_store(tmp_path / "s", [30, 40, 25], seed=5)
    _, _, rv, ri, fired, ni, _ = mine(store, None, 3, 0, 3, n_random=8)
    vals = feature_values(store.load_all()).numpy()
    for f in range(vals.shape[1]):
        neg = [i for i in ni[:, f].tolist() if i >= 0]
        assert len(neg) == min(8, len(vals) - int(fired[f])) and all(vals[i, f] <= 0 for i in neg)
        ids = [i for i in ri[:, f].tolist() if i >= 0]
        assert len(ids) == min(8, int(fired[f])) and len(set(ids)) == len(ids)
        assert all(vals[i, f] > 0 for i in ids)
        assert np.allclose([vals[i, f] for i in ids],
                           [v for v, i in zip(rv[:, f].tolist(), ri[:, f].tolist()) if i >= 0])


def test_quantiles_match_numpy(tmp_path):
    store = fake_store(tmp_path / "s", [13, 8, 21, 3], seed=7)
    q = quantiles(store, None, block=2)
    vals = feature_values(store.load_all()).numpy()
    np.testing.assert_allclose(q, np.quantile(vals, (0.5, 0.9, 0.99, 0.999), axis=0).T, rtol=1e-6)


def test_cli_writes_examples_with_context(tmp_path):
    fake_store(tmp_path / "s", [7, 1, 12, 5, 9])
    (tmp_path / "tok").mkdir()
    tiny_tokenizer(tmp_path / "tok")
    main(["mine", "--acts", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "tok"),
          "--out", str(tmp_path / "o"), "--k", "3", "--context", "2", "--dedup", "1"])
    out = json.load(open(tmp_path / "o" / "features.json"))
    assert [f["name"] for f in out["features"]][:2] == ["L0.gate_proj+", "L0.q_proj+"]
    f = out["features"][3]  # L0.gate_proj-
    assert f["name"] == "L0.gate_proj-" and len(f["top"]) == 3
    e = f["top"][0]
    assert (e["acts"][e["target"]] == pytest.approx(e["value"]) and len(e["tokens"])
            == len(e["acts"]) <= 5)
    assert [x["value"] for x in f["top"]] == sorted([x["value"] for x in f["top"]], reverse=True)
    assert set(f["quantiles"]) == {"q50", "q90", "q99", "q999"} and 0 < f["freq"] < 1


# --- steering -------------------------------------------------------------------------------------


def test_steer_zero_reproduces_and_offsets_are_exact(tmp_path):
    m = apply_lora(Qwen2.from_pretrained(save_hf(hf_tiny(), tmp_path / "m")), verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
    sae = SAE(21, 8, 2)
    sae.init_weights(generator=g)
    sae.scale.copy_(torch.rand(21, generator=g) + 0.5)
    prompt = [[1, 2, 3, 4, 5]]
    base = m.generate(prompt, 12)
    with steer(m, sae_offsets(sae, 3, 0.0, sites(m))):
        assert m.generate(prompt, 12) == base
    with torch.no_grad(), capture(m) as cap:
        m(torch.tensor([[1, 2, 3]]))
        ref = cap.acts.clone()
        cap.clear()
        with steer(m, sae_offsets(sae, 3, 2.0, sites(m)), positions=[2]):
            m(torch.tensor([[1, 2, 3]]))
    want = 2.0 * sae.W_dec[3].detach() * sae.scale
    # layer 0's attention sites read the unmodified input: their change is exactly the offset
    for col, (l, t) in enumerate(sites(m)):
        if l == 0 and t in ("q_proj", "k_proj", "v_proj"):
            assert torch.allclose(cap.acts[0, 2, col] - ref[0, 2, col], want[col], atol=1e-5)
            assert torch.equal(cap.acts[0, :2, col], ref[0, :2, col])
    with steer(m, sae_offsets(sae, 3, 5.0, sites(m))):
        assert m.generate(prompt, 12) != base


# --- autointerp against a local fake OpenAI-compatible server -------------------------------------


def feature_with_examples(i):
    # distinct text per feature, so that no two requests share a cache key (the call count is exact)
    values = (3, 9, 1, 7, 5, 2, 8, 6, 4, 10, 11, 12, 13, 14)
    top = [dict(value=float(v), tokens=["a", "X", f"b{i}"], acts=[0, v, 0], target=1)
           for v in values]
    inactive = [dict(value=0.0, tokens=["a", "o", f"b{i}"], acts=[0, 0, 0], target=1)
                for _ in range(6)]
    return dict(id=i, name=f"L0.gate_proj+{i}", top=top, random=top[:2], inactive=inactive)


def test_autointerp_with_fake_server(tmp_path, fake_llm):
    url = fake_llm
    f = feature_with_examples(0)
    msg = explain_messages(f, n=10)[1]["content"].split("\n")
    values = [float(l.split("(")[1].split(")")[0]) for l in msg if l[0].isdigit()]
    assert values == sorted(values, reverse=True) == [14, 13, 12, 11, 10, 9, 8, 7, 6, 5]
    FakeLLM.script[:] = [429, 500]
    llm = LLM(url, "fake", str(tmp_path / "cache"), backoff=0.01, concurrency=2)
    rows = autointerp([f, feature_with_examples(1)], llm, rubric=False)
    assert all(r["explanation"] == "Fires on the letter X." for r in rows)
    assert all(r["detection_balanced_accuracy"] == 1.0 for r in rows)  # the judge is perfect
    assert llm.calls == 4 + 2  # 2 features x (explain + detect) + the two retried failures
    llm2 = LLM(url, "fake", str(tmp_path / "cache"))
    rows2 = autointerp([f, feature_with_examples(1)], llm2)
    assert rows2 == rows and llm2.calls == 0  # all from the cache
    FakeLLM.script[:] = [404]
    with pytest.raises(RuntimeError, match="HTTP 404"):
        LLM(url, "fake", str(tmp_path / "c2"))([{"role": "user", "content": "x"}])


def test_autointerp_rubric_and_categories_through_the_cli(tmp_path, fake_llm):
    """--rubric rates every feature (validated JSON), --categorise sorts the SAE latents into the
    listed categories; a reply naming an unlisted one is recorded as that latent's failure and
    the command fails naming it, keeping the rest."""
    feats = [feature_with_examples(0), dict(feature_with_examples(1), name="sae0"),
             dict(feature_with_examples(2), name="sae1")]
    for e in feats[2]["top"]:
        e["tokens"] = ["a", "X", "UNLISTED"]
    (tmp_path / "features.json").write_text(json.dumps(dict(features=feats)))
    args = ["autointerp", "--features", str(tmp_path / "features.json"), "--out",
            str(tmp_path / "ai"), "--llm-url", fake_llm, "--rubric", "--categorise"]
    with pytest.raises(SystemExit, match="1 features failed.*feature 2 \\(sae1\\): unknown "
                                         "category 'arithmetic'"):
        main(args)
    rows = [json.loads(l) for l in open(tmp_path / "ai" / "autointerp.jsonl")]
    assert [(r["rubric"], r["rubric_reasoning"], r["top_value"]) for r in rows] == \
        [(1, "all fit", 14.0)] * 3
    # the rubric rates the feature's own explanation against its top 10 examples, nothing else
    rated = [r["messages"][-1]["content"] for r in FakeLLM.requests
             if r["messages"][0]["content"].startswith("Classify this feature")]
    assert len(rated) == 3
    for text in rated:
        assert text.startswith("Explanation: Fires on the letter X.\n")
        shown = [l for l in text.split("\n") if l[:1].isdigit()]
        assert [float(l.split("(")[1].split(")")[0]) for l in shown] == list(range(14, 4, -1))
        assert not any(l.startswith("r") for l in text.split("\n"))  # no random weak examples
    cats = [json.loads(l) for l in open(tmp_path / "ai" / "categories.jsonl")]
    assert [c["name"] for c in cats] == ["sae0", "sae1"]
    assert cats[0]["category"] == "result_formulation" and "error" in cats[1]
    assert json.load(open(tmp_path / "ai" / "autointerp.json"))["categorise"] is True


def test_balanced_accuracy_hand_values():
    items = [("a", True), ("b", True), ("c", False), ("d", False)]
    assert balanced_accuracy(items, {0, 1}) == 1.0
    assert balanced_accuracy(items, {0, 2}) == 0.5
    assert balanced_accuracy(items, set()) == 0.5
    assert balanced_accuracy(items, {2, 3}) == 0.0


def test_compare_populations_hand_values():
    """The paper's populations by default: MLP-adapter features (the q_proj row is left out) and
    each neuron in its dominant polarity (N1.0- and N3.0+ lose to their other polarity)."""
    row = lambda n, v, r, top=1.0: dict(name=n, detection_balanced_accuracy=v, rubric=r,
                                        top_value=top)
    lora = [row("L0.gate_proj+", 0.9, 0), row("L0.up_proj-", 0.8, 1), row("L1.down_proj+", 0.7, 1),
            row("L1.gate_proj-", 0.6, 2), row("L0.q_proj+", 0.1, 2)]
    mlp = [row("N0.0+", 0.6, 2, 3), row("N1.0+", 0.5, 2, 3), row("N1.0-", 0.1, 0, 1),
           row("N2.0-", 0.7, 1, 3), row("N3.0+", 0.2, 0, 1), row("N3.0-", 0.6, 2, 3)]
    t = compare_populations(lora, mlp)
    d = t["detection_balanced_accuracy"]
    assert (d["lora"] == pytest.approx(0.75) and d["mlp"] == pytest.approx(0.6) and d["diff"]
            == pytest.approx(0.15))
    assert d["lora_ci95"][0] <= 0.75 <= d["lora_ci95"][1]
    assert t["rubric"]["shares"]["lora"] == {0: 0.25, 1: 0.5, 2: 0.25}
    assert t["rubric"]["shares"]["mlp"][2] == 0.75
    every = compare_populations(lora, mlp, which="all")["detection_balanced_accuracy"]
    assert (every["n_lora"], every["n_mlp"]) == (5, 6) and every["lora"] == pytest.approx(0.62)


@pytest.mark.parametrize("baseline", ["up_proj", "swiglu"])
def test_mlp_neuron_baseline_collected_and_mined(tmp_path, baseline):
    """collect.py --mlp-neurons N stores up_proj's first N output channels per layer (the paper's
    baseline, the default) or down_proj's input at N sampled neurons (checked against a hook on
    the adapted model here), and mining reads them as the mlp population."""
    save_hf(hf_tiny(vocab_size=300), tmp_path / "m")
    tiny_tokenizer(tmp_path / "m")
    m = apply_lora(Qwen2.from_pretrained(str(tmp_path / "m")), verbose=False)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.normal_(0, 0.3)
    save_adapter(m, tmp_path / "ad")
    rows = [dict(question=f"q{i}", deepseek_thinking_trajectory="t " * (i + 2),
                 deepseek_attempt="a") for i in range(3)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    collect_main(["--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--data",
                  str(tmp_path / "rows.jsonl"),
                  "--out", str(tmp_path / "acts"), "--mlp-neurons", "4", "--window", "8",
                  *(["--mlp-baseline", baseline] if baseline != "up_proj" else [])])
    store = ActivationStore(str(tmp_path / "acts"))
    neurons = store.index["mlp_neurons"]
    assert store.index["mlp_baseline"] == baseline
    if baseline == "up_proj":
        assert neurons == [[l, i] for l in range(3) for i in range(4)]
    else:
        assert len(neurons) == 3 * 4 and all(0 <= i < 37 for _, i in neurons)
        assert neurons != [[l, i] for l in range(3) for i in range(4)]
    # against an independent hook on one document
    m2 = Qwen2.from_pretrained(str(tmp_path / "m"))
    load_adapter(m2, str(tmp_path / "ad"), verbose=False)
    seen = {}
    if baseline == "up_proj":
        hs = [m2.model.layers[l].mlp.up_proj.register_forward_hook(
            lambda mod, inp, out, l=l: seen.__setitem__(l, out[0])) for l in range(3)]
    else:
        hs = [m2.model.layers[l].mlp.down_proj.register_forward_pre_hook(
            lambda mod, inp, l=l: seen.__setitem__(l, inp[0][0])) for l in range(3)]
    doc = store.index["shards"][0]["docs"][0]
    ids = np.asarray(store.tokens(0)[doc["start"]:doc["start"] + doc["length"]]).tolist()
    with torch.no_grad():
        m2(torch.tensor([ids]))
    for h in hs:
        h.remove()
    want = torch.stack([seen[l][:, i] for l, i in neurons], dim=1)
    np.testing.assert_allclose(store.mlp(0)[:doc["length"]], want.numpy(), atol=1e-4)
    top_v, top_i, *_ = mine(store, None, 3, 0, 3, population="mlp")
    assert top_v.shape == (3, 2 * 12)
    assert feature_names(neurons, None, "mlp")[0] == f"N{neurons[0][0]}.{neurons[0][1]}+"


def test_steer_cli_measures(tmp_path):
    save_hf(hf_tiny(vocab_size=300), tmp_path / "m")
    tiny_tokenizer(tmp_path / "m")
    m = apply_lora(Qwen2.from_pretrained(str(tmp_path / "m")), verbose=False)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.normal_(0, 0.3)
    save_adapter(m, tmp_path / "ad")
    (tmp_path / "p.jsonl").write_text(json.dumps({"problem": "What is 2+2?", "answer": "4"}) + "\n")
    out = main(["steer", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"),
                "--site", "L1.gate_proj",
                "--strengths", "0,50", "--seeds", "0,1", "--bench",
                f"math500={tmp_path / 'p.jsonl'}", "--out", str(tmp_path / "s.json"),
                "--thinking-budget", "12", "--max-answer-tokens", "4", "--temperature", "0",
                "--words", "Wait,the"])
    r = out["results"]
    assert [(x["strength"], x["seed"]) for x in r] == [(0, 0), (0, 1), (50, 0), (50, 1)]
    assert all(set(x["word_counts"]) == {"Wait", "the"} and x["accuracy"] in (0.0, 1.0) for x in r)
    # greedy: the seeds agree; steering changes it
    assert r[0]["examples"] == r[1]["examples"] and r[0]["examples"] != r[2]["examples"]
    assert json.load(open(tmp_path / "s.json"))["site"] == "L1.gate_proj"


def test_residual_steering_is_a_bias_on_the_attention_output(tmp_path):
    """steer_residual(layer, v) gives what a bias v on that layer's o_proj gives (the attention
    output is o_proj's output), and nothing after the context; the CLI's --residual mode steers
    along the adapter's a in units of the measured attention-output norm."""
    save_hf(hf_tiny(vocab_size=300), tmp_path / "m")
    tiny_tokenizer(tmp_path / "m")
    m = Qwen2.from_pretrained(str(tmp_path / "m"))
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    v = torch.randn(m.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m(ids)
        with steer_residual(m, 1, v):
            steered = m(ids)
        o = m.model.layers[1].self_attn.o_proj
        biased = torch.nn.Linear(o.in_features, o.out_features, bias=True)
        biased.weight.copy_(o.weight)
        biased.bias.copy_(v)
        m.model.layers[1].self_attn.o_proj = biased
        want = m(ids)
        m.model.layers[1].self_attn.o_proj = o
        assert torch.equal(m(ids), plain)  # the hook is gone
    torch.testing.assert_close(steered, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, plain, atol=1e-3)
    # the CLI
    ma = apply_lora(Qwen2.from_pretrained(str(tmp_path / "m")), verbose=False)
    with torch.no_grad():
        for a in adapters(ma):
            a.lora_A.normal_(0, 1.0)
    save_adapter(ma, tmp_path / "ad")
    args = ["steer", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"),
            "--prompt", "What is 2+2?", "--strengths", "0,20", "--out", str(tmp_path / "s.json"),
            "--thinking-budget", "12", "--max-answer-tokens", "4", "--temperature", "0"]
    out = main(args + ["--residual", "L1.up_proj"])
    norm = attention_norm(ma, Tokenizer(str(tmp_path / "m")), ["What is 2+2?"], 1)
    assert out["residual"] == "L1.up_proj" and out["attention_norm"] == pytest.approx(norm)
    assert out["results"][0]["examples"] != out["results"][1]["examples"]
    with pytest.raises(SystemExit, match="gate_proj or up_proj"):
        main(args + ["--residual", "L1.q_proj", "--overwrite"])


class OneReply:
    """An LLM stand-in: each system prompt gets its scripted reply; calls are counted."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def __call__(self, messages):
        self.calls.append(messages)
        return self.replies[messages[0]["content"]]

    def map(self, fn, items):
        return [fn(x) for x in items]


def test_official_single_call_prompt_by_hand():
    """--rubric-mode official: the top examples (shuffled with a seed), each a +-8-token window
    ("..." where cut) and its tokens above half the largest |activation| on a 0-10 scale, at most
    10 of them; explanation and class come from one reply, detection still scores it."""
    from autointerp import OFFICIAL_SYSTEM, OFFICIAL_TASK, official_messages
    tokens = [f"t{j}" for j in range(20)]
    e1 = dict(value=8.0, tokens=tokens, target=10,
              acts=[0.0] * 9 + [5.0, 8.0, 3.9] + [0.0] * 8)
    e2 = dict(value=4.0, tokens=tokens[:5], target=2, acts=[0, 0, 4.0, -4.5, 0])
    f = dict(id=0, name="sae0", top=[e2, e1], random=[], inactive=[])
    sys_msg, user = official_messages(f, n=2, seed=0)
    assert sys_msg["content"] == OFFICIAL_SYSTEM and user["content"].startswith(OFFICIAL_TASK)
    blocks = user["content"][len(OFFICIAL_TASK) + 2:].split("\n\n")
    want = {"...t2t3t4t5t6t7t8t9t10t11t12t13t14t15t16t17t18...": ["t9 6", "t10 10"],
            "t0t1t2t3t4": ["t3 6"]}  # 5/8 -> 6, 8/8 -> 10; 3.9/8 and 4/8 are not above half;
    #                                 |-4.5|/8 -> 6
    got = {}
    for b in blocks:
        head, *lines = b.split("\n")
        got[head.split(": ", 1)[1]] = lines
    assert got == want
    order = [b.split("\n")[0] for b in blocks]
    assert official_messages(f, n=2, seed=0)[1] == user  # seeded: the same order every run
    assert any(official_messages(f, n=2, seed=s)[1]["content"].split("\n\n")[1:][0].split("\n")[0]
               != order[0] for s in range(1, 8))  # other seeds shuffle otherwise
    from autointerp import DETECT_SYSTEM
    llm = OneReply({OFFICIAL_SYSTEM: '{"explanation": "counts steps", "classification": 0, '
                                     '"classification_reasoning": "all fit"}',
                    DETECT_SYSTEM: "[1]"})
    feat = feature_with_examples(3)
    row = autointerp([feat], llm, rubric=True, mode="official")[0]
    assert (row["explanation"], row["rubric"], row["rubric_mode"]) == ("counts steps", 0,
                                                                        "official")
    assert [m[0]["content"] for m in llm.calls] == [OFFICIAL_SYSTEM, DETECT_SYSTEM]  # one call
    bad = OneReply({OFFICIAL_SYSTEM: '{"classification": 0}', DETECT_SYSTEM: "[1]"})
    assert "no explanation in the reply" in autointerp([feat], bad, mode="official")[0]["error"]
