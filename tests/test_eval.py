"""eval.py end to end on a tiny random model: files, 1 vs 2 processes, determinism, recovery table,
ablations, and bad input."""
import argparse
import itertools
import json
import os
import shutil
import sys

import pytest
import torch

from ablate import ablation_sequences, greedy_ablation, kl_stats
from ablate import main as ablate_main
from benchmarks import load_benchmark
from checkpoint import model_identity
from helpers import SHARED_DATA, TINY, hf_tiny, run_script, save_hf, tiny_env, tiny_tokenizer
from data import FINAL_ANSWER, Tokenizer, render_chat, s1_prompt
from eval import main, recovery_table
from grading import grade_sample
from lora import ablate, adapters, apply_lora
from lora_files import load_model
from model import Qwen2, Qwen2Config
from protocols import GenConfig, plain_programs, s1_programs, stream

PY = sys.executable
MATH = [dict(problem=f"What is {a} + {b}?", answer=str(a + b), id=f"p{a}") for a,
        b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9)]]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tiny_env(tmp_path_factory.mktemp("eval"), silent_layer=1)  # layer 1's adapters: zero
    shared = os.path.join(SHARED_DATA, "math500", "test.jsonl")
    if os.path.isfile(shared):  # the real MATH500 rows when ../shared is here, else hand-made ones
        lines = open(shared).read().splitlines()[:5]
    else:
        lines = [json.dumps(r) for r in MATH]
    (d / "math.jsonl").write_text("\n".join(lines) + "\n")
    return d


def run_eval(env, out, *extra, nproc=1):
    return run_script("eval.py", ["run", "--model", env / "model", "--out", out,
                                  "--bench", f"math500={env / 'math.jsonl'}", "--max-context", 4096,
                                  "--thinking-budget", 20, "--max-answer-tokens", 8,
                                  "--batch-size", 2, *extra], nproc)


@pytest.mark.slow
def test_run_writes_files_same_for_two_processes_and_two_runs(env, tmp_path):
    run_eval(env, tmp_path / "a", "--adapter", str(env / "adapter"))
    res = json.load(open(tmp_path / "a" / "results.json"))
    m = res["results"]["math500"]
    assert (m["problems"] == 5 and m["samples"] == 5 and 0.0 <= m["accuracy"] <= 1.0
            and len(m["ci95"]) == 2)
    assert res["identity"]["adapter"]["path"].endswith("adapter")
    assert res["settings"]["generation"]["max_context"] == 4096
    samples = [json.loads(l) for l in open(tmp_path / "a" / "samples.jsonl")]
    assert len(samples) == 5
    assert {"id", "generation", "extracted", "gold", "correct",
            "thinking_tokens"} <= set(samples[0])
    assert all(s["generation"].startswith("<|im_start|>think")
               and "<|im_start|>answer" in s["generation"] for s in samples)
    run_eval(env, tmp_path / "b", "--adapter", str(env / "adapter"))
    run_eval(env, tmp_path / "c", "--adapter", str(env / "adapter"), nproc=2)
    a = open(tmp_path / "a" / "samples.jsonl").read()
    assert (a == open(tmp_path / "b" / "samples.jsonl").read()
            == open(tmp_path / "c" / "samples.jsonl").read())
    ra, rc = (json.load(open(tmp_path / d / "results.json"))["results"] for d in ("a", "c"))
    assert ra == rc
    # merged and unmerged adapters decode the same tokens
    run_eval(env, tmp_path / "m", "--adapter", str(env / "adapter"), "--merge")
    assert open(tmp_path / "m" / "samples.jsonl").read() == a


def drive(program, script):
    """Run an engine program against scripted generations, each cut as the engine cuts it (after
    its first stop, at the turn's budget): (the program's result, the turns it asked for)."""
    turns = []
    try:
        turn = next(program)
        while True:
            turns.append(turn)
            o = script.pop(0)
            end = next((i + 1 for i, t in enumerate(o) if t in turn.stops), len(o))
            turn = program.send(o[:min(end, turn.budget)])
    except StopIteration as e:
        return e.value, turns


def s1(tok, cfg, script, question="q"):
    (program,), _ = s1_programs(tok, [question], cfg)
    return drive(program, script)


