"""
Adapter ablations (docs/paper.md section F): switch adapters off and measure KL(full adapter ||
ablated) and the reverse on the model's own held-out generations (and optionally s1 training
rows): per layer, per 8-layer block, per single adapter (the layer x type matrix), per type, MLP vs
attention, and the greedy MLP ablation (re-scored at every step, as the official code does).

    python ablate.py --model /models/Qwen2.5-32B-Instruct --adapter runs/rank1/adapter \\
        --samples results/lora/samples.jsonl --bench gpqa=data/gpqa_diamond_mcq.zip \\
        --zip-password ... --out results/ablate
    # one model copy per GPU, the sequences split over them (the same results as one process)
    torchrun --standalone --nproc_per_node=8 ablate.py --model ... --adapter ... --samples ... \\
        --out results/ablate

Writes ablations.json (every statistic, the sites, what it was made from) and ablations.html;
while it runs, ablations.parts.jsonl holds each finished experiment (a rerun resumes from it).
"""
import json
import math
import os
import random
import sys
from html import escape

import torch
import torch.distributed as dist
from tqdm import tqdm

from benchmarks import load_benchmark
from common import (AppendLog, Parser, add_device_flag, add_model_flags, check_out, cleanup_dist,
                    file_identity, fresh_outputs, lock_dir, number, print0, read_log,
                    same_origin, setup_dist, user_errors, write_atomic, write_json)
from data import chat_prompt, read_rows, s1_example
from figures import bar_chart, site_heatmap, table
from lora import ATTN, MLP, SITE_ORDER, ablate, site_label, sites
from lora_files import load_model
from model import load_tokenizer


def ablation_sequences(args, tok):
    """[(name, ids, assistant mask)]: the model's own generations (held out), optional s1 rows."""
    seqs = []
    if args.samples:
        rows, where = read_rows(args.samples, required=("generation",))
        qs = {}
        for spec in args.bench or []:
            name, _, path = spec.partition("=")
            items = load_benchmark(name, path, args.zip_password)
            qs.update({(name, it["id"]): it["question"] for it in items})
        pairs = list(zip(rows, where))
        picked = [(r, w) for r, w in pairs if r.get("benchmark") == args.sample_bench]
        if args.sample_bench and not picked:
            print(f"ablate: {args.samples} holds no {args.sample_bench} generation; taking the "
                  "first of all benchmarks", file=sys.stderr)
        for r, w in (picked or pairs)[:args.max_sequences]:
            q = r.get("question") or qs.get((r.get("benchmark"), str(r.get("id"))))
            if q is None:
                raise SystemExit(f"ablate: {w} has no question (GPQA samples): pass "
                                 "--bench gpqa=PATH")
            prompt = tok.encode(chat_prompt(q))
            ids = (prompt + tok.encode(r["generation"]))[:args.max_tokens]
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
    for w, ids, mask in seqs:
        if sum(mask[1:]) == 0:
            raise ValueError(f"{w}: no assistant token within --max-tokens {args.max_tokens} (its "
                             "prompt is at least as long); raise --max-tokens")
    return seqs


def ablation_sets(model, block):
    """{experiment: [(label, selection kwargs for lora.ablate)]}."""
    layers = sorted({l for l, _ in sites(model)})
    types = [t for t in SITE_ORDER if any(t == s for _, s in sites(model))]
    return {
        "none": [("none", dict(sites=[]))],
        "layer": [(f"L{l}", dict(layers=[l])) for l in layers],
        "block": [(f"L{layers[i]}-{layers[min(i + block, len(layers)) - 1]}",
                   dict(layers=layers[i:i + block]))
                  for i in range(0, len(layers), block)],
        "single": [(site_label(l, t), dict(sites=[(l, t)])) for l, t in sites(model)],
        "type": [(t, dict(types=[t])) for t in types],
        "mlp_vs_attn": [("mlp", dict(types=[t for t in MLP if t in types])),
                        ("attn", dict(types=[t for t in ATTN if t in types]))],
    }


