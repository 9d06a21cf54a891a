"""
Benchmarks with the s1 protocol (AIME24/25, MATH500, GPQA-Diamond), the recovery table, and
adapter ablations.

    # generate and grade (add --adapter DIR [--merge] for the LoRA; torchrun splits problems across GPUs)
    python eval.py run --model /models/Qwen2.5-32B-Instruct --out results/base \\
        --bench math500=data/math500/test.jsonl --bench aime24=data/aime24/test.jsonl \\
        --bench gpqa=data/gpqa_diamond_mcq.zip --zip-password ...
    torchrun --standalone --nproc_per_node=8 eval.py run --model ... --adapter runs/rank1/adapter --out results/lora ...
    # (lora - base) / (full - base) per benchmark, with bootstrap intervals
    python eval.py compare results/base results/full results/lora
    # KL(full adapter || ablated) and the reverse, per layer / block / adapter / type
    python eval.py ablate --model ... --adapter runs/rank1/adapter --samples results/lora/samples.jsonl --out results/ablate

Protocol (PAPER.md section C): chat prompt + `<|im_start|>think`; think until `<|im_start|>` (or
<|im_end|>) or the thinking budget (auto = max context - prompt - answer reserve); then
`<|im_start|>answer` (with `\\nFinal Answer:` when the budget ran out) and the answer until
<|im_end|>. --wait N replaces an early end of thinking by "Wait" up to N times (budget forcing).
Greedy by default; --temperature > 0 samples --samples-per-problem answers with --seed (pass@1
averaged). Problems are cut into fixed batches and batch i runs on rank i % world, so results do
not depend on the number of processes. Grading is local (grading.py); GPQA answers that name no
letter count as wrong (the official harness defaulted them to "A") and are counted.
"""
import argparse
import json
import math
import os
import random
import sys
import time
import zipfile

import torch

from data import Tokenizer, read_rows, render_chat, s1_example
from grading import BENCHMARKS, extract_answer, extract_letter, grade  # noqa: F401  (library use: from eval import grade)
from lora import ATTN, MLP, SITE_ORDER, ablate, adapters, load_adapter, merge, sites
from model import DTYPES, Qwen2, atomic_dir, write_atomic

# -----------------------------------------------------------------------------
# benchmark files