def test_s1_protocol_budget_and_answer_phase(env):
    """Thinking that hits its budget gets 'Final Answer:', a natural stop does not, and --wait
    replaces the first natural stop by 'Wait'; a turn feeds what the cache does not hold yet."""
    tok = Tokenizer(str(env / "model"))
    args = GenConfig(thinking_budget=5, max_context=10**6, max_answer_tokens=4)
    a, b = tok.encode("ab"), tok.encode("7")
    out, turns = s1(tok, args, [a * 10, b + [tok.im_end]])  # thinking runs past the budget
    assert out["thinking_truncated"] and out["thinking_tokens"] == 5
    assert out["generation"].endswith("<|im_start|>answer\nFinal Answer:7")
    # the cut thinking's last token was generated, not fed: the answer turn feeds it first
    assert turns[1].feed == (a * 10)[4:5] + tok.encode("\n" + FINAL_ANSWER)
    out, turns = s1(tok, args, [a + [tok.im_start], b + [tok.im_end]])  # natural stop
    assert not out["thinking_truncated"]
    assert out["generation"].endswith(tok.decode(a) + "<|im_start|>answer7")
    assert turns[1].feed == tok.encode("<|im_start|>answer")  # the stop token is dropped
    args.wait, args.thinking_budget = 1, 50
    out, turns = s1(tok, args, [a + [tok.im_start], a + [tok.im_start], b + [tok.im_end]])
    assert tok.decode(a) + "Wait" + tok.decode(a) + "<|im_start|>answer" in out["generation"]
    think = tok.encode("<|im_start|>think")
    assert turns[0].feed[-len(think):] == think and turns[1].feed == tok.encode("Wait")
    assert turns[1].budget == 50 - len(a) - len(tok.encode("Wait"))


def test_s1_budgets_follow_s1_formulas(env):
    """Auto thinking = max_context - |P| - |FINAL_ANSWER| - 100; the answer gets all the context
    that the prompt, the thinking and the answer head left (s1's second call), or the cap."""
    tok = Tokenizer(str(env / "model"))
    P, F = len(tok.encode(s1_prompt("q"))), len(tok.encode(FINAL_ANSWER))
    a = tok.encode("ab")
    ctx = P + F + 100 + 37
    out, turns = s1(tok, GenConfig(max_context=ctx), [a * 1000, tok.encode("7") + [tok.im_end]])
    assert turns[0].budget == 37 and out["thinking_tokens"] == 37 and out["thinking_truncated"]
    head = len(turns[1].feed) - 1  # the last thinking token, then the head
    assert turns[1].budget == ctx - P - 37 - head
    out, turns = s1(tok, GenConfig(max_context=P + 300), [a + [tok.im_start], [5] * 1000])
    assert turns[1].budget == P + 300 - P - len(a) - len(turns[1].feed)  # runs to the limit
    assert out["answer_truncated"] and out["answer_tokens"] == turns[1].budget
    _, turns = s1(tok, GenConfig(max_context=P + 300, max_answer_tokens=9),
                  [a + [tok.im_start], [5] * 1000])
    assert turns[1].budget == 9
    with pytest.raises(ValueError, match="no thinking budget"):
        s1_programs(tok, ["q"], GenConfig(max_context=P + F + 100))


def test_plain_protocol_is_one_chat_answer(env):
    """--protocol plain: the chat template, no think marker, one generation to the context limit
    that stops at <|im_end|>; the answer is graded from the whole output."""
    tok = Tokenizer(str(env / "model"))
    cfg = GenConfig(protocol="plain", max_context=200)
    prompt = tok.encode(render_chat([{"role": "user", "content": "q"}],
                                    add_generation_prompt=True))
    (program,), _ = plain_programs(tok, [prompt], cfg)
    out, turns = drive(program, [tok.encode("so \\boxed{7}") + [tok.im_end]])
    assert len(turns) == 1 and turns[0].feed == prompt
    assert turns[0].budget == 200 - len(prompt) and tok.im_start not in turns[0].stops
    assert out["generation"] == "so \\boxed{7}" and not out["answer_truncated"]
    assert out["thinking_tokens"] == 0 and grade_sample("math500", out["generation"], "7")[1]
    with pytest.raises(ValueError, match="protocol"):
        GenConfig(protocol="think")