@torch.no_grad()
def kl_stats(model, ids, mask, ref_logp, sel):
    """KL(full || ablated) and KL(ablated || full) per position, averaged over assistant positions
    (those predicting an assistant token) and over all positions, and KL(full || ablated) at the
    worst assistant position and the worst of all positions (the official greedy ablation's
    max_kl over its rollouts' every position); fp32 log-softmax. Beside them
    the ablated model's cross-entropy on the sequence's own next tokens over the assistant
    positions (mean and worst position; the official 1.0_generate_ablation_data.py's CE)."""
    with ablate(model, **sel):
        logp = torch.log_softmax(model(ids).float(), dim=-1)[0]
    if not (torch.isfinite(logp).all() and torch.isfinite(ref_logp).all()):
        raise ValueError(f"ablate: non-finite logits with {sel} switched off (NaN or inf in the "
                         "weights or activations; try --dtype float32)")
    p_ref, p = ref_logp.exp(), logp.exp()
    kl_fa = (p_ref * (ref_logp - logp)).sum(-1)  # (T,)
    kl_af = (p * (logp - ref_logp)).sum(-1)
    m = torch.tensor(mask[1:] + [0], dtype=torch.bool, device=kl_fa.device)
    avg = lambda v, w: (v[w].mean().item() if w.any() else float("nan"))
    top = lambda v, w: (v[w].max().item() if w.any() else float("nan"))
    allm = torch.ones_like(m)
    nxt = torch.cat([ids[0, 1:], ids[0, :1]])  # the last position predicts nothing (m is 0 there)
    ce = -logp.gather(1, nxt[:, None])[:, 0]
    return dict(kl_full_abl_assistant=avg(kl_fa, m), kl_abl_full_assistant=avg(kl_af, m),
                kl_full_abl_all=avg(kl_fa, allm), kl_abl_full_all=avg(kl_af, allm),
                kl_full_abl_assistant_maxpos=top(kl_fa, m), kl_full_abl_all_maxpos=top(kl_fa, allm),
                ce_assistant=avg(ce, m),
                ce_assistant_maxpos=top(ce, m))


def ablation_pass(model, seqs, sets, bar=None):
    """{experiment: [row]} for sets {experiment: [(label, selection)]}: each row holds the mean,
    std and max over the sequences of every kl_stats value. Under torchrun each rank runs the
    sequences i with i % world == rank and the ranks gather their statistics, so every world size
    gives the same rows. bar: a progress bar that counts this rank's forwards."""
    device = model.lm_head.weight.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = {e: {lab: {} for lab, _ in s} for e, s in sets.items()}  # lab -> {sequence: stats}
    for i in range(rank, len(seqs), world):
        _, ids, mask = seqs[i]
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            ref = torch.log_softmax(model(x).float(), dim=-1)[0]
        for e, s in sets.items():
            for lab, sel in s:
                per[e][lab][i] = kl_stats(model, x, mask, ref, sel)
            if bar is not None:
                bar.update(len(s))
        if bar is not None:
            bar.update(1)  # the reference
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, per)
        per = {e: {lab: {i: st for p in gathered for i, st in p[e][lab].items()} for lab in d}
               for e, d in per.items()}
    results = {}
    for e, d in per.items():
        results[e] = []
        for lab, by_seq in d.items():
            stats = [by_seq[i] for i in range(len(seqs))]
            row = dict(label=lab)
            for k in stats[0]:
                v = [s[k] for s in stats if not math.isnan(s[k])]
                mean = sum(v) / len(v) if v else float("nan")
                std = math.sqrt(sum((a - mean) ** 2 for a in v) / len(v)) if v else float("nan")
                row.update({f"{k}_mean": mean, f"{k}_std": std,
                            f"{k}_max": max(v) if v else float("nan")})
            results[e].append(row)
    return results