def load_benchmark(name, path, password=None, seed=0):
    """[{id, question, gold}] from a benchmark file; errors name the file, line and field."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    if name == "gpqa":
        return _load_gpqa(path, password, seed)
    rows, where = read_rows(path)
    items = []
    for i, (r, w) in enumerate(zip(rows, where)):
        q = next((r[k] for k in ("problem", "Problem", "question") if k in r), None)
        a = next((r[k] for k in ("answer", "Answer") if k in r), None)
        if q is None:
            raise ValueError(f"{w}: missing field 'problem' (or 'Problem' / 'question')")
        if a is None:
            raise ValueError(f"{w}: missing field 'answer'")
        items.append(dict(id=str(r.get("id", r.get("unique_id", i))), question=q, gold=str(a)))
    return items


def _load_gpqa(path, password, seed):
    """GPQA-Diamond: the MCQ jsonl ({question with options, answer letter}), optionally inside a
    password-protected zip, or the original CSV (Question, Correct Answer, Incorrect Answer 1-3),
    whose options are shuffled with random.Random(seed) in row order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such benchmark file")
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            member = next((n for n in z.namelist() if n.endswith(".jsonl")), None)
            if member is None:
                raise ValueError(f"{path}: no .jsonl member")
            try:
                text = z.read(member, pwd=password.encode() if password else None).decode()
            except RuntimeError as e:  # zipfile's "Bad password" / "password required"
                raise ValueError(f"{path}: cannot decrypt {member}: wrong or missing --zip-password ({e})") from None
        lines = [(n, l) for n, l in enumerate(text.split("\n"), 1) if l.strip()]  # not splitlines: \u2028 may sit in a string
        rows = []
        for n, l in lines:
            try:
                rows.append((json.loads(l), f"{path}:{member} line {n}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{member} line {n}: not valid JSON ({e.msg})") from None
    elif path.endswith(".csv"):
        import csv
        with open(path, newline="", encoding="utf-8") as f:
            rng = random.Random(seed)
            rows = []
            for n, r in enumerate(csv.DictReader(f), 2):
                need = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
                miss = [k for k in need if not r.get(k)]
                if miss:
                    raise ValueError(f"{path} line {n}: missing field {miss[0]!r}")
                opts = [r["Correct Answer"].strip()] + [r[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
                order = list(range(4))
                rng.shuffle(order)
                q = r["Question"].strip() + "\n\n" + "\n".join(f"{'ABCD'[j]}) {opts[o]}" for j, o in enumerate(order))
                rows.append(({"question": q, "answer": "ABCD"[order.index(0)], "id": r.get("Record ID", n)}, f"{path} line {n}"))
    else:
        rows = list(zip(*read_rows(path)))
    items = []
    for i, (r, w) in enumerate(rows):
        for k in ("question", "answer"):
            if k not in r:
                raise ValueError(f"{w}: missing field {k!r}")
        if str(r["answer"]).strip().upper() not in ("A", "B", "C", "D"):
            raise ValueError(f"{w}: field 'answer' must be a letter A-D")
        items.append(dict(id=str(r.get("id", i)), question=r["question"], gold=str(r["answer"]).strip().upper()))
    return items


# -----------------------------------------------------------------------------
# the s1 generation protocol

ANSWER, FORCED = "<|im_start|>answer", "<|im_start|>answer\nFinal Answer:"


def s1_generate(model, tok, questions, args, generator=None):
    """Two-phase s1 generation for a batch of questions; returns one dict per question."""
    stops = [tok.im_start, tok.im_end, tok.eot]
    prompts = [tok.encode(render_chat([{"role": "user", "content": q}], add_generation_prompt=True) + "<|im_start|>think")
               for q in questions]
    reserve = len(tok.encode("\n" + FORCED)) + args.max_answer_tokens
    budgets = [args.thinking_budget if args.thinking_budget > 0 else args.max_context - len(p) - reserve for p in prompts]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no thinking budget within --max-context")
    think = [[] for _ in prompts]
    natural = [False] * len(prompts)
    waits_left = [args.wait] * len(prompts)
    todo = list(range(len(prompts)))
    wait_ids = tok.encode("Wait")
    while todo:
        outs = model.generate([prompts[i] + think[i] for i in todo], max(budgets[i] - len(think[i]) for i in todo),
                              temperature=args.temperature, top_p=args.top_p, stop_ids=stops, generator=generator)
        nxt = []
        for i, o in zip(todo, outs):
            o = o[:budgets[i] - len(think[i])]  # rows of a batch share one length; keep each to its budget
            stopped = bool(o) and o[-1] in stops
            think[i] += o[:-1] if stopped else o
            natural[i] = stopped
            if stopped and waits_left[i] > 0 and len(think[i]) + len(wait_ids) < budgets[i]:
                waits_left[i] -= 1
                think[i] += wait_ids  # budget forcing: suppress the end of thinking, continue
                nxt.append(i)
        todo = nxt
    heads = []
    for i in range(len(prompts)):
        text = tok.decode(think[i])
        heads.append(ANSWER if natural[i] else ("" if text.endswith("\n") else "\n") + FORCED)
    answers = model.generate([prompts[i] + think[i] + tok.encode(heads[i]) for i in range(len(prompts))],
                             args.max_answer_tokens, temperature=args.temperature, top_p=args.top_p,
                             stop_ids=[tok.im_end, tok.eot], generator=generator)
    res = []
    for i, a in enumerate(answers):
        ended = bool(a) and a[-1] in (tok.im_end, tok.eot)
        gen = "<|im_start|>think" + tok.decode(think[i]) + heads[i] + tok.decode(a[:-1] if ended else a)
        res.append(dict(generation=gen, thinking_tokens=len(think[i]), answer_tokens=len(a),
                        thinking_truncated=not natural[i], answer_truncated=not ended))
    return res


# -----------------------------------------------------------------------------
# run


def setup_dist():
    if "RANK" not in os.environ:
        return 0, 1, None
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def load_model(args, device):
    model = Qwen2.from_pretrained(args.model, dtype=DTYPES[args.dtype] if args.dtype else None, device=device)
    identity = dict(model=os.path.abspath(args.model), adapter=None, merged=False)
    if args.adapter:
        load_adapter(model, args.adapter, verbose=False)
        identity.update(adapter=os.path.abspath(args.adapter), merged=bool(args.merge),
                        adapter_sites=len(adapters(model)))
        if args.merge:
            merge(model)
    return model.eval(), identity


def bootstrap(scores, n=1000, seed=0):
    """95% percentile interval of the mean of per-problem scores."""
    if not scores:
        return [None, None]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(scores) for _ in scores) / len(scores) for _ in range(n))
    return [means[int(0.025 * n)], means[int(0.975 * n) - 1]]


def cmd_run(args):
    rank, world, dist = setup_dist()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    benches = []
    for spec in args.bench:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--bench {spec!r}: expected NAME=PATH with NAME one of {list(BENCHMARKS)}")
        items = load_benchmark(name, path, args.zip_password, args.seed)
        benches.append((name, path, items[:args.limit] if args.limit else items))
    tok = Tokenizer(args.tokenizer or args.model)
    model, identity = load_model(args, device)
    n_samples = args.samples_per_problem if args.temperature > 0 else 1
    jobs = [(b, it, k) for b, (_, _, items) in enumerate(benches) for it in items for k in range(n_samples)]
    jobs = [(j, *job) for j, job in enumerate(jobs)]
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    mine = [(bi, batch) for bi, batch in enumerate(batches) if bi % world == rank]
    from tqdm import tqdm
    bar = tqdm(total=sum(len(b) for _, b in mine), desc=f"eval rank {rank}", disable=rank != 0, file=sys.stderr)
    records, t0, n_tok = [], time.time(), 0
    for bi, batch in mine:
        g = torch.Generator(device=device).manual_seed(args.seed + bi)  # per batch: independent of world size
        outs = s1_generate(model, tok, [it["question"] for _, _, it, _ in batch], args, generator=g)
        for (j, b, it, k), o in zip(batch, outs):
            name = benches[b][0]
            pred = extract_letter(o["generation"]) if name == "gpqa" else extract_answer(o["generation"])
            records.append(dict(benchmark=name, id=it["id"], sample=k, gold=it["gold"], extracted=pred,
                                correct=grade(name, o["generation"], it["gold"]), **o, job=j,
                                # GPQA's authors ask that its questions never be written out in plain text
                                question=None if name == "gpqa" else it["question"]))
            n_tok += o["thinking_tokens"] + o["answer_tokens"]
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
    bar.close()
    os.makedirs(args.out, exist_ok=True)
    part = os.path.join(args.out, f".part-rank{rank:05d}.jsonl")
    write_atomic(part, "".join(json.dumps(r) + "\n" for r in records))
    if dist:
        dist.barrier()
    if rank == 0:
        allrec = []
        for r in range(world):
            p = os.path.join(args.out, f".part-rank{r:05d}.jsonl")
            allrec += [json.loads(l) for l in open(p)]
        allrec.sort(key=lambda r: r.pop("job"))
        write_results(args, benches, allrec, identity, world)
        for r in range(world):
            os.remove(os.path.join(args.out, f".part-rank{r:05d}.jsonl"))
    if dist:
        dist.barrier()
        dist.destroy_process_group()


def write_results(args, benches, records, identity, world):
    results = {}
    for name, path, items in benches:
        rs = [r for r in records if r["benchmark"] == name]
        per_problem = {}
        for r in rs:
            per_problem.setdefault(r["id"], []).append(float(r["correct"]))
        scores = [sum(v) / len(v) for v in per_problem.values()]
        results[name] = dict(
            path=os.path.abspath(path), problems=len(items), samples=len(rs),
            accuracy=sum(scores) / len(scores) if scores else None, ci95=bootstrap(scores),
            per_problem={k: sum(v) / len(v) for k, v in per_problem.items()},
            unparseable=sum(r["extracted"] is None for r in rs),
            thinking_truncated=sum(r["thinking_truncated"] for r in rs),
            answer_truncated=sum(r["answer_truncated"] for r in rs),
            mean_thinking_tokens=sum(r["thinking_tokens"] for r in rs) / max(1, len(rs)))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "zip_password")}

    keys = ("benchmark", "id", "sample", "question", "gold", "extracted", "correct", "generation", "thinking_tokens",
            "thinking_truncated", "answer_truncated")
    write_atomic(os.path.join(args.out, "samples.jsonl"), "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in records))
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps(dict(results=results, config=config, identity=identity, world=world), indent=1))
    for name, r in results.items():
        lo, hi = r["ci95"]
        print(f"{name}: accuracy {r['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] on {r['problems']} problems | unparseable "
              f"{r['unparseable']} | thinking truncated {r['thinking_truncated']} | mean thinking "
              f"{r['mean_thinking_tokens']:.0f} tokens")