def test_recovery_table_hand_computed():

    def res(acc, per):
        return {"results": {"math500": {"accuracy": acc, "per_problem": per}}}
    ids = [str(i) for i in range(10)]
    base = res(0.2, {i: float(int(i) < 2) for i in ids})
    full = res(0.7, {i: float(int(i) < 7) for i in ids})
    lora = res(0.5, {i: float(int(i) < 5) for i in ids})
    t = recovery_table(base, full, lora)["math500"]
    assert t["recovery"] == pytest.approx((0.5 - 0.2) / (0.7 - 0.2)) == pytest.approx(0.6)
    assert t["gain"] == pytest.approx(0.5) and t["problems"] == 10
    lo, hi = t["recovery_ci95"]
    assert lo <= 0.6 <= hi


def test_compare_reports_protocols_and_warns_on_s1_base(tmp_path, capsys):

    def run(name, protocol, per, unparseable=0):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps(dict(protocol=protocol, results={
            "math500": dict(accuracy=sum(per) / len(per), samples=len(per),
                            unparseable=unparseable,
                            per_problem={str(i): x for i, x in enumerate(per)})})))
        return str(d)
    full, lora = run("full", "s1", [1.0, 1.0, 1.0, 0.0]), run("lora", "s1", [1.0, 1.0, 0.0, 0.0])
    for protocol, warned in (("plain", False), ("s1", True)):
        base = run(f"base_{protocol}", protocol, [1.0, 0.0, 0.0, 0.0], unparseable=3)
        t = main(["compare", base, full, lora, "--out", str(tmp_path / f"{protocol}.json")])
        text = capsys.readouterr().out
        assert f"protocols: base {protocol}, full s1, lora s1" in text
        assert ("warning: the base was not run with --protocol plain" in text) == warned
        assert t["math500"]["recovery"] == pytest.approx(0.5)
        saved = json.load(open(tmp_path / f"{protocol}.json"))
        assert saved["protocols"]["base"] == protocol
        # the share of answers the grader found none in, per model
        assert saved["table"]["math500"]["unparseable"] == dict(base=0.75, full=0.0, lora=0.0)
        assert "math500: no answer found in base 75.0%, full 0.0%, lora 0.0%" in text


def test_ablation_kl(env, tmp_path):
    gen = "<|im_start|>think\nfour\n<|im_start|>answer\n4"
    (tmp_path / "s.jsonl").write_text(json.dumps({"benchmark": "math500", "id": "x",
                                                  "question": "What is 2+2?", "generation": gen})
                                      + "\n")
    out = ablate_main(["--model", str(env / "model"), "--adapter", str(env / "adapter"),
                "--samples", str(tmp_path / "s.jsonl"),
                "--out", str(tmp_path / "abl"), "--block", "2"])
    r = out["results"]
    assert (r["none"][0]["kl_full_abl_assistant_mean"] == 0.0
            and r["none"][0]["kl_abl_full_all_mean"] == 0.0)
    for row in r["single"]:
        layer = int(row["label"][1:].split(".")[0])
        if layer == 1:  # zeroed adapters: ablating them changes nothing
            assert row["kl_full_abl_all_mean"] == 0.0
        else:
            assert row["kl_full_abl_assistant_mean"] > 0 and row["kl_abl_full_assistant_mean"] > 0
    layers = {row["label"]: row for row in r["layer"]}
    assert (layers["L1"]["kl_full_abl_all_mean"] == 0.0 and layers["L1"]["kl_abl_full_all_mean"]
            == 0.0)
    assert layers["L0"]["kl_full_abl_all_mean"] > 0
    assert [row["label"] for row in r["block"]] == ["L0-1", "L2-2"]
    assert {row["label"] for row in r["mlp_vs_attn"]} == {"mlp", "attn"}
    html = open(tmp_path / "abl" / "ablations.html").read()
    assert html.count("<svg") == 2 and "<script" not in html
    assert (json.load(open(tmp_path / "abl" / "ablations.json"))["results"]["single"][0]["label"]
            == "L0.gate_proj")


# --- bad input ----------------------------------------------------------------------------------