def greedy_ablation(model, seqs, metric, single=None, order="rescore", done=(), on_step=None,
                    bar=None):
    """The official iterative MLP ablation (iterative_mlp_ablation_by_matrix.py): MLP adapters are
    switched off one at a time, always the one whose removal, on top of those already off, raises
    `metric` least (mean over the sequences; the paper's max_kl is kl_full_abl_assistant_maxpos;
    ties in site order). Every remaining adapter is re-scored against the current state at each
    step: n(n+1)/2 adapter-sets for n adapters, the first n of them the single ablations, reused
    from `single` (the "single" experiment's rows) when it ran. order="fixed" is a cheaper
    variant (n passes after the scores): one order from the single scores, applied cumulatively.
    done: the cumulative rows of an earlier, interrupted run (re-scored steps resume after them);
    on_step(row) is called with each new one. -> (single score rows, cumulative rows with
    n_ablated and the site added)."""
    mlp = [(l, t) for l, t in sites(model) if t in MLP]
    labels = [site_label(l, t) for l, t in mlp]
    known = {r["label"]: r for r in single or []}
    if all(lab in known for lab in labels):
        scores = [known[lab] for lab in labels]
    else:
        sets = {"score": [(lab, dict(sites=[s])) for lab, s in zip(labels, mlp)]}
        scores = ablation_pass(model, seqs, sets, bar)["score"]
    least = lambda rows, idx: min(idx, key=lambda i: (rows[i][f"{metric}_mean"], i))
    if order == "fixed":
        ranked = sorted(range(len(mlp)), key=lambda i: (scores[i][f"{metric}_mean"], i))
        steps = [(f"+{labels[i]}", dict(sites=[mlp[j] for j in ranked[:n + 1]]))
                 for n, i in enumerate(ranked)]
        cumulative = ablation_pass(model, seqs, {"greedy": steps}, bar)["greedy"]
    else:
        cumulative = [dict(r) for r in done]
        ranked = [labels.index(r["added"]) for r in cumulative]
        if not ranked:
            ranked = [least(scores, range(len(mlp)))]
            cumulative = [dict(scores[ranked[0]])]
            finish(cumulative, 0, labels[ranked[0]], on_step)
        while len(ranked) < len(mlp):
            left = [i for i in range(len(mlp)) if i not in ranked]
            sets = {"step": [(f"+{labels[i]}", dict(sites=[mlp[j] for j in ranked + [i]]))
                             for i in left]}
            rows = ablation_pass(model, seqs, sets, bar)["step"]
            k = least(rows, range(len(left)))
            ranked.append(left[k])
            cumulative.append(rows[k])
            finish(cumulative, len(ranked) - 1, labels[left[k]], on_step)
    for n, row in enumerate(cumulative):
        row.update(label=f"+{labels[ranked[n]]}", n_ablated=n + 1, added=labels[ranked[n]])
    return scores, cumulative


def finish(cumulative, n, label, on_step):
    """Label the greedy ablation's step n (0-based) and hand it to on_step (to be saved)."""
    cumulative[n].update(label=f"+{label}", n_ablated=n + 1, added=label)
    if on_step is not None:
        on_step(cumulative[n])


def passes(model, seqs, sets, chosen, greedy):
    """The forwards an ablation run makes: each experiment's sets plus one reference, per
    sequence; the greedy ablation's as greedy_ablation runs them."""
    S = len(seqs)
    n = sum(S * (len(sets[e]) + 1) for e in ["none"] + chosen if e in sets)
    if "greedy" in chosen:
        m = sum(1 for _, t in sites(model) if t in MLP)
        n += 0 if "single" in chosen else S * (m + 1)
        n += S * (m + 1) if greedy == "fixed" else S * sum(k + 1 for k in range(1, m))
    return n


def ablation_html(out):
    """ablate.py's page: per-layer bars with std error bars, the layer x type heatmap, and
    the tables of the other experiments."""
    key = "kl_full_abl_assistant"
    parts = ["<!doctype html><meta charset=utf-8><title>rank1 ablations</title>",
             "<style>body{font:14px sans-serif;margin:24px}svg{background:#fafafa}</style>",
             "<h1>Adapter ablations</h1><p>KL(full adapter || ablated), mean over assistant "
             f"tokens of {len(out['sequences'])} sequences ({out['tokens']} tokens). Adapter: "
             f"{escape(str(out['identity'].get('adapter')))}</p>"]
    layers = out["results"].get("layer", [])
    if layers:
        rows = [(r["label"], r[f"{key}_mean"], r[f"{key}_std"]) for r in layers]
        parts.append("<h2>Leave one layer out</h2>" + bar_chart(rows))
    single = out["results"].get("single", [])
    if single:
        parts.append(site_heatmap({tuple(s): r[f"{key}_mean"] for s, r in
                                   zip(out["sites"], single)}, "Single adapters (layer × type)",
                                  SITE_ORDER))
    for e in ("type", "mlp_vs_attn", "block"):
        if out["results"].get(e):
            rows = [[r["label"], f"{r[f'{key}_mean']:.4g}", f"{r[f'{key}_std']:.3g}",
                     f"{r['kl_abl_full_assistant_mean']:.4g}", f"{r['kl_full_abl_all_mean']:.4g}"]
                    for r in out["results"][e]]
            parts.append(f"<h2>{escape(e)}</h2>" + table(
                ["ablated", "KL(full||abl)", "std", "KL(abl||full)", "KL(full||abl), all tokens"],
                rows))
    return "\n".join(parts)


PARTS = "ablations.parts.jsonl"  # the finished experiments of a run, removed when it completes


