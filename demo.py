"""
The whole paper in miniature, on a CPU: `python demo.py` (about 13 minutes on 2 cores).

A synthetic world stands in for Qwen2.5-32B-Instruct and s1K-1.1. Problems are repeated steps,

    Start at 91 and subtract 7, 6 times. What do you get?

easy when worked one line at a time ("91 - 7 = 84 (5 left)", ...) and out of reach of a small model
that must answer at once. Stages, each cached in --out/<stage> (a second run reuses what is
finished; a changed setting or generator reruns that stage and the ones after it):

 data       a byte-level BPE tokenizer trained with the `tokenizers` library (Qwen's special tokens,
            one token per digit); a pretraining corpus of "textbook" pages that work problems line
            by line, arithmetic drills, and chat turns (Qwen's ChatML, default system prompt) where
            the assistant answers at once, without working: the ability is there, chat never uses
            it; a mini s1K-1.1 (1,000 rows in s1K-1.1's schema whose deepseek_thinking_trajectory
            works the problem in the textbook's own words, 2-8 steps); and 500 held-out problems of
            the hardest level (7-8 steps, every number on the way of two digits) in MATH500's jsonl
            layout, drawn first and kept out of every training set.
 base       a random Qwen2 checkpoint (DEMO_MODEL), pretrained by `train.py` (PRESETS["pretrain"]:
            --mode full on the packed corpus): the "instruct" base.
 rank1      `train.py` (PRESETS["rank1"]): rank-1 LoRA on all 7 projections, the paper's recipe
            at the model's scale (learning rate, and 10 epochs instead of 5: docs/demo.md).
 full       `train.py` (PRESETS["full"]): the full-finetune baseline, as many epochs.
 eval       `eval.py run` (greedy) of full and rank-1 (s1 protocol) and of the base: plain (as s1
            ran its base), s1, and given a textbook page's opening (`--protocol completion`):
            the capability ceiling the finetunes can elicit, measured; `eval.py compare`.
 interpret  `collect.py` on the mini-s1K traces, `sae.py train`, `ablate.py`,
            `interpret.py mine`, `dashboard.py`, `report.py` and `rollout.py` (the first trace).

The summary (printed, and saved as summary.txt / summary.json with the package versions and CPU
numerics it ran with) holds the recovery table, ablation highlights, and the adapter scalar and
SAE latent that best separate carry/borrow steps from the rest. `--seeds 0,1,2` trains and
evaluates a base and both finetunes per seed (cached per seed) and reports each headline number
as its mean and range.
Every stage runs the same scripts and code paths a 32B run uses; only this data generator, the model
size and the step counts are small. `--fast` is the CI variant (fewer steps and problems).
"""
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import torch

from batchtopk import SAE
from checkpoint import save_hf_checkpoint
from common import Parser, config_flags, numbers, write_atomic
from data import Tokenizer, render_chat, s1_assistant, train_tokenizer
from lora import site_label
from model import Qwen2, Qwen2Config
from store import ActivationStore

HERE = os.path.dirname(os.path.abspath(__file__))

# the model: Qwen2 architecture (GQA, q/k/v biases, tied embeddings as in the small Qwen2.5 models)
DEMO_MODEL = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128,
                  intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  torch_dtype="float32")

# train.py settings of the three training stages: the paper's recipe shape (warm-up + cosine, AdamW
# 0.9/0.95, clip 1.0, rank-1 LoRA with alpha 16 on all 7 projections) with small-model learning
# rates, fp32, micro-batches of 8-16 sequences and no activation checkpointing. Pretraining is a
# full finetune of a random checkpoint on a packed {"text"} corpus.
_TRAIN = dict(dtype="float32", activation_checkpointing=False, warmup_ratio=0.05, beta1=0.9,
              beta2=0.95, eps=1e-8, grad_clip=1.0, block_size=512)
PRESETS = {
    "pretrain": dict(_TRAIN, mode="full", lr=3e-3, weight_decay=0.1, epochs=1, global_batch=8,
                     micro_batch=8, block_size=256),
    "rank1": dict(_TRAIN, mode="lora", rank=1, alpha=16.0, rslora=True,
                  targets="gate_proj,up_proj,down_proj,q_proj,k_proj,v_proj,o_proj", lr=5e-3,
                  weight_decay=1e-4, global_batch=16, micro_batch=16),
    "full": dict(_TRAIN, mode="full", lr=1e-3, weight_decay=1e-4, global_batch=16,
                 micro_batch=16),
}  # the finetunes' epochs are the profile's ft_epochs (below)


