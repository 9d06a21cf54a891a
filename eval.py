"""
Benchmarks as s1 evaluates them (AIME24/25, MATH500, GPQA-Diamond) and the recovery table.

    # generate and grade (--adapter DIR [--merge] for the LoRA; torchrun splits problems over GPUs);
    # the base model as s1 evaluated it: --protocol plain
    python eval.py run --model /models/Qwen2.5-32B-Instruct --protocol plain --out results/base \\
        --bench math500=data/math500/test.jsonl --bench aime24=data/aime24/test.jsonl \\
        --bench gpqa=data/gpqa_diamond_mcq.zip --zip-password ...
    torchrun --standalone --nproc_per_node=8 eval.py run --model ... --adapter runs/rank1/adapter \\
        --out results/lora ...
    # (lora - base) / (full - base) per benchmark, with bootstrap intervals
    python eval.py compare results/base results/full results/lora

The benchmark files: benchmarks.py; how a model is asked (s1, plain, completion): protocols.py;
grading: grading.py; ablations: ablate.py.
Greedy by default; --temperature > 0 samples --samples-per-problem answers with --seed (pass@1
averaged), each sample seeded by (--seed, benchmark, problem, sample). Questions decode on the
engine (engine.py: --batch-size slots, refilled as answers finish), every world-th on each rank; an
answer depends on its question and seed alone, not on the number of processes or slots. Each
finished answer is appended to its rank's samples.rank-NNNNN.jsonl; a rerun into the same --out
(same run.json) skips what is done, and the end result is what an uninterrupted run writes; a rerun
of a finished run regrades every answer with this version's grader. Grading never stops a run (a
failure is an ungradeable answer, listed); GPQA answers that name no letter count as wrong (the
official harness defaulted them to "A") and are counted.
"""
import argparse
import glob
import json
import os
import re
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from benchmarks import gpqa_option_order, load_benchmark
from checkpoint import model_identity
from common import (AppendLog, Parser, add_config_flags, add_model_flags, bootstrap_ci, check_out,
                    cleanup_dist, code_version, config_from_flags, file_identity, free_memory,
                    fresh_outputs, number, read_log, setup_dist, start_run, user_errors,
                    write_atomic, write_json)
from engine import need_vllm, sequence_seed, vllm_load, vllm_run
from grading import BENCHMARKS, grade_sample
from lora_files import adapter_identity, check_base, load_model
from model import Qwen2Config, load_tokenizer
from protocols import PROTOCOLS, GenConfig, auto_batch, programs_for, stream

# -----------------------------------------------------------------------------
# run


def accuracy_ci(scores, seed=0):
    """95% bootstrap interval of the mean of per-problem scores."""
    if not scores:
        return [None, None]
    return bootstrap_ci(lambda i: sum(scores[j] for j in i) / len(i), [len(scores)], seed=seed)


def regrade(rec, item):
    """rec graded by this version of the grader (cheap and deterministic, so a rerun of a finished
    run after a change to grading.py updates its grades); rec["regraded"] says whether it moved."""
    pred, correct, error = grade_sample(rec["benchmark"], rec["generation"], item["gold"],
                                        item["question"])
    moved = (pred, correct, error) != (rec["extracted"], rec["correct"], rec.get("grading_error"))
    return {**rec, "extracted": pred, "correct": correct, "grading_error": error,
            "regraded": moved}


SAMPLE_KEYS = ("benchmark", "id", "sample", "question", "gold", "extracted", "correct",
               "generation", "thinking_tokens", "thinking_truncated", "answer_truncated",
               "grading_error")
RUN_FILES = ("run.json", "samples.jsonl", "results.json")


def run_settings(args, gen, benches, tok, n_samples):
    """Everything results depend on (the number of processes aside): run.json records it, and a
    rerun into the same --out continues only when it is unchanged."""
    return dict(model=model_identity(args.model),
                adapter=adapter_identity(args.adapter) if args.adapter else None,
                merge=bool(args.merge), dtype=args.dtype, tokenizer=file_identity(tok.path),
                benchmarks=[dict(name=n, file=file_identity(p), problems=len(items),
                                 **(dict(option_order=gpqa_option_order(p)) if n == "gpqa" else {}))
                            for n, p, items in benches],
                generation=asdict(gen), seed=args.seed, samples_per_problem=n_samples,
                # each sample is seeded by (seed, benchmark, id, sample) (engine.sequence_seed)
                **(dict(seeding="per sample") if gen.temperature > 0 else {}),
                **(dict(engine=args.engine) if args.engine != "ours" else {}))