# -----------------------------------------------------------------------------
# compare: the recovery table


def recovery_table(base, full, lora, n=1000, seed=0):
    """{benchmark: accuracies, recovery = (lora - base) / (full - base), and a paired bootstrap 95%
    interval over the problems common to the three runs}. Arguments are results.json dicts."""
    table = {}
    for name in base["results"]:
        if name not in full["results"] or name not in lora["results"]:
            continue
        b, f, l = (x["results"][name] for x in (base, full, lora))
        gain = f["accuracy"] - b["accuracy"]
        rec = (l["accuracy"] - b["accuracy"]) / gain if gain else None
        ids = sorted(set(b["per_problem"]) & set(f["per_problem"]) & set(l["per_problem"]))
        rng, boots = random.Random(seed), []
        for _ in range(n):
            pick = [rng.choice(ids) for _ in ids]
            sb, sf, sl = (sum(x["per_problem"][i] for i in pick) / len(pick) for x in (b, f, l))
            if sf != sb:
                boots.append((sl - sb) / (sf - sb))
        boots.sort()
        ci = [boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]] if len(boots) >= 20 else [None, None]
        table[name] = dict(base=b["accuracy"], full=f["accuracy"], lora=l["accuracy"], gain=gain, recovery=rec,
                           recovery_ci95=ci, problems=len(ids))
    return table