# -----------------------------------------------------------------------------
# the synthetic world


def problem(rng, steps):
    """One problem: (question, worked lines, answer). Add or subtract a digit 2-9 `steps` times,
    staying in 0..99."""
    d, op = rng.randint(2, 9), rng.choice("+-")
    v = rng.randint(steps * d, 99) if op == "-" else rng.randint(0, 99 - steps * d)
    verb = "add" if op == "+" else "subtract"
    q = f"Start at {v} and {verb} {d}, {steps} times. What do you get?"
    lines = []
    for k in range(steps):
        w = v + d if op == "+" else v - d
        lines.append(f"{v} {op} {d} = {w} ({steps - k - 1} left)")
        v = w
    return q, lines, v


def drill(rng, n=16):
    """A page of exercises: the one-step facts the problems are made of."""
    out = []
    for _ in range(n):
        v, d, op = rng.randint(0, 99), rng.randint(1, 9), rng.choice("+-")
        if op == "+" and v + d > 99 or op == "-" and v - d < 0:
            op = "-" if op == "+" else "+"
        out.append(f"{v} {op} {d} = {v + d if op == '+' else v - d}")
    return "Exercises:\n" + "\n".join(out) + "\n"


# a textbook page opens like this; given the same opening, the base model shows what it can do
PAGE = "Problem: {question}\nSolution:\n"


def textbook(question, lines, answer):
    return PAGE.replace("{question}", question) + "\n".join(lines) + f"\nAnswer: {answer}\n"


def chat_turn(question, answer):
    return render_chat([{"role": "user", "content": question},
                        {"role": "assistant", "content": f"Answer: {answer}"}])


def s1_row(question, lines, answer, idx):
    """A row in s1K-1.1's schema; the trace works the problem line by line."""
    trace = "\n".join(lines)  # the textbook's lines: finetuning elicits the skill, adds no text
    attempt = f"Answer: {answer}"
    return dict(solution=str(answer), question=question, cot_type="math",
                source_type="rank1/demo-steps",
                metadata=json.dumps({"id": idx, "steps": len(lines)}),
                gemini_thinking_trajectory=trace, gemini_attempt=attempt,
                deepseek_thinking_trajectory=trace,
                deepseek_attempt=attempt, gemini_grade="Yes", gemini_grade_reason="",
                deepseek_grade="Yes", deepseek_grade_reason="")


# -----------------------------------------------------------------------------
# settings: the default run and the CI variant

# ft_epochs: both finetunes train this many epochs; 10 at the default scale, where the paper's 5
# left the rank-1 adapter short of one token per row on some bases (docs/demo.md, "The stall")
PROFILES = {
    "default": dict(world_seed=0, corpus_docs=40000, tokenizer_docs=5000, vocab=512, s1k_rows=1000,
                    s1k_steps=[2, 8], heldout=500, heldout_steps=[7, 8], ft_epochs=10,
                    eval_batch=125, sae_steps=5000, ablate_sequences=32),
    "fast": dict(world_seed=0, corpus_docs=3000, tokenizer_docs=1000, vocab=512, s1k_rows=160,
                 s1k_steps=[2, 8],
                 heldout=64, heldout_steps=[7, 8], ft_epochs=2, eval_batch=64, sae_steps=300,
                 ablate_sequences=8),
}