def finished_records(out, rank=None):
    """{(benchmark, id, sample): record} of the answers already generated and graded in --out:
    the per-rank files being appended, and samples.jsonl once a run has finished. A last line cut
    by a kill or a full disk is no record (its problem is simply redone); `rank` cuts it off that
    rank's own file before the rank appends to it again."""
    done = {}
    files = sorted(glob.glob(os.path.join(out, "samples.rank-*.jsonl")))
    for f in [os.path.join(out, "samples.jsonl")] + files:
        mine = rank is not None and f == os.path.join(out, f"samples.rank-{rank:05d}.jsonl")
        for r in read_log(f, repair=mine):
            done.setdefault((r["benchmark"], r["id"], r["sample"]), r)
    return done


def batch_for(model, gen, device, n_jobs, rank):
    """--batch-size 0: as many slots as fit in this device's free memory (protocols.auto_batch);
    one line says what rank 0 chose and why."""
    size, why = auto_batch(model.cfg, model.lm_head.weight.dtype, gen.max_context,
                           free_memory(device), n_jobs)
    if rank == 0:
        print(f"eval: {size} slots (--batch-size 0: what fits; {why})", flush=True)
    return size


def decode(args, gen, tok, questions, seeds, device, rank):
    """(the answers as they finish, (i, answer), on --engine; the identity of the weights)."""
    if args.engine == "ours":
        model, identity = load_model(args.model, args.adapter, args.dtype, args.merge, device,
                                     args.other_base)
        slots = args.batch_size or batch_for(model, gen, device, len(questions), rank)
        return stream(model, tok, questions, gen, slots, seeds,
                      dict(mode="reduce-overhead") if args.compile else None), identity
    if args.adapter:
        check_base(args.model, args.adapter, args.other_base)
    dtype = args.dtype or Qwen2Config.from_pretrained(args.model).torch_dtype
    identity = dict(model=model_identity(args.model), merged=False, dtype=dtype, engine="vllm",
                    adapter=adapter_identity(args.adapter) if args.adapter else None)
    if not questions:
        return iter(()), identity
    programs, max_len = programs_for(tok, questions, gen)
    llm, lora = vllm_load(args.model, args.adapter, args.dtype, args.tensor_parallel,
                                 max_len, args.seed)
    return vllm_run(llm, programs, seeds, gen.temperature, gen.top_p, lora), identity


def cmd_run(args):
    """Set-up (benchmarks read, the output claimed), the answers not yet on disk decoded and
    graded on this rank, then samples.jsonl and results.json from every rank's answers."""
    rank, world, device = setup_dist()
    gen = config_from_flags(GenConfig, args)
    if args.engine == "vllm":
        if world > 1 or args.merge:
            raise ValueError("--engine vllm runs in one process (--tensor-parallel N spreads the "
                             "model over N GPUs) and takes the adapter unmerged (export.py writes "
                             "a merged model for --model): no torchrun, no --merge")
        need_vllm()
    benches = read_benches(args)
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter,
                         **{f"--bench {n}": p for n, p, _ in benches}})
    tok = load_tokenizer(args.model, args.tokenizer)
    n_samples = args.samples_per_problem if gen.temperature > 0 else 1
    settings = run_settings(args, gen, benches, tok, n_samples)
    if rank == 0:
        start_run(args.out, "run.json", settings, lambda n: n in RUN_FILES or re.fullmatch(
            r"samples\.rank-\d{5}\.jsonl", n), args.overwrite, "eval.py run",
                  ignore=("batch_size",))  # greedy run.json files of earlier versions had it
    torch.distributed.barrier()
    jobs = [(benches[b][0], it, k) for b, (_, _, items) in enumerate(benches) for it in items
            for k in range(n_samples)]
    done = finished_records(args.out, rank)
    torch.distributed.barrier()  # every rank has read the same finished answers
    key = lambda job: (job[0], job[1]["id"], job[2])
    # what is left, every world-th on this rank; an answer depends on its problem and its seed
    # alone (engine.py), so the same for any number of processes, slots or interruptions
    todo = [j for j in jobs if key(j) not in done][rank::world]
    answers, identity = decode(args, gen, tok, [it["question"] for _, it, _ in todo],
                               [sequence_seed(args.seed, *key(j)) for j in todo], device, rank)
    grade_as_they_come(args.out, todo, answers, rank)
    torch.distributed.barrier()
    if rank == 0:
        done = finished_records(args.out)
        records = [regrade(done[(name, it["id"], k)], it) for name, it, k in jobs]
        changed = sum(r.pop("regraded") for r in records)
        if changed:  # answers graded by an earlier version of grading.py
            print(f"eval: {changed} answers graded anew: this version of the grader differs from "
                  "the one that graded them first")
        write_results(args.out, benches, records, settings, identity)
        for f in glob.glob(os.path.join(args.out, "samples.rank-*.jsonl")):
            os.remove(f)  # all of it is in samples.jsonl now
    torch.distributed.barrier()
    cleanup_dist()