def test_error_unknown_benchmark(env, tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        load_benchmark("mmlu", str(env / "math.jsonl"))
    with pytest.raises(SystemExit, match="unknown benchmark 'mmlu'"):
        main(["run", "--model", str(env / "model"), "--out", str(tmp_path), "--bench",
              f"mmlu={env / 'math.jsonl'}"])


def test_error_missing_fields(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"problem": "1+1",
                             "answer": "2"}) + "\n" + json.dumps({"problem": "2+2"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl line 2: missing field 'answer'"):
        load_benchmark("math500", str(f))
    f.write_text(json.dumps({"answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl line 1: missing field 'problem'"):
        load_benchmark("aime24", str(f))
    c = tmp_path / "g.csv"
    c.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2\nq,a,b,c\n")
    with pytest.raises(ValueError, match=r"g.csv line 2: missing field 'Incorrect Answer 3'"):
        load_benchmark("gpqa", str(c))


def test_gpqa_option_order_belongs_to_the_benchmark_not_the_run(env, tmp_path):
    """s1's option order (seed 0) whatever a run's --seed; run.json says where the order comes
    from; ablate rebuilds the same prompt text the run generated from."""
    c = tmp_path / "g.csv"
    c.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer "
                 "3\n" + "".join(f"Q{i},right{i},w1,w2,w3\n" for i in range(8)))
    items = load_benchmark("gpqa", str(c))
    for it in items:
        line = next(l for l in it["question"].splitlines() if l.startswith(it["gold"] + ")"))
        assert "right" in line
    golds = {}
    for seed in (0, 5):
        out = tmp_path / f"run{seed}"
        main(["run", "--model", str(env / "model"), "--out", str(out), "--bench", f"gpqa={c}",
              "--limit", "4", "--thinking-budget", "4", "--max-answer-tokens", "2",
              "--seed", str(seed)])
        golds[seed] = [json.loads(l)["gold"] for l in open(out / "samples.jsonl")]
        assert "random.Random(0)" in json.load(open(out / "run.json"))["benchmarks"][0][
            "option_order"]
    assert golds[0] == golds[5] == list("DCDC")
    tok = Tokenizer(str(env / "model"))
    args = argparse.Namespace(samples=str(tmp_path / "run5" / "samples.jsonl"),
                              bench=[f"gpqa={c}"], zip_password=None, max_sequences=4,
                              max_tokens=4096, s1=None, seed=5, sample_bench="math500")
    gens = [json.loads(l)["generation"] for l in open(tmp_path / "run5" / "samples.jsonl")]
    for (_, ids, mask), it, g in zip(ablation_sequences(args, tok), items, gens):
        assert tok.decode(ids) == render_chat([{"role": "user", "content": it["question"]}],
                                              add_generation_prompt=True) + g


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "gpqa-diamond",
                                                    "gpqa_diamond_mcq.zip")),
                    reason="../shared/data is not beside the checkout")
def test_gpqa_zip_counts_and_wrong_password():
    z = os.path.join(SHARED_DATA, "gpqa-diamond", "gpqa_diamond_mcq.zip")
    pw = open(os.path.join(SHARED_DATA, "README.md")).read().split('pwd=b"')[1].split('"')[0]
    items = load_benchmark("gpqa", z, password=pw)
    assert len(items) == 198 and {it["gold"]
                                  for it in items} <= set("ABCD")  # counts and formats only
    with pytest.raises(ValueError, match="wrong or missing --zip-password"):
        load_benchmark("gpqa", z, password="not-it")


def test_error_adapter_for_another_base(env, tmp_path):
    other = tmp_path / "other"
    save_hf(hf_tiny(vocab_size=300, hidden_size=64, num_attention_heads=4), other)
    tiny_tokenizer(other)
    with pytest.raises(SystemExit, match=r"has shape \(1, 48\), expected \(1, 64\).*another size"):
        main(["run", "--model", str(other), "--adapter", str(env / "adapter"), "--out",
              str(tmp_path / "o"),
              "--bench", f"math500={env / 'math.jsonl'}"])