def resume_parts(path, made_from, overwrite):
    """{experiment: rows} and the greedy steps that an interrupted run with the same inputs and
    settings wrote to `path` (its first line records them); another run's parts are refused,
    or with overwrite removed."""
    rows = read_log(path, repair=True)
    if rows and (rows[0].get("made_from") != made_from):
        if not overwrite:
            same_origin(rows[0].get("made_from") or {}, made_from, path)
        os.remove(path)
        rows = []
    if not rows:
        write_atomic(path, json.dumps(dict(made_from=made_from)) + "\n")
    parts = {r["experiment"]: r["rows"] for r in rows[1:] if "experiment" in r}
    return parts, [r["greedy_step"] for r in rows[1:] if "greedy_step" in r]


def save(log, row):
    """Append one finished part to the parts file (rank 0's; other ranks have none) and fsync it:
    on disk before the next part starts."""
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()


def cmd_ablate(args):
    """Set-up (the model, the sequences, the parts a killed run left), every chosen experiment
    (each saved as it finishes), then ablations.json, its page and the top sites printed."""
    rank, world, device = setup_dist(args.device)  # under torchrun: each rank its own sequences
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter,
                         "--samples": args.samples, "--s1": args.s1})
    outputs = [os.path.join(args.out, f) for f in ("ablations.json", "ablations.html")]
    fresh_outputs(outputs, args.overwrite)
    tok = load_tokenizer(args.model, args.tokenizer)
    model, identity = load_model(args.model, args.adapter, args.dtype, device=device,
                                 other_base=args.other_base)
    seqs = ablation_sequences(args, tok)
    sets = ablation_sets(model, args.block)
    chosen = [e for e in args.experiments.split(",") if e]
    unknown = [e for e in chosen if e not in sets and e != "greedy"]
    if unknown:
        raise SystemExit(f"ablate: unknown experiments {unknown}; expected some of "
                         f"{list(sets) + ['greedy']}")
    made_from = dict(samples=file_identity(args.samples) if args.samples else None,
                     s1=file_identity(args.s1) if args.s1 else None, max_tokens=args.max_tokens,
                     max_sequences=args.max_sequences, s1_rows=args.s1_rows, seed=args.seed,
                     sample_bench=args.sample_bench)
    if "greedy" in chosen:
        made_from.update(greedy_metric=args.greedy_metric, greedy_order=args.greedy)
    parts_file = os.path.join(args.out, PARTS)
    run = dict(made_from, identity=identity, experiments=chosen, block=args.block)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        lock_dir(args.out)
        resume_parts(parts_file, run, args.overwrite)  # checked, repaired, started
    dist.barrier()
    parts, steps = resume_parts(parts_file, run, False)
    n = passes(model, seqs, sets, chosen, args.greedy)
    tokens = sum(len(s[1]) for s in seqs)
    print0(f"ablate: {len(seqs)} sequences ({tokens:,} tokens), {n:,} forwards of the model "
           f"(~{2 * model.num_params() * tokens / len(seqs) * n / 1e15:.3g} PFLOP) on {world} "
           f"process(es)" + ("; resuming after " + ", ".join(parts) if parts else ""))
    log = AppendLog(parts_file) if rank == 0 else None
    results = run_experiments(model, seqs, sets, chosen, args, parts, steps, log, rank, world)
    out = dict(identity=identity, made_from=made_from, sequences=[s[0] for s in seqs],
               tokens=tokens, sites=[list(s) for s in sites(model)], results=results)
    if rank != 0:
        return out
    log.close()
    write_json(outputs[0], out)
    write_atomic(outputs[1], ablation_html(out))
    os.remove(parts_file)  # all of it is in ablations.json now
    print_top(results, chosen)
    return out