def read_benches(args):
    """[(name, path, items)] of the --bench NAME=PATH flags, each benchmark once, --limit
    applied."""
    benches = []
    for spec in args.bench:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--bench {spec!r}: expected NAME=PATH with NAME one of "
                             f"{list(BENCHMARKS)}")
        if name in [n for n, _, _ in benches]:
            raise SystemExit(f"--bench {spec!r}: {name} is given twice (each benchmark once)")
        items = load_benchmark(name, path, args.zip_password)
        benches.append((name, path, items[:args.limit] if args.limit else items))
    return benches


def grade_as_they_come(out, todo, answers, rank):
    """Each answer graded as it finishes and appended (flushed) to this rank's samples file."""
    bar = tqdm(total=len(todo), desc=f"eval rank {rank}", disable=rank != 0, file=sys.stderr)
    t0, n_tok = time.time(), 0
    with AppendLog(os.path.join(out, f"samples.rank-{rank:05d}.jsonl")) as part:
        for i, o in answers:
            name, it, k = todo[i]
            pred, correct, error = grade_sample(name, o["generation"], it["gold"], it["question"])
            # GPQA's authors ask that its questions never be written out
            rec = dict(benchmark=name, id=it["id"], sample=k, gold=it["gold"], extracted=pred,
                       correct=correct, grading_error=error, **o,
                       question=None if name == "gpqa" else it["question"])
            part.write(json.dumps(rec) + "\n")
            part.flush()  # each finished answer is on disk before the next
            n_tok += o["thinking_tokens"] + o["answer_tokens"]
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
    bar.close()


def write_results(out, benches, records, settings, identity):
    results = {}
    for name, path, items in benches:
        rs = [r for r in records if r["benchmark"] == name]
        per_problem = {}
        for r in rs:
            per_problem.setdefault(r["id"], []).append(float(r["correct"]))
        scores = [sum(v) / len(v) for v in per_problem.values()]
        bad = [r["id"] for r in rs if r.get("grading_error")]
        results[name] = dict(
            path=os.path.abspath(path), problems=len(items), samples=len(rs),
            accuracy=sum(scores) / len(scores) if scores else None, ci95=accuracy_ci(scores),
            per_problem={k: sum(v) / len(v) for k, v in per_problem.items()},
            unparseable=sum(r["extracted"] is None for r in rs),
            ungradeable=len(bad), ungradeable_ids=bad,
            thinking_truncated=sum(r["thinking_truncated"] for r in rs),
            answer_truncated=sum(r["answer_truncated"] for r in rs),
            mean_thinking_tokens=sum(r["thinking_tokens"] for r in rs) / max(1, len(rs)))
    write_atomic(os.path.join(out, "samples.jsonl"),
                 "".join(json.dumps({k: r.get(k) for k in SAMPLE_KEYS}) + "\n" for r in records))
    write_json(os.path.join(out, "results.json"),
               dict(results=results, protocol=settings["generation"]["protocol"],
                    settings=settings, identity=identity, code=code_version()))
    for name, r in results.items():
        lo, hi = r["ci95"]
        print(f"{name}: accuracy {r['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] on {r['problems']} "
              f"problems | unparseable {r['unparseable']} | ungradeable {r['ungradeable']} | "
              f"thinking truncated {r['thinking_truncated']} | mean thinking "
              f"{r['mean_thinking_tokens']:.0f} tokens")