def test_ablation_kl_is_full_to_ablated_averaged_over_assistant_predictions(env):
    """KL(full || ablated) = sum_v p_full (log p_full - log p_ablated), averaged over the positions
    that predict an assistant token (position t when token t + 1 is the assistant's); the reverse
    direction and the all-position mean are reported under their own names. Hand-computed here."""
    model, _ = load_model(str(env / "model"), str(env / "adapter"))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = [0] * 5 + [1] * 7
    with torch.no_grad():
        full = torch.log_softmax(model(ids).float(), -1)[0]
        with ablate(model):
            abl = torch.log_softmax(model(ids).float(), -1)[0]
    fa = (full.exp() * (full - abl)).sum(-1)  # per position
    af = (abl.exp() * (abl - full)).sum(-1)
    pos = torch.tensor(mask[1:] + [0], dtype=torch.bool)
    got = kl_stats(model, ids, mask, full, {})
    ce = torch.nn.functional.cross_entropy(abl[:-1], ids[0, 1:], reduction="none")[pos[:-1]]
    assert got["ce_assistant"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert got["ce_assistant_maxpos"] == pytest.approx(ce.max().item(), rel=1e-5)
    assert got["kl_full_abl_assistant"] == pytest.approx(fa[pos].mean().item(), rel=1e-5)
    assert got["kl_abl_full_assistant"] == pytest.approx(af[pos].mean().item(), rel=1e-5)
    assert got["kl_full_abl_all"] == pytest.approx(fa.mean().item(), rel=1e-5)
    assert got["kl_full_abl_assistant_maxpos"] == pytest.approx(fa[pos].max().item(), rel=1e-5)
    worst = int(fa.argmax())  # a mask without the worst position: the two maxima must differ
    mask2 = [1] * 12
    if worst < 11:
        mask2[worst + 1] = 0
    got2 = kl_stats(model, ids, mask2, full, {})
    assert got2["kl_full_abl_all_maxpos"] == pytest.approx(fa.max().item(), rel=1e-5)  # official
    assert got2["kl_full_abl_assistant_maxpos"] < 0.999 * got2["kl_full_abl_all_maxpos"]
    # the three differ, so swapping the direction or the positions cannot go unnoticed
    assert abs(fa[pos].mean() - af[pos].mean()) > 1e-3 * fa[pos].mean()
    assert abs(fa[pos].mean() - fa.mean()) > 1e-3 * fa[pos].mean()


def test_greedy_ablation_matches_a_brute_force_search_over_four_adapters():
    """The official iterative MLP ablation on 4 adapters (gate and down of two layers), against a
    brute force over all 16 subsets ablated by hand: at every step the adapter whose removal on
    top of those already off raises the metric least (re-scored each step), and each cumulative
    KL is that set's; the fixed variant applies the single scores' order."""

    torch.manual_seed(0)
    m = Qwen2(Qwen2Config(**TINY))
    m.init_weights()
    apply_lora(m, targets=("gate_proj", "down_proj", "q_proj"), layers=[0, 2], verbose=False)
    with torch.no_grad():
        for i, a in enumerate(adapters(m)):  # very different sizes, so the order is clear
            a.lora_B.normal_(0, 0.05 * (1 + 3 * (i % 4)))
    seqs = [("a", list(range(3, 19)), [0] * 6 + [1] * 10), ("b", list(range(40, 52)),
                                                            [0] * 4 + [1] * 8)]
    mlp = [(0, "gate_proj"), (0, "down_proj"), (2, "gate_proj"), (2, "down_proj")]
    metric = "kl_full_abl_assistant_maxpos"
    brute = {}
    with torch.no_grad():
        for n in range(1, 5):
            for sub in itertools.combinations(mlp, n):
                vals = []
                for _, ids, mask in seqs:
                    x = torch.tensor([ids])
                    full = torch.log_softmax(m(x).float(), -1)[0]
                    with ablate(m, sites=list(sub)):
                        abl = torch.log_softmax(m(x).float(), -1)[0]
                    kl = (full.exp() * (full - abl)).sum(-1)[torch.tensor(mask[1:] + [0]) == 1]
                    vals.append((kl.max().item(), kl.mean().item()))
                brute[frozenset(sub)] = [sum(v[j] for v in vals) / len(vals) for j in (0, 1)]
    rescored_differs = False
    for key, j in ((metric, 0), ("kl_full_abl_assistant", 1)):
        fixed = sorted(mlp, key=lambda s: brute[frozenset([s])][j])
        greedy, off = [], frozenset()
        for _ in mlp:
            best = min((s for s in mlp if s not in off), key=lambda s: (brute[off | {s}][j],
                                                                        mlp.index(s)))
            greedy.append(best)
            off = off | {best}
        assert fixed != mlp  # the test would pass for a method that keeps the site order
        rescored_differs |= greedy != fixed
        for how, order in (("rescore", greedy), ("fixed", fixed)):
            scores, steps = greedy_ablation(m, seqs, key, order=how)
            assert [r["added"] for r in steps] == [f"L{l}.{t}" for l, t in order], how
            for n, r in enumerate(steps):
                want = brute[frozenset(order[:n + 1])]
                assert r["n_ablated"] == n + 1
                assert r[f"{metric}_mean"] == pytest.approx(want[0], rel=1e-5)
                assert r["kl_full_abl_assistant_mean"] == pytest.approx(want[1], rel=1e-5)
    assert rescored_differs  # else a fixed order would pass as the re-scored one


def test_adapter_of_another_base_of_the_same_shape_is_refused(env, tmp_path):
    """An adapter records its base (rank1.json): a base of the same shape but other weights is an
    error naming both, unless --other-base; the same base at another path is fine."""
    other = tmp_path / "other"
    save_hf(hf_tiny(vocab_size=300, seed=1), other)  # the same shape
    tiny_tokenizer(other)
    moved = tmp_path / "moved"
    shutil.copytree(env / "model", moved)
    ad = tmp_path / "adapter"
    shutil.copytree(env / "adapter", ad)
    (ad / "rank1.json").write_text(json.dumps(dict(made_from=dict(
        model=model_identity(str(env / "model"))))))
    args = lambda base, *extra: ["run", "--model", str(base), "--adapter", str(ad), "--out",
                                 str(tmp_path / f"o-{base.name}{len(extra)}"), "--bench",
                                 f"math500={env / 'math.jsonl'}", "--limit", "1",
                                 "--thinking-budget", "2", "--max-answer-tokens", "2", *extra]
    other_cfg = json.loads((other / "config.json").read_text())
    other_cfg["rope_theta"] = 1234.0  # another config (other weights: test_nothing_lost_3.py)
    (other / "config.json").write_text(json.dumps(other_cfg))
    with pytest.raises(SystemExit, match="was trained on .*model, whose config or weights "
                                         r"differ from .*other's \(config_sha256\); pass "
                                         "--other-base"):
        main(args(other))
    main(args(other, "--other-base"))
    main(args(moved))  # the same base, moved


# --- the batch: chosen from memory, and no part of a greedy run's identity -----------------------


def test_auto_batch_against_a_hand_computation():
    """Qwen2.5-32B in bf16 at a 32,768-token context: a slot's KV cache row is 2 (k, v) x 64
    layers x 8 heads x 128 x 32,768 x 2 bytes = 8.59 GB, plus its tokens (8 x 32,769) and four
    fp32 copies of a step's logits (16 x 152,064); the one 2,048-token prefill (a slot at a time)
    takes 2,048 x (4 x 5,120 + 3 x 27,648) x 2 + 2,048 x 32,768 + 152,064 x 8 = 0.49 GB."""
    from model import QWEN2_5_32B as CFG
    from protocols import RESERVE, auto_batch, slot_bytes
    QWEN2_5_32B = Qwen2Config(**CFG)
    slot = lambda ctx: 2 * 64 * 8 * 128 * ctx * 2 + 8 * (ctx + 1) + 16 * 152064
    prefill = lambda ctx: 2048 * (4 * 5120 + 3 * 27648) * 2 + 2048 * ctx + 152064 * 8
    assert slot_bytes(QWEN2_5_32B, torch.bfloat16, 32768) == slot(32768)
    assert slot(32768) / 1e9 == pytest.approx(8.593, abs=1e-3)
    assert prefill(32768) / 1e9 == pytest.approx(0.492, abs=1e-3)
    weights = 32_763_876_352 * 2
    h100, h200 = 80 * 2**30 - 500 * 2**20, 141 * 10**9 - 500 * 2**20  # less the CUDA context
    for card, ctx, want in ((h100, 32768, 2), (h200, 32768, 8), (h200, 8192, 33)):
        assert (card - weights - RESERVE - prefill(ctx)) // slot(ctx) == want
        assert auto_batch(QWEN2_5_32B, torch.bfloat16, ctx, card - weights, 728)[0] == want
    assert auto_batch(QWEN2_5_32B, torch.bfloat16, 8192, 10**12, 728)[0] == 64  # the cap
    assert auto_batch(QWEN2_5_32B, torch.bfloat16, 8192, 10**12, 5)[0] == 5  # the questions
    with pytest.raises(ValueError, match="--max-context 32768: one question needs 9.08 GB"):
        auto_batch(QWEN2_5_32B, torch.bfloat16, 32768, 8 * 10**9, 728)


def stop_after(n):
    """protocols.stream that is interrupted (Ctrl-C) after n answers."""
    def interrupted(*a, **k):
        for j, answer in enumerate(stream(*a, **k)):
            if j == n:
                raise KeyboardInterrupt
            yield answer
    return interrupted


def test_answers_do_not_depend_on_the_slots_and_a_rerun_may_change_them(env, tmp_path,
                                                                         monkeypatch):
    """Greedy answers, and sampled ones (seeded per sample), are the same at every number of
    slots, so run.json leaves it out, the default picks it from memory, and a run interrupted at
    1 slot is finished at 3 with an uninterrupted run's samples."""
    import eval as ev
    args = lambda out, *extra: ["run", "--model", str(env / "model"), "--out", str(out),
                                "--adapter", str(env / "adapter"), "--bench",
                                f"math500={env / 'math.jsonl'}", "--max-context", "4096",
                                "--thinking-budget", "20", "--max-answer-tokens", "8", *extra]
    main(args(tmp_path / "auto"))  # --batch-size 0: what fits (all 5 questions at once here)
    want = open(tmp_path / "auto" / "samples.jsonl").read()
    assert "batch_size" not in json.load(open(tmp_path / "auto" / "run.json"))
    monkeypatch.setattr(ev, "stream", stop_after(2))
    with pytest.raises(SystemExit) as e:
        main(args(tmp_path / "b", "--batch-size", "1"))
    assert e.value.code == 130
    part = tmp_path / "b" / "samples.rank-00000.jsonl"
    assert len(part.read_text().splitlines()) == 2
    with open(part, "a") as f:
        f.write('{"benchmark": "math500", "id": "p')  # a kill -9 mid-write
    calls = []
    monkeypatch.setattr(ev, "stream", lambda *a, **k: (calls.append(a[2]), stream(*a, **k))[1])
    main(args(tmp_path / "b", "--batch-size", "3"))
    assert [len(q) for q in calls] == [3]  # only the 3 questions left
    assert open(tmp_path / "b" / "samples.jsonl").read() == want
    main(args(tmp_path / "c", "--batch-size", "2"))
    assert open(tmp_path / "c" / "samples.jsonl").read() == want
    # a run.json of an earlier version, which recorded the batch, continues all the same
    run_json = tmp_path / "c" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "batch_size": 8}))
    main(args(tmp_path / "c", "--batch-size", "1"))
    assert open(tmp_path / "c" / "samples.jsonl").read() == want
    sampled = ("--temperature", "1.0", "--samples-per-problem", "2", "--seed", "3")
    main(args(tmp_path / "s1", *sampled, "--batch-size", "1"))
    main(args(tmp_path / "s3", *sampled, "--batch-size", "3"))
    s1_, s3_ = ((tmp_path / d / "samples.jsonl").read_text() for d in ("s1", "s3"))
    assert s1_ == s3_ != want.replace('"sample": 0', '"sample": 1')
    gens = [json.loads(l)["generation"] for l in s1_.splitlines()]
    assert len(set(gens)) > 5  # the two samples of a problem differ, and from problem to problem