def cmd_compare(args):
    runs = []
    for d in (args.base, args.full, args.lora):
        f = os.path.join(d, "results.json")
        if not os.path.isfile(f):
            raise SystemExit(f"compare: {f} not found (run `eval.py run --out {d}` first)")
        runs.append(json.load(open(f)))
    table = recovery_table(*runs)
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}"
    print(f"{'benchmark':10s} {'base':>6s} {'full':>6s} {'lora':>6s} {'recovery %':>11s} {'95% CI':>16s}")
    for name, r in table.items():
        lo, hi = r["recovery_ci95"]
        print(f"{name:10s} {fmt(r['base']):>6s} {fmt(r['full']):>6s} {fmt(r['lora']):>6s} {fmt(r['recovery']):>11s} "
              f"{'[' + fmt(lo) + ', ' + fmt(hi) + ']':>16s}")
    write_atomic(args.out or os.path.join(args.lora, "recovery.json"),
                 json.dumps(dict(base=args.base, full=args.full, lora=args.lora, table=table), indent=1))
    return table


# -----------------------------------------------------------------------------
# ablations


def ablation_sequences(args, tok):
    """[(name, ids, assistant mask)]: the model's own generations (held out) and optional s1 rows."""
    seqs = []
    if args.samples:
        rows, where = read_rows(args.samples, required=("generation",))
        qs = {}
        for spec in args.bench or []:
            name, _, path = spec.partition("=")
            qs.update({(name, it["id"]): it["question"] for it in load_benchmark(name, path, args.zip_password)})
        for r, w in list(zip(rows, where))[:args.max_sequences]:
            q = r.get("question") or qs.get((r.get("benchmark"), str(r.get("id"))))
            if q is None:
                raise SystemExit(f"ablate: {w} has no question (GPQA samples): pass --bench gpqa=PATH")
            prompt = tok.encode(render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
            gen = tok.encode(r["generation"])
            ids = (prompt + gen)[:args.max_tokens]
            seqs.append((f"{w}", ids, [0] * len(prompt) + [1] * (len(ids) - len(prompt))))
    if args.s1:
        rows, where = read_rows(args.s1)
        rng = random.Random(args.seed)
        pick = sorted(rng.sample(range(len(rows)), min(args.s1_rows, len(rows))))
        for i in pick:
            ids, mask = s1_example(rows[i], tok, where[i])
            seqs.append((where[i], ids[:args.max_tokens], mask[:args.max_tokens]))
    if not seqs:
        raise SystemExit("ablate: give --samples (eval.py generations) and/or --s1 (training rows)")
    return seqs


def ablation_sets(model, block):
    """{experiment: [(label, selection kwargs for lora.ablate)]}."""
    layers = sorted({l for l, _ in sites(model)})
    types = [t for t in SITE_ORDER if any(t == s for _, s in sites(model))]
    return {
        "none": [("none", dict(sites=[]))],
        "layer": [(f"L{l}", dict(layers=[l])) for l in layers],
        "block": [(f"L{layers[i]}-{layers[min(i + block, len(layers)) - 1]}", dict(layers=layers[i:i + block]))
                  for i in range(0, len(layers), block)],
        "single": [(f"L{l}.{t}", dict(sites=[(l, t)])) for l, t in sites(model)],
        "type": [(t, dict(types=[t])) for t in types],
        "mlp_vs_attn": [("mlp", dict(types=[t for t in MLP if t in types])),
                        ("attn", dict(types=[t for t in ATTN if t in types]))],
    }


@torch.no_grad()
def kl_stats(model, ids, mask, ref_logp, sel):
    """KL(full || ablated) and KL(ablated || full) per position, averaged over assistant positions
    (those predicting an assistant token) and over all positions; fp32 log-softmax."""
    with ablate(model, **sel):
        logp = torch.log_softmax(model(ids).float(), dim=-1)[0]
    p_ref, p = ref_logp.exp(), logp.exp()
    kl_fa = (p_ref * (ref_logp - logp)).sum(-1)  # (T,)
    kl_af = (p * (logp - ref_logp)).sum(-1)
    m = torch.tensor(mask[1:] + [0], dtype=torch.bool, device=kl_fa.device)
    avg = lambda v, w: (v[w].mean().item() if w.any() else float("nan"))
    allm = torch.ones_like(m)
    return dict(kl_full_abl_assistant=avg(kl_fa, m), kl_abl_full_assistant=avg(kl_af, m),
                kl_full_abl_all=avg(kl_fa, allm), kl_abl_full_all=avg(kl_af, allm))


def cmd_ablate(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.adapter:
        raise SystemExit("ablate: --adapter is required")
    args.merge = False
    tok = Tokenizer(args.tokenizer or args.model)
    model, identity = load_model(args, device)
    seqs = ablation_sequences(args, tok)
    sets = ablation_sets(model, args.block)
    chosen = [e for e in args.experiments.split(",") if e]
    unknown = [e for e in chosen if e not in sets]
    if unknown:
        raise SystemExit(f"ablate: unknown experiments {unknown}; expected some of {list(sets)}")
    per = {e: {lab: [] for lab, _ in sets[e]} for e in ["none"] + chosen}
    from tqdm import tqdm
    for name, ids, mask in tqdm(seqs, desc="ablate", file=sys.stderr):
        x = torch.tensor([ids], device=device)
        ref = torch.log_softmax(model(x).float(), dim=-1)[0]
        for e in per:
            for lab, sel in sets[e]:
                per[e][lab].append(kl_stats(model, x, mask, ref, sel))
    results = {}
    for e, d in per.items():
        results[e] = []
        for lab, stats in d.items():
            row = dict(label=lab)
            for k in stats[0]:
                v = [s[k] for s in stats if not math.isnan(s[k])]
                mean = sum(v) / len(v) if v else float("nan")
                std = math.sqrt(sum((a - mean) ** 2 for a in v) / len(v)) if v else float("nan")
                row.update({f"{k}_mean": mean, f"{k}_std": std, f"{k}_max": max(v) if v else float("nan")})
            results[e].append(row)
    out = dict(identity=identity, sequences=[s[0] for s in seqs], tokens=sum(len(s[1]) for s in seqs),
               sites=[list(s) for s in sites(model)], results=results)

    def write(d):
        with open(os.path.join(d, "ablations.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(d, "ablations.html"), "w") as f:
            f.write(ablation_html(out))
    atomic_dir(args.out, write)
    for e in chosen:
        top = sorted(results[e], key=lambda r: -r["kl_full_abl_assistant_mean"])[:5]
        print(f"{e}: top by KL(full||ablated) on assistant tokens: "
              + ", ".join(f"{r['label']} {r['kl_full_abl_assistant_mean']:.3g}" for r in top))
    return out


def ablation_html(out):
    """A self-contained page: per-layer bars with std error bars, and the layer x type heatmap (SVG)."""
    from html import escape
    key = "kl_full_abl_assistant"
    parts = ["<!doctype html><meta charset=utf-8><title>rank1 ablations</title>",
             "<style>body{font:14px sans-serif;margin:24px}svg{background:#fafafa}</style>",
             f"<h1>Adapter ablations</h1><p>KL(full adapter || ablated), mean over assistant tokens of "
             f"{len(out['sequences'])} sequences ({out['tokens']} tokens). Adapter: {escape(str(out['identity'].get('adapter')))}</p>"]
    layers = out["results"].get("layer", [])
    if layers:
        W, H, n = 800, 240, len(layers)
        vmax = max((r[f"{key}_mean"] + r[f"{key}_std"] for r in layers), default=1) or 1
        bw = W / n
        svg = [f'<svg width="{W + 60}" height="{H + 40}"><g transform="translate(50,10)">']
        for i, r in enumerate(layers):
            m, s = r[f"{key}_mean"], r[f"{key}_std"]
            h = H * m / vmax
            x = i * bw
            svg.append(f'<rect x="{x:.1f}" y="{H - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" fill="#4a78b5">'
                       f'<title>{escape(r["label"])}: {m:.4g} ± {s:.2g}</title></rect>')
            y1, y2 = H - H * (m + s) / vmax, H - H * max(m - s, 0) / vmax
            svg.append(f'<line x1="{x + bw / 2:.1f}" x2="{x + bw / 2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="#222"/>')
        svg.append(f'<line x1="0" x2="{W}" y1="{H}" y2="{H}" stroke="#000"/><text x="-45" y="10">{vmax:.2g}</text>'
                   f'<text x="0" y="{H + 18}">layer 0</text><text x="{W - 60}" y="{H + 18}">layer {n - 1}</text></g></svg>')
        parts.append("<h2>Leave one layer out</h2>" + "".join(svg))
    single = out["results"].get("single", [])
    if single:
        cells = {tuple(s): r for s, r in zip(out["sites"], single)}
        ls = sorted({l for l, _ in out["sites"]})
        ts = [t for t in SITE_ORDER if any(t == s for _, s in out["sites"])]
        vmax = max((r[f"{key}_mean"] for r in single), default=1) or 1
        cw, ch = max(6, 800 // max(1, len(ls))), 18
        svg = [f'<svg width="{80 + cw * len(ls)}" height="{20 + ch * len(ts)}">']
        for j, t in enumerate(ts):
            svg.append(f'<text x="0" y="{ch * j + 13}">{escape(t)}</text>')
            for i, l in enumerate(ls):
                r = cells.get((l, t))
                if r is None:
                    continue
                v = r[f"{key}_mean"] / vmax
                col = f"rgb({255 - int(200 * v)},{255 - int(150 * v)},255)"
                svg.append(f'<rect x="{80 + cw * i}" y="{ch * j}" width="{cw - 1}" height="{ch - 1}" fill="{col}">'
                           f'<title>layer {l} {escape(t)}: {r[f"{key}_mean"]:.4g}</title></rect>')
        svg.append("</svg>")
        parts.append(f"<h2>Single adapters (layer × type), colour scale 0 … {vmax:.3g}</h2>" + "".join(svg))
    for e in ("type", "mlp_vs_attn", "block"):
        if out["results"].get(e):
            rows = "".join(f"<tr><td>{escape(r['label'])}</td><td>{r[f'{key}_mean']:.4g}</td><td>{r[f'{key}_std']:.3g}</td>"
                           f"<td>{r['kl_abl_full_assistant_mean']:.4g}</td><td>{r['kl_full_abl_all_mean']:.4g}</td></tr>"
                           for r in out["results"][e])
            parts.append(f"<h2>{escape(e)}</h2><table border=1 cellpadding=3><tr><th>ablated</th><th>KL(full||abl)</th>"
                         f"<th>std</th><th>KL(abl||full)</th><th>KL(full||abl), all tokens</th></tr>{rows}</table>")
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_flags(s):
        s.add_argument("--model", required=True, help="HF model directory")
        s.add_argument("--adapter", help="PEFT adapter directory (rank1 or PEFT)")
        s.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
        s.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
        s.add_argument("--zip-password", help="password of a GPQA zip")
        s.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("run", help="generate and grade")
    model_flags(r)
    r.add_argument("--bench", action="append", required=True, help="NAME=PATH, NAME in " + ", ".join(BENCHMARKS))
    r.add_argument("--out", required=True)
    r.add_argument("--merge", action="store_true", help="merge the adapter into the weights before decoding")
    r.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-context", type=int, default=32768)
    r.add_argument("--max-answer-tokens", type=int, default=1024)
    r.add_argument("--thinking-budget", type=int, default=0, help="0: auto (max context - prompt - answer reserve)")
    r.add_argument("--wait", type=int, default=0, help="budget forcing: replace an early end of thinking by 'Wait' N times")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--samples-per-problem", type=int, default=1)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="recovery table: (lora - base) / (full - base)")
    c.add_argument("base")
    c.add_argument("full")
    c.add_argument("lora")
    c.add_argument("--out", help="JSON file (default: LORA/recovery.json)")
    c.set_defaults(func=cmd_compare)

    a = sub.add_parser("ablate", help="KL of ablated vs full adapter")
    model_flags(a)
    a.add_argument("--samples", help="samples.jsonl from `eval.py run` (held-out generations)")
    a.add_argument("--bench", action="append", help="NAME=PATH to recover the questions of --samples")
    a.add_argument("--s1", help="s1K-1.1 rows to add (training sequences)")
    a.add_argument("--s1-rows", type=int, default=16)
    a.add_argument("--max-sequences", type=int, default=16)
    a.add_argument("--max-tokens", type=int, default=4096)
    a.add_argument("--block", type=int, default=8, help="layers per block ablation")
    a.add_argument("--experiments", default="layer,block,single,type,mlp_vs_attn")
    a.add_argument("--out", required=True)
    a.set_defaults(func=cmd_ablate)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py: {e}") from None


if __name__ == "__main__":
    main()