# -----------------------------------------------------------------------------
# compare: the recovery table


def recovery_table(base, full, lora, n=1000, seed=0, intersect=False):
    """{benchmark: accuracies, recovery = (lora - base) / (full - base), and a paired bootstrap 95%
    interval}. Arguments are results.json dicts. The three runs must have graded the same
    problems of the same benchmarks; with intersect, each benchmark the three share is compared on
    the problems they share, accuracies and interval alike."""
    runs = dict(base=base, full=full, lora=lora)
    names = [b for b in base["results"] if all(b in r["results"] for r in runs.values())]
    others = sorted({b for r in runs.values() for b in r["results"]} - set(names))
    if others and not intersect:
        raise ValueError(f"benchmarks {others} are missing from some of the runs; pass --intersect "
                         "to compare the ones all three have")
    table = {}
    for name in names:
        files = {k: bench_file(r, name) for k, r in runs.items()}
        if len({f for f in files.values() if f}) > 1:
            raise ValueError(f"{name}: the runs read different benchmark files ("
                             + ", ".join(f"{k} sha256 {f[:12]}" for k, f in files.items() if f)
                             + "); compare runs on the same file")
        per = {k: r["results"][name]["per_problem"] for k, r in runs.items()}
        ids = sorted(set(per["base"]) & set(per["full"]) & set(per["lora"]))
        if not ids:
            raise ValueError(f"{name}: the three runs share no problem")
        if not intersect and any(len(p) != len(ids) for p in per.values()):
            counts = ", ".join(f"{k} {len(p)}" for k, p in per.items())
            raise ValueError(f"{name}: the runs graded different problems ({counts}, {len(ids)} in "
                             "common); pass --intersect to compare on the common ones")
        acc = {k: sum(p[i] for i in ids) / len(ids) for k, p in per.items()}
        gain = acc["full"] - acc["base"]
        rec = (acc["lora"] - acc["base"]) / gain if gain else None

        def recovery(pick):  # the same resampled problems for all three runs (paired)
            sb, sf, sl = (sum(per[k][ids[i]] for i in pick) / len(pick)
                          for k in ("base", "full", "lora"))
            return (sl - sb) / (sf - sb) if sf != sb else None
        ci = bootstrap_ci(recovery, [len(ids)], n, seed, min_kept=20)
        table[name] = dict(base=acc["base"], full=acc["full"], lora=acc["lora"], gain=gain,
                           recovery=rec, recovery_ci95=ci, problems=len(ids))
    return table


def bench_file(results, name):
    """The sha256 of the file a results.json's benchmark `name` was read from (GPQA: with its
    option order), or None for results that do not record it."""
    for b in results.get("settings", {}).get("benchmarks", []):
        if b.get("name") == name:
            return b["file"]["sha256"] + str(b.get("option_order", ""))
    return None


def read_results(run_dir):
    """A run's results.json; a problem id that stands twice in a per_problem table is an error."""
    f = os.path.join(run_dir, "results.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} not found (run `eval.py run --out {run_dir}` first)")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"{f}: duplicate problem ids {dup[:3]}")
        return dict(pairs)
    with open(f, encoding="utf-8") as fh:
        try:
            return json.load(fh, object_pairs_hook=unique)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None