def test_ablate_interrupted_resumes_to_the_same_ablations(env, tmp_path, monkeypatch):
    """ablate.py writes each experiment (and each greedy step) when it finishes: a run stopped
    inside an experiment, its parts file cut mid-line, and run again ends with the ablations.json
    of an uninterrupted run; the parts file is gone then."""
    import ablate as ab
    gen = "<|im_start|>think\nfour\n<|im_start|>answer\n4"
    rows = [{"benchmark": b, "id": str(i), "question": f"What is {i}+{i}?",
             "generation": gen * (1 + i % 2)} for i, b in enumerate(["aime24", "math500"] * 3)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = lambda out: ["--model", str(env / "model"), "--adapter", str(env / "adapter"),
                        "--samples", str(tmp_path / "s.jsonl"), "--out", str(out),
                        "--experiments", "layer,single,greedy", "--max-sequences", "2"]
    want = ablate_main(args(tmp_path / "a"))
    assert want["sequences"] == [f"{tmp_path / 's.jsonl'} line {n}" for n in (2, 4)]  # math500
    assert len(want["results"]["greedy"]) == 9  # 3 layers x gate, up, down
    calls, real = [], ab.kl_stats

    def stop_at(n):
        def kl(*a):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*a)
        return kl
    parts = tmp_path / "b" / "ablations.parts.jsonl"
    for n in (30, 75):  # inside "single", then inside the greedy ablation's steps
        calls.clear()
        monkeypatch.setattr(ab, "kl_stats", stop_at(n))
        with pytest.raises(SystemExit):
            ablate_main(args(tmp_path / "b"))
        with open(parts, "a") as f:
            f.write('{"experiment": "sin')  # a kill -9 mid-write
    kept = [json.loads(l) for l in parts.read_text().splitlines()[:-1]]
    assert [r.get("experiment") for r in kept[1:3]] == ["none", "layer"]
    assert any("greedy_step" in r for r in kept)
    calls.clear()
    monkeypatch.setattr(ab, "kl_stats", stop_at(0))  # counts, never stops
    got = ablate_main(args(tmp_path / "b"))
    assert len(calls) == 2 * (6 + 5 + 4 + 3 + 2 + 1)  # greedy steps 4..9: 6, 5, ... 1 sets left
    assert json.load(open(tmp_path / "b" / "ablations.json")) == json.load(
        open(tmp_path / "a" / "ablations.json"))
    assert got["results"] == want["results"] and not parts.exists()