def run_experiments(model, seqs, sets, chosen, args, parts, steps, log, rank, world):
    """{experiment: rows} for "none" and each chosen experiment, a part read back where a killed
    run finished it, else run and appended to the parts log (rank 0)."""
    mine = len(seqs[rank::world])
    with tqdm(total=passes(model, seqs[rank::world], sets, chosen, args.greedy), desc="ablate",
              unit="fwd", file=sys.stderr, disable=rank != 0) as bar:
        results = {}
        for e in ["none"] + [e for e in chosen if e in sets]:
            if e in parts:
                results[e] = parts[e]
                bar.update(mine * (len(sets[e]) + 1))
                continue
            results[e] = ablation_pass(model, seqs, {e: sets[e]}, bar)[e]
            save(log, dict(experiment=e, rows=results[e]))
        if "greedy" in chosen:
            mlp = [(site_label(l, t), dict(sites=[(l, t)])) for l, t in sites(model) if t in MLP]
            if "single" in results:  # the greedy ablation's first scores
                scores = results["single"]
            elif "greedy_score" in parts:
                scores = parts["greedy_score"]
                bar.update(mine * (len(mlp) + 1))
            else:
                scores = ablation_pass(model, seqs, {"score": mlp}, bar)["score"]
                save(log, dict(experiment="greedy_score", rows=scores))
            bar.update(mine * sum(len(mlp) - j + 1 for j in range(1, len(steps))))
            results["greedy_score"], results["greedy"] = greedy_ablation(
                model, seqs, args.greedy_metric, scores, args.greedy, steps,
                lambda row: save(log, dict(greedy_step=row)), bar)
    return results


def print_top(results, chosen):
    """Each experiment's five largest KLs; the greedy curve at its quarters."""
    for e in chosen:
        if e == "greedy":
            quarters = results[e][max(len(results[e]) // 4 - 1, 0)::max(len(results[e]) // 4, 1)]
            print("greedy: KL(full||ablated) with the n least important MLP adapters off: "
                  + ", ".join(f"n={r['n_ablated']} {r['kl_full_abl_assistant_mean']:.3g}"
                              for r in quarters))
            continue
        top = sorted(results[e], key=lambda r: -r["kl_full_abl_assistant_mean"])[:5]
        print(f"{e}: top by KL(full||ablated) on assistant tokens: "
              + ", ".join(f"{r['label']} {r['kl_full_abl_assistant_mean']:.3g}" for r in top))


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    add_model_flags(p, adapter_required=True)
    p.add_argument("--zip-password", help="password of a GPQA zip")
    p.add_argument("--seed", type=number(int, "seed"), default=0, help="seeds the --s1 rows")
    p.add_argument("--samples", help="samples.jsonl from `eval.py run` (held-out generations)")
    p.add_argument("--bench", action="append",
                   help="NAME=PATH to recover the questions of --samples")
    p.add_argument("--s1", help="s1K-1.1 rows to add (training sequences)")
    p.add_argument("--s1-rows", type=number(int, "positive"), default=16,
                   help="training rows drawn from --s1 (seeded by --seed)")
    p.add_argument("--max-sequences", type=number(int, "positive"), default=16,
                   help="first N generations of --samples")
    p.add_argument("--max-tokens", type=number(int, "positive"), default=4096,
                   help="each sequence cut to this many tokens")
    p.add_argument("--block", type=number(int, "positive"), default=8,
                   help="layers per block ablation")
    p.add_argument("--experiments", default="layer,block,single,type,mlp_vs_attn",
                   help="comma-separated, among layer, block, single, type, mlp_vs_attn, greedy "
                   "(default: all but greedy; with greedy the default --greedy rescore makes "
                   "n(n+1)/2 passes for n MLP adapters: about 1.5 days for 16 sequences of 4,096 "
                   "tokens at 32B; the command prints its forward count before it starts)")
    p.add_argument("--sample-bench", default="math500",
                   help="take the --samples of this benchmark (the paper ablated MATH500 "
                   "rollouts); all benchmarks in file order when it has none ('' : all)")
    p.add_argument("--greedy-metric", default="kl_full_abl_assistant_maxpos",
                   choices=["kl_full_abl_assistant_maxpos", "kl_full_abl_all_maxpos",
                            "kl_full_abl_assistant"],
                   help="what scores each MLP adapter in the greedy ablation: the paper's max_kl "
                   "(the mean over sequences of the largest KL at one position) over assistant "
                   "positions, or over all positions as the official script on its rollouts, or "
                   "the mean KL over assistant positions")
    p.add_argument("--greedy", default="rescore", choices=["rescore", "fixed"],
                   help="rescore (the official): every remaining MLP adapter re-scored against "
                   "the current state at each step, n(n+1)/2 sets; fixed: one order from the "
                   "single scores, n sets")
    p.add_argument("--out", required=True, help="directory for ablations.json and ablations.html "
                   "(and, while it runs, ablations.parts.jsonl: a rerun resumes from it)")
    add_device_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace ablations.* in --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        with user_errors("ablate.py"):
            return cmd_ablate(args)
    finally:
        cleanup_dist()


if __name__ == "__main__":
    main()