def inspect_hash(*fns):
    """A digest of the data generator's source, so that editing it invalidates the cached stages."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in fns).encode()).hexdigest()[:16]


def run_script(script, args, log):
    """One of the project's scripts in a child process: its progress bar goes to the terminal, its
    log lines to `log`; a failure prints the log's tail and stops the demo."""
    cmd = [sys.executable, os.path.join(HERE, script)] + [str(a) for a in args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        quiet = os.environ.get("RANK1_DEMO_QUIET")
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT if quiet else None,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc:
        tail = open(log).read().splitlines()[-25:]
        raise SystemExit(f"demo: `{script} {' '.join(map(str, args))}` failed (exit {rc}); end of "
                         f"{log}:\n" + "\n".join(tail))


def claim(out):
    """The demo deletes and rewrites its stage directories, so it runs only in a directory that
    is new, empty, or one of its own (marked by demo.json)."""
    marker = os.path.join(out, "demo.json")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(marker):
        raise SystemExit(f"demo: {out} holds files the demo did not write; choose another --out")
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(marker):
        write_atomic(marker, json.dumps({"written_by": "rank1 demo.py"}))


def stage(out, name, key, fn):
    """Run fn(dir) unless out/name holds a finished run with the same key (settings + the keys of
    stages it reads); a stage is finished when its stage.json exists, written last."""
    d = os.path.join(out, name)
    marker = os.path.join(d, "stage.json")
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if os.path.isfile(marker):
        try:
            if json.load(open(marker))["key"] == h:
                print(f"[{name}] cached in {d}", flush=True)
                return h
        except (ValueError, KeyError):
            pass
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    print(f"[{name}] running -> {d}", flush=True)
    t0 = time.time()
    fn(d)
    write_atomic(marker, json.dumps(dict(key=h, settings=key, seconds=round(time.time() - t0, 1)),
                                    indent=1))
    print(f"[{name}] done in {time.time() - t0:.0f} s", flush=True)
    return h


# -----------------------------------------------------------------------------
# stages


def make_data(d, p):
    """Tokenizer, pretraining corpus, mini s1K and held-out problems (no held-out question occurs in
    the corpus or the mini s1K)."""
    rng = random.Random(p["world_seed"])
    heldout = {}  # drawn first; the corpus and the mini s1K never contain these questions
    while len(heldout) < p["heldout"]:
        q, lines, ans = problem(rng, rng.randint(*p["heldout_steps"]))
        if min(int(lines[0].split()[0]), ans) >= 10:  # the path (monotone) stays at two digits
            heldout.setdefault(q, dict(id=f"count-{len(heldout):04d}", problem=q,
                                       answer=str(ans), steps=len(lines)))

    def fresh(steps):
        while True:
            q, lines, ans = problem(rng, steps)
            if q not in heldout:
                return q, lines, ans
    corpus = []
    for _ in range(p["corpus_docs"]):
        u = rng.random()  # a quarter drills, 60% textbook pages, 15% chat turns
        if u < 0.25:
            corpus.append(drill(rng))
            continue
        q, lines, ans = fresh(rng.randint(2, 8))
        corpus.append(textbook(q, lines, ans) if u < 0.85 else chat_turn(q, ans))
    s1k = [s1_row(*fresh(rng.randint(*p["s1k_steps"])), i) for i in range(p["s1k_rows"])]
    sample = (corpus[:p["tokenizer_docs"]]
              + [r["question"] + "\n" + s1_assistant(r) for r in s1k[:200]])
    train_tokenizer(sample, os.path.join(d, "tokenizer"), p["vocab"],
                    DEMO_MODEL["max_position_embeddings"])
    for name, rows in (("pretrain", [dict(text=t) for t in corpus]), ("s1k", s1k),
                       ("heldout", heldout.values())):
        write_atomic(os.path.join(d, name + ".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def make_base(d, p, data, seed):
    """A random Qwen2 checkpoint, then train.py (full mode, PRESETS["pretrain"]) from it."""
    tok_dir = os.path.join(data, "tokenizer")
    vocab = -(-Tokenizer(tok_dir).vocab_size // 64) * 64
    cfg = Qwen2Config.from_dict({**DEMO_MODEL, "vocab_size": vocab})
    torch.manual_seed(seed)
    model = Qwen2(cfg)
    model.init_weights()
    init = d + "-init"  # beside the stage: train.py's --out may not hold its --model
    tok_files = [os.path.join(tok_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    save_hf_checkpoint(init, model.hf_tensors(), cfg.to_hf_dict(), copy_files=tok_files,
                       overwrite=True, command="demo.py")
    run_script("train.py", [*config_flags(PRESETS["pretrain"]), "--seed", seed, "--model", init,
                            "--data", os.path.join(data, "pretrain.jsonl"), "--out", d],
               os.path.join(d, "log.txt"))
    shutil.rmtree(init)


def make_finetune(d, p, data, base, preset, seed):
    settings = {**PRESETS[preset], "epochs": p["ft_epochs"]}
    run_script("train.py", [*config_flags(settings), "--seed", seed, "--model", base,
                            "--data", os.path.join(data, "s1k.jsonl"), "--out", d],
               os.path.join(d, "log.txt"))


# the protocols at the demo's scale: s1 (think, then answer) for the fine-tunes and, as s1 ran its
# base model, plain (one chat answer) for the base; the base is run under s1 too, and given a
# textbook page's opening (the capability ceiling: what finetuning can elicit, measured)
EVAL_ARGS = dict(s1=["--max-context", 512, "--thinking-budget", 256, "--max-answer-tokens", 24],
                 plain=["--protocol", "plain", "--max-context", 512, "--max-answer-tokens", 280],
                 textbook=["--protocol", "completion", "--template", PAGE, "--max-context", 512,
                           "--max-answer-tokens", 280])


def make_eval(d, p, data, models):
    """eval.py run for each model on the held-out problems, then eval.py compare: recovery over the
    base asked plainly (the paper's, via s1's table) and over the base under the s1 protocol."""
    bench = "math=" + os.path.join(data, "heldout.jsonl")
    log = os.path.join(d, "log.txt")
    for name, (model, adapter, protocol) in models.items():
        run_script("eval.py", ["run", "--model", model, "--out", os.path.join(d, name),
                               "--bench", bench, "--batch-size", p["eval_batch"],
                               *EVAL_ARGS[protocol]] + (["--adapter", adapter] if adapter else []),
                   log)
    for base, out in (("base_plain", "recovery.json"), ("base", "recovery_s1.json")):
        run_script("eval.py", ["compare", *(os.path.join(d, n) for n in (base, "full", "rank1")),
                               "--out", os.path.join(d, out)], log)


def make_interpret(d, p, data, base, adapter, evals):
    """Collect the adapter scalars of the mini-s1K traces; SAE, ablations, mining, dashboard, and
    the report (its LLM sections show the commands that need an LLM server)."""
    log = os.path.join(d, "log.txt")
    acts, sae, abl, interp = (os.path.join(d, n) for n in ("acts", "sae", "ablate", "interp"))
    run_script("collect.py", ["--model", base, "--adapter", adapter,
                              "--data", os.path.join(data, "s1k.jsonl"), "--out", acts,
                              "--docs-per-shard", 256], log)
    run_script("sae.py", ["train", "--acts", acts, "--out", sae, "--k", 4,
                          "--steps", p["sae_steps"], "--warmup", 50, "--batch-size", 1024,
                          "--lr", 2e-3], log)
    samples = os.path.join(evals, "rank1", "samples.jsonl")
    run_script("ablate.py", ["--model", base, "--adapter", adapter, "--samples", samples,
                             "--bench", "math=" + os.path.join(data, "heldout.jsonl"), "--block", 2,
                             "--max-sequences", p["ablate_sequences"], "--experiments",
                             "layer,block,single,type,mlp_vs_attn,greedy", "--out", abl], log)
    run_script("interpret.py", ["mine", "--acts", acts, "--sae", sae, "--tokenizer", base,
                                "--out", interp, "--k", 24, "--dedup", 2], log)
    run_script("dashboard.py", ["--features", os.path.join(interp, "features.json"), "--sae", sae,
                                "--ablations", os.path.join(abl, "ablations.json"),
                                "--model", base, "--adapter", adapter,
                                "--out", os.path.join(interp, "dashboard.html")], log)
    run_script("report.py", ["--recovery", os.path.join(evals, "recovery.json"),
                             "--ablations", os.path.join(abl, "ablations.json"), "--adapter",
                             adapter, "--acts", acts, "--sae", sae,
                             "--features", os.path.join(interp, "features.json"),
                             "--out", os.path.join(d, "report")], log)
    run_script("rollout.py", ["--model", base, "--adapter", adapter, "--acts", acts, "--sae", sae,
                              "--doc", 0, "--out", os.path.join(d, "rollout")], log)


# -----------------------------------------------------------------------------
# carries: a labelled feature, found automatically


STEP_LINE = r"(?m)^(\d+) [+-] \d = (\d+) \(\d+ left\)$"


def auroc(x, y):
    """Area under the ROC curve of scores x for labels y (ties count one half)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    _, first, counts = np.unique(xs, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(avg, counts)
    n1 = y.sum()
    n0 = len(y) - n1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def carry_rows(acts_dir, tok_dir):
    """Each worked line "84 - 7 = 77 (4 left)" of the collected traces, labelled by whether its
    result's tens digit differs from the input's (a carry or borrow): (the adapter scalars at the
    token just before the result, where the model must already know the carry; the labels)."""
    tok, store = Tokenizer(tok_dir), ActivationStore(acts_dir)
    rows, labels = [], []
    for i, shard in enumerate(store.index["shards"]):
        ids, acts = store.tokens(i), store.shard(i)
        for doc in shard["docs"]:
            s, n = doc["start"], doc["length"]
            pieces = [tok.id_to_token_str(int(t)) for t in ids[s:s + n]]
            ends = np.cumsum([len(x) for x in pieces])
            text = "".join(pieces)
            for m in re.finditer(STEP_LINE, text):
                # the token that ends where the result starts
                j = int(np.searchsorted(ends, m.start(2), side="left"))
                if j < n and ends[j] == m.start(2):
                    rows.append(np.asarray(acts[s + j], dtype=np.float32))
                    labels.append(int(m.group(1)) // 10 != int(m.group(2)) // 10)
    return np.stack(rows), np.asarray(labels)


def carry_features(acts_dir, sae_dir, tok_dir):
    """Which adapter scalar and which SAE latent separate carry/borrow steps from the rest best?
    AUROC over carry_rows, each scalar's sign chosen for the better direction."""
    x, y = carry_rows(acts_dir, tok_dir)
    site_names = [site_label(l, t) for l, t in ActivationStore(acts_dir).index["sites"]]
    aucs = [auroc(x[:, c], y) for c in range(x.shape[1])]
    best = int(np.nanargmax([abs(a - 0.5) for a in aucs]))
    out = dict(lines=len(y), carries=int(y.sum()),
               scalar=dict(name=site_names[best], column=best,
                           auroc=max(aucs[best], 1 - aucs[best]),
                           sign="+" if aucs[best] >= 0.5 else "-"))
    sae = SAE.load(sae_dir)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x)).numpy()
    aucs = [auroc(z[:, c], y) if z[:, c].any() else 0.5 for c in range(z.shape[1])]
    best = int(np.argmax(aucs))
    fires = z[:, best] > 0
    out["sae_latent"] = dict(latent=best, auroc=aucs[best], fires_on_carry=float(fires[y].mean()),
                             fires_on_other=float(fires[~y].mean()))
    return out


def token_labels(features_json, n=5, min_top=10):
    """The SAE latents whose top examples sit most consistently on one token:
    [(name, token, share, frequency)]."""
    out = []
    for f in json.load(open(features_json))["features"]:
        if not f["name"].startswith("sae") or len(f["top"]) < min_top:
            continue
        c = Counter(e["tokens"][e["target"]] for e in f["top"])
        tok, k = c.most_common(1)[0]
        out.append((f["name"], tok, k / len(f["top"]), f["freq"]))
    return sorted(out, key=lambda r: (-r[2], -r[3]))[:n]


# -----------------------------------------------------------------------------
# summary


# eval runs: (row label, protocol)
ROWS = dict(base_plain=("base", "plain"), base_textbook=("base", "textbook"), base=("base", "s1"),
            full=("full", "s1"), rank1=("rank1", "s1"))
PAPER_RECOVERY = (0.73, 0.90)


def seed_figures(run):
    """The headline numbers of one seed's eval stage."""
    load = lambda *a: json.load(open(os.path.join(run, "eval", *a)))
    res = {n: load(n, "results.json")["results"]["math"] for n in ROWS}
    rec, rec_s1 = (load(f)["table"]["math"] for f in ("recovery.json", "recovery_s1.json"))
    ceiling = res["base_textbook"]["accuracy"]
    return dict(problems=rec["problems"],
                accuracy={n: dict(accuracy=r["accuracy"], ci95=r["ci95"],
                                  mean_thinking_tokens=r["mean_thinking_tokens"],
                                  unparseable=r["unparseable"]) for n, r in res.items()},
                of_ceiling={n: res[n]["accuracy"] / ceiling if ceiling else None
                            for n in ("full", "rank1")},
                recovery=dict(recovery=rec["recovery"], ci95=rec["recovery_ci95"], base="plain",
                              over_s1_base=rec_s1["recovery"],
                              over_s1_base_ci95=rec_s1["recovery_ci95"]))


def spread(values):
    """mean, min and max of a list of numbers (None where one is missing)."""
    if any(v is None for v in values):
        return dict(mean=None, min=None, max=None)
    return dict(mean=sum(values) / len(values), min=min(values), max=max(values))


def summarize(out, p, runs, env):
    """summary.json (every figure) and summary.txt (the lines printed at the end)."""
    summary = summary_figures(out, p, runs, env)
    lines, summary["shows_paper_effect"] = headline_lines(p, summary)
    text = "\n".join(lines + interpretation_lines(summary))
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    write_atomic(os.path.join(out, "summary.txt"), text + "\n")
    print("\n" + text)
    return summary


def summary_figures(out, p, runs, env):
    """The figures of every stage: the first seed's in full, each seed's headline numbers, their
    spread, and what the interpretation stage found on the first seed."""
    load = lambda *a: json.load(open(os.path.join(out, *a)))
    per_seed = {s: seed_figures(r) for s, r in runs.items()}
    first = per_seed[next(iter(runs))]
    heads = {"ceiling": lambda f: f["accuracy"]["base_textbook"]["accuracy"],
             "full": lambda f: f["accuracy"]["full"]["accuracy"],
             "rank1": lambda f: f["accuracy"]["rank1"]["accuracy"],
             "recovery": lambda f: f["recovery"]["recovery"]}
    seeds = {k: spread([get(f) for f in per_seed.values()]) for k, get in heads.items()}
    abl = load("interpret", "ablate", "ablations.json")["results"]
    key = "kl_full_abl_assistant_mean"
    top_layer = max(abl["layer"], key=lambda r: r[key])
    rep = load("interpret", "report", "report.json")["ablation"]  # the paper's statistics
    by_type = lambda d: sorted(d.items(), key=lambda kv: -kv[1])
    run_dir = lambda *a: os.path.join(out, "interpret", *a)
    sae_m = load("interpret", "sae", "metrics.json")["heldout"]
    return dict(profile=p, environment=env, seeds=list(runs), heldout_problems=first["problems"],
                **{k: first[k] for k in ("accuracy", "of_ceiling", "recovery")},
                per_seed=per_seed, spread=seeds,
                trainable_params=dict(rank1=load("rank1", "result.json")["trainable_params"],
                                      full=load("full", "result.json")["trainable_params"]),
                ablation=dict(top_layer=top_layer["label"], top_layer_kl=top_layer[key],
                              by_type=by_type(rep["types"]),
                              mlp_over_attn=rep.get("mlp_over_attn"),
                              by_type_joint=by_type(rep["types_joint"]),
                              mlp_over_attn_joint=rep.get("mlp_over_attn_joint")),
                carry=carry_features(run_dir("acts"), run_dir("sae"),
                                     os.path.join(out, "base", "model")),
                token_labels=token_labels(run_dir("interp", "features.json")),
                sae={k: sae_m.get(k) for k in ("fvu", "l0", "dead_fraction", "convergence")},
                dashboard=os.path.abspath(run_dir("interp", "dashboard.html")),
                report=os.path.abspath(run_dir("report", "report.html")),
                rollout=os.path.abspath(run_dir("rollout", "rollout.html")),
                top_heads=load("interpret", "rollout", "rollout.json")["kl"]["heads"][:3])


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def headline_lines(p, summary):
    """The accuracy table, the recovery, its spread over seeds and whether the miniature shows
    the paper's effect: (lines, shown)."""
    seeds, runs = summary["spread"], summary["seeds"]
    steps, s1k_steps = p["heldout_steps"], p["s1k_steps"]
    lines = [f"rank1 demo: {summary['heldout_problems']} held-out problems of {steps[0]}-"
             f"{steps[1]} steps (the mini s1K has {s1k_steps[0]}-{s1k_steps[1]}), greedy, seed "
             f"{runs[0]}",
             f"  {'model':6s} {'protocol':8s} {'accuracy':>9s}  95% CI            of ceiling  "
             "thinking tokens"]
    for n, (label, protocol) in ROWS.items():
        r = summary["accuracy"][n]
        lo, hi = r["ci95"]
        of = summary["of_ceiling"]
        share = pct(of.get(n)) if n in of else ""
        lines.append(f"  {label:6s} {protocol:8s} {pct(r['accuracy']):>9s}  [{pct(lo)}, {pct(hi)}]"
                     f"  {share:>10s}  {r['mean_thinking_tokens']:.0f}")
    rec, n_params = summary["recovery"], summary["trainable_params"]
    lo, hi = rec["ci95"]
    lines.append("  (textbook: the base given a textbook page's opening, the ceiling finetuning "
                 "can elicit)")
    lines.append(f"  rank-1 LoRA recovers {pct(rec['recovery'])} of the full finetune's gain over "
                 f"the base asked plainly, as s1 evaluated its base (paired bootstrap 95% CI "
                 f"[{pct(lo)}, {pct(hi)}]; over the base under the s1 protocol: "
                 f"{pct(rec['over_s1_base'])}) with {n_params['rank1']:,} trainable parameters vs "
                 f"{n_params['full']:,}")
    fmt = lambda d: f"{pct(d['mean'])} [{pct(d['min'])}, {pct(d['max'])}]"
    if len(runs) > 1:
        lines.append(f"over seeds {','.join(map(str, runs))} (mean [min, max]): ceiling "
                     f"{fmt(seeds['ceiling'])}, full {fmt(seeds['full'])}, rank-1 "
                     f"{fmt(seeds['rank1'])}, recovery {fmt(seeds['recovery'])}")
    r = seeds["recovery"]
    lo_p, hi_p = PAPER_RECOVERY
    shown = r["min"] is not None and r["min"] >= lo_p
    where = f"over {len(runs)} seeds" if len(runs) > 1 else "on this seed"
    lines.append(("the miniature shows the paper's effect: " if shown else
                  "the miniature does NOT show the paper's effect: ")
                 + f"recovery {fmt(r) if len(runs) > 1 else pct(r['mean'])} {where}, against the "
                 f"paper's {pct(lo_p)}-{pct(hi_p)}")
    return lines, shown


def interpretation_lines(summary):
    """What the interpretation stage found: ablations, the carry feature, one-token latents, the
    SAE's fit, the attention heads, and where the pages are."""
    carry, labels, sae_m, ab = (summary[k] for k in ("carry", "token_labels", "sae", "ablation"))
    sc, lat = carry["scalar"], carry["sae_latent"]
    types = lambda rows: ", ".join(f"{l} {v:.3g}" for l, v in rows)
    return [f"ablations (KL(full || ablated) on assistant tokens): {ab['top_layer']} matters "
            f"most ({ab['top_layer_kl']:.3g}); by type, the mean of its single-adapter ablations "
            f"(the paper's): {types(ab['by_type'])}; MLP / attention {ab['mlp_over_attn']:.3g}",
            f"  one type off in every layer at once (joint): {types(ab['by_type_joint'])}; "
            f"MLP / attention {ab['mlp_over_attn_joint']:.3g}",
            f"carries: of {carry['lines']} worked lines ({carry['carries']} with a carry or "
            f"borrow), the adapter scalar {sc['name']} ({sc['sign']}) separates them with AUROC "
            f"{sc['auroc']:.3f}; SAE latent {lat['latent']} with AUROC {lat['auroc']:.3f} (fires "
            f"on {pct(lat['fires_on_carry'])} of carries, {pct(lat['fires_on_other'])} of the "
            "rest)",
            "SAE latents that sit on one token: "
            + ", ".join(f"{n} {t!r} ({100 * sh:.0f}% of top examples, fires on "
                        f"{100 * fr:.1f}% of tokens)" for n, t, sh, fr in labels),
            f"SAE: held-out FVU {sae_m['fvu']:.3f}, L0 {sae_m['l0']:.2f}, dead "
            f"{pct(sae_m['dead_fraction'])}; FVU fell {sae_m['convergence']['fall']:.4f} in the "
            "last tenth before the lr decay ("
            + ("a plateau" if sae_m["convergence"]["plateau"] else "still falling") + ")",
            "attention the adapter changes most on the first trace (mean KL(base || adapted)): "
            + ", ".join(f"L{l}.H{h} {m:.3g}" for l, h, m in summary["top_heads"]),
            f"dashboard: {summary['dashboard']}", f"report: {summary['report']}",
            f"rollout: {summary['rollout']}"]


def pin_cpu_numerics():
    """Training here is chaotic: a change in the last bit of a sum early in pretraining ends in
    another model. The CPU kernels torch and MKL pick depend on the processor (AVX2 or AVX-512) and
    on the thread count, so the scripts the demo starts use one kernel path (AVX2, which x86 CPUs
    of the last decade have) and two threads everywhere, unless the user set these already."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        os.environ.setdefault("MKL_CBWR", "AVX2")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    return {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")}


def environment(pins):
    """What the figures came from: package versions, the processor and the numerics pins."""
    pkgs = {}
    for name in ("torch", "numpy", "tokenizers", "safetensors", "tqdm"):
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkgs[name] = None
    return dict(python=platform.python_version(), packages=pkgs, machine=platform.machine(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), pins=pins)


def train_and_eval(out, p, seed, data, k_data):
    """The base, both finetunes and their evaluation for one seed (stages cached in out/)."""
    k_base = stage(out, "base", dict(data=k_data, p=p, seed=seed, preset=PRESETS["pretrain"]),
                   lambda d: make_base(d, p, data, seed))
    base = os.path.join(out, "base", "model")
    k_r1 = stage(out, "rank1", dict(base=k_base, p=p, seed=seed, preset=PRESETS["rank1"]),
                 lambda d: make_finetune(d, p, data, base, "rank1", seed))
    k_full = stage(out, "full", dict(base=k_base, p=p, seed=seed, preset=PRESETS["full"]),
                   lambda d: make_finetune(d, p, data, base, "full", seed))
    adapter = os.path.join(out, "rank1", "adapter")
    models = dict(base_plain=(base, None, "plain"), base_textbook=(base, None, "textbook"),
                  base=(base, None, "s1"), full=(os.path.join(out, "full", "model"), None, "s1"),
                  rank1=(base, adapter, "s1"))
    k_eval = stage(out, "eval", dict(models=[k_base, k_full, k_r1], p=p, args=EVAL_ARGS),
                   lambda d: make_eval(d, p, data, models))
    return base, adapter, k_eval


def parser():
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="where every stage writes (and is cached)")
    ap.add_argument("--fast", action="store_true", help="the CI variant: fewer steps and problems")
    ap.add_argument("--seeds", type=numbers(int, "seed"), default=[0],
                    help="comma-separated training seeds: each trains and evaluates its own base "
                    "and finetunes (the first in --out, the others in --out/seed-N); the summary "
                    "reports every headline number as mean [min, max] over them (default: 0)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    seeds = list(dict.fromkeys(args.seeds))
    p = PROFILES["fast" if args.fast else "default"]
    out = os.path.abspath(args.out)
    claim(out)
    env = environment(pin_cpu_numerics())
    t0 = time.time()
    data = os.path.join(out, "data")
    code = inspect_hash(problem, drill, textbook, chat_turn, s1_row, train_tokenizer, make_data)
    k_data = stage(out, "data", dict(p=p, model=DEMO_MODEL, code=code), lambda d: make_data(d, p))
    runs = {}
    for i, seed in enumerate(seeds):
        runs[seed] = out if i == 0 else os.path.join(out, f"seed-{seed}")
        base, adapter, k_eval = train_and_eval(runs[seed], p, seed, data, k_data)
        if i == 0:  # the interpretation runs on the first seed's models
            stage(out, "interpret", dict(eval=k_eval, p=p, code=inspect_hash(make_interpret)),
                  lambda d: make_interpret(d, p, data, base, adapter, os.path.join(out, "eval")))
    summary = summarize(out, p, runs, env)
    print(f"demo: finished in {(time.time() - t0) / 60:.1f} min; summary in "
          f"{os.path.join(out, 'summary.txt')}")
    return summary


if __name__ == "__main__":
    main()