@pytest.mark.slow
def test_ablate_on_two_processes_equals_one(env, tmp_path):
    """torchrun splits the sequences over the ranks (one model copy each) and gathers their
    statistics: the same ablations.json, greedy ablation included, as one process."""
    gen = "<|im_start|>think\nfour\n<|im_start|>answer\n4"
    rows = [{"benchmark": "math500", "id": str(i), "question": f"What is {i}+{i}?",
             "generation": gen * (1 + i % 3)} for i in range(3)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = lambda out: ["--model", env / "model", "--adapter", env / "adapter", "--samples",
                        tmp_path / "s.jsonl", "--experiments", "layer,type,greedy", "--out", out]
    run_script("ablate.py", args(tmp_path / "one"))
    r = run_script("ablate.py", args(tmp_path / "two"), nproc=2)
    assert "on 2 process(es)" in r.stderr + r.stdout
    one, two = (json.load(open(tmp_path / d / "ablations.json")) for d in ("one", "two"))
    assert one["results"] == two["results"] and len(one["sequences"]) == 3


def test_engine_vllm_without_vllm_is_one_line(env, tmp_path):
    """--engine vllm where vLLM is not importable: one line naming the fix, nothing generated;
    with torchrun or --merge, one line saying how vLLM runs instead."""
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here: tests/test_vllm.py runs it")
    except ImportError:
        pass
    argv = ["run", "--model", str(env / "model"), "--out", str(tmp_path / "v"), "--bench",
            f"math500={env / 'math.jsonl'}", "--max-context", "4096", "--engine", "vllm"]
    with pytest.raises(SystemExit, match="--engine vllm: vLLM is not importable here"):
        main(argv)
    with pytest.raises(SystemExit, match="no torchrun, no --merge"):
        main(argv + ["--adapter", str(env / "adapter"), "--merge"])
    assert not (tmp_path / "v").exists()  # refused before anything was written