def cmd_compare(args):
    if args.out:
        check_out(args.out, {"base": args.base, "full": args.full, "lora": args.lora})
        fresh_outputs([args.out], args.overwrite)
    runs = [read_results(d) for d in (args.base, args.full, args.lora)]
    table = recovery_table(*runs, intersect=args.intersect)
    protocols = dict(zip(("base", "full", "lora"), (r.get("protocol", "s1") for r in runs)))
    print("protocols: " + ", ".join(f"{k} {v}" for k, v in protocols.items()))
    if protocols["base"] != "plain":
        print("warning: the base was not run with --protocol plain: s1 evaluated "
              "Qwen2.5-32B-Instruct with plain generation, so this recovery is not the paper's "
              "(a base forced into the think format can score lower and inflate recovery)")
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}"
    print(f"{'benchmark':10s} {'base':>6s} {'full':>6s} {'lora':>6s} {'recovery %':>11s} "
          f"{'95% CI':>16s} problems")
    for name, r in table.items():
        lo, hi = r["recovery_ci95"]
        print(f"{name:10s} {fmt(r['base']):>6s} {fmt(r['full']):>6s} {fmt(r['lora']):>6s} "
              f"{fmt(r['recovery']):>11s} {'[' + fmt(lo) + ', ' + fmt(hi) + ']':>16s} "
              f"{r['problems']}")
    for name, r in table.items():  # who loses answers to the grader's extraction
        res = [run["results"][name] for run in runs]
        r["unparseable"] = {k: x.get("unparseable", 0) / max(1, x.get("samples", 1))
                            for k, x in zip(("base", "full", "lora"), res)}
        print(f"{name}: no answer found in " + ", ".join(
            f"{k} {fmt(v)}%" for k, v in r["unparseable"].items()))
    if args.out:
        write_json(args.out, dict(base=args.base, full=args.full, lora=args.lora,
                                  intersect=args.intersect, protocols=protocols, table=table))
    return table


# -----------------------------------------------------------------------------
# CLI


def parser():
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="generate and grade")
    add_model_flags(r)
    r.add_argument("--zip-password", help="password of a GPQA zip")
    r.add_argument("--seed", type=number(int, "seed"), default=0,
                   help="seeds the sampling: a sample's noise comes from (seed, benchmark, "
                   "problem, sample)")
    r.add_argument("--bench", action="append", required=True,
                   help="NAME=PATH, NAME in " + ", ".join(BENCHMARKS))
    r.add_argument("--out", required=True, help="run directory: run.json, samples.jsonl, "
                   "results.json")
    r.add_argument("--merge", action="store_true",
                   help="merge the adapter into the weights before decoding")
    r.add_argument("--limit", type=number(int, "nonnegative"), default=0,
                   help="first N problems of each benchmark (0: all)")
    r.add_argument("--batch-size", type=number(int, "nonnegative"), default=0,
                   help="questions decoding together, each in a slot that takes the next "
                   "question when its answer is done (0: as many as fit in the device's memory "
                   "at --max-context; one line says how many)")
    r.add_argument("--engine", choices=("ours", "vllm"), default="ours",
                   help="what decodes: engine.py, or vLLM where it is installed (one process; "
                   "--tensor-parallel GPUs; see engine.py)")
    r.add_argument("--tensor-parallel", type=number(int, "positive"), default=1,
                   help="--engine vllm: GPUs one model copy spreads over")
    r.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile, mode reduce-overhead: a CUDA "
                   "graph per cache bucket); the first steps of each bucket wait for the compiler")
    r.add_argument("--samples-per-problem", type=number(int, "positive"), default=1,
                   help="answers per problem when sampling (--temperature > 0); accuracy is "
                   "their mean")
    r.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run with other settings")
    add_config_flags(r, GenConfig, choices=dict(protocol=PROTOCOLS))
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="recovery table: (lora - base) / (full - base)")
    c.add_argument("base", help="the base model's run directory (eval.py run --out)")
    c.add_argument("full", help="the full finetune's run directory")
    c.add_argument("lora", help="the rank-1 adapter's run directory")
    c.add_argument("--out", help="also write the table to this JSON file")
    c.add_argument("--overwrite", action="store_true", help="replace the --out file")
    c.add_argument("--intersect", action="store_true",
                   help="compare on the problems (and benchmarks) all three runs share")
    c.set_defaults(func=cmd_compare)

    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("eval.py"):
        return args.func(args)


if __name__ == "__main__":
    main()
