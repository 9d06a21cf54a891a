"""
Benchmarks as s1 evaluates them (AIME24/25, MATH500, GPQA-Diamond), the recovery table, and
adapter ablations.

    # generate and grade (--adapter DIR [--merge] for the LoRA; torchrun splits problems over GPUs);
    # the base model as s1 evaluated it: --protocol plain
    python eval.py run --model /models/Qwen2.5-32B-Instruct --protocol plain --out results/base \\
        --bench math500=data/math500/test.jsonl --bench aime24=data/aime24/test.jsonl \\
        --bench gpqa=data/gpqa_diamond_mcq.zip --zip-password ...
    torchrun --standalone --nproc_per_node=8 eval.py run --model ... --adapter runs/rank1/adapter \\
        --out results/lora ...
    # (lora - base) / (full - base) per benchmark, with bootstrap intervals
    python eval.py compare results/base results/full results/lora
    # KL(full adapter || ablated) and the reverse, per layer / block / adapter / type
    python eval.py ablate --model ... --adapter runs/rank1/adapter \\
        --samples results/lora/samples.jsonl --out results/ablate

Protocols (docs/paper.md section C). s1 (the fine-tunes): chat prompt + `<|im_start|>think`; think
until `<|im_start|>` (or <|im_end|>) or the thinking budget (auto = max context - prompt -
len(FINAL_ANSWER) - 100, s1's formula); then `<|im_start|>answer` (with `\\nFinal Answer:` when
the budget ran out) and the answer until <|im_end|>, in all the context thinking left. --wait N
replaces an early end of thinking by "Wait" up to N times (budget forcing). plain (s1's runs of
Qwen2.5-32B-Instruct): the chat prompt and one answer up to the context limit, graded on the
whole output.
Greedy by default; --temperature > 0 samples --samples-per-problem answers with --seed (pass@1
averaged). Problems are cut into fixed batches and batch i runs on rank i % world, so results do
not depend on the number of processes. Each finished batch is appended to its rank's
samples.rank-NNNNN.jsonl; a rerun into the same --out (same run.json) skips what is done, and the
end result is what an uninterrupted run writes. Grading is local (grading.py) and never stops a
run (a failure is an ungradeable answer, listed); GPQA answers that name no letter count as
wrong (the official harness defaulted them to "A") and are counted.
"""
import argparse
import csv
import glob
import json
import math
import os
import random
import re
import sys
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import (DTYPES, AppendLog, Parser, add_config_flags, bootstrap_ci, check_numbers,
                    check_out, cleanup_dist, code_version, config_from_flags, file_identity,
                    fresh_outputs, model_identity, number, read_log, setup_dist, start_run,
                    user_errors, write_atomic, write_json)
from dashboard import ablation_html
from data import (ANSWER, FINAL_ANSWER, THINK, Tokenizer, read_rows, render_chat, s1_example,
                  s1_prompt)
from grading import BENCHMARKS, extract_answer, extract_letter, grade
from lora import ATTN, MLP, SITE_ORDER, ablate, adapter_identity, load_model, sites

# -----------------------------------------------------------------------------
# benchmark files


# GPQA's option order is a property of the benchmark, not of a run: lm-eval seeds Python's random
# with 0 before its process_docs shuffles each row's options (s1's gpqa_diamond_openai task)
GPQA_OPTION_SEED = 0


def gpqa_option_order(path):
    """Where a GPQA file's option order comes from (run.json records it)."""
    if path.endswith(".csv"):
        return ("s1's: [Incorrect 1-3, Correct] shuffled per row by "
                f"random.Random({GPQA_OPTION_SEED})")
    return "the file's own (options already in the question text; s1's order needs the CSV)"


def load_benchmark(name, path, password=None):
    """[{id, question, gold}] from a benchmark file; errors name the file, line and field."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    if name == "gpqa":
        items, where = _load_gpqa(path, password)
    else:
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
    first = {}
    for it, w in zip(items, where):
        if it["id"] in first:
            raise ValueError(f"{w}: problem id {it['id']!r} is already used at {first[it['id']]}")
        first[it["id"]] = w
    return items


def _load_gpqa(path, password):
    """GPQA-Diamond: the MCQ jsonl ({question with options, answer letter}), optionally inside a
    password-protected zip, or the original CSV (Question, Correct Answer, Incorrect Answer 1-3),
    whose options are ordered as s1's harness orders them. An MCQ file keeps its own order: it no
    longer says which option was which incorrect answer, so s1's order cannot be rebuilt from it
    (the zip beside this project agrees with s1's order on 38 of 198 rows)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such benchmark file")
    if path.endswith(".zip"):
        try:
            z = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not a readable zip file ({e})") from None
        with z:
            member = next((n for n in z.namelist() if n.endswith(".jsonl")), None)
            if member is None:
                raise ValueError(f"{path}: no .jsonl member")
            # a wrong password fails zipfile's one-byte check ("Bad password"), or, one time in
            # 256, passes it and yields garbage: a zlib error, a bad CRC or text that is not UTF-8
            try:
                text = z.read(member, pwd=password.encode() if password else None).decode()
            except (RuntimeError, zlib.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: cannot decrypt {member}: wrong or missing "
                                 f"--zip-password ({type(e).__name__})") from None
        # split at "\n" only: str.splitlines would also split at a \u2028 inside a string
        lines = [(n, l) for n, l in enumerate(text.split("\n"), 1) if l.strip()]
        rows = []
        for n, l in lines:
            try:
                rows.append((json.loads(l), f"{path}:{member} line {n}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{member} line {n}: not valid JSON ({e.msg})") from None
    elif path.endswith(".csv"):
        # s1's gpqa_diamond_openai task: per row, in file order, the list [Incorrect Answer 1-3,
        # Correct Answer] shuffled by Python's random seeded with lm-eval's seed (0), and the
        # question and options as they are in the file
        with open(path, newline="", encoding="utf-8") as f:
            rng = random.Random(GPQA_OPTION_SEED)
            rows = []
            for n, r in enumerate(csv.DictReader(f), 2):
                need = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                        "Incorrect Answer 3"]
                miss = [k for k in need if not r.get(k)]
                if miss:
                    raise ValueError(f"{path} line {n}: missing field {miss[0]!r}")
                choices = [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)] + [r["Correct Answer"]]
                rng.shuffle(choices)
                listing = "\n".join(f"{'ABCD'[j]}) {c}" for j, c in enumerate(choices))
                rows.append(({"question": r["Question"] + "\n\n" + listing,
                              "answer": "ABCD"[choices.index(r["Correct Answer"])],
                              "id": r.get("Record ID", n)}, f"{path} line {n}"))
    else:
        rows = list(zip(*read_rows(path)))
    items = []
    for i, (r, w) in enumerate(rows):
        for k in ("question", "answer"):
            if k not in r:
                raise ValueError(f"{w}: missing field {k!r}")
        if str(r["answer"]).strip().upper() not in ("A", "B", "C", "D"):
            raise ValueError(f"{w}: field 'answer' must be a letter A-D")
        items.append(dict(id=str(r.get("id", i)), question=r["question"],
                          gold=str(r["answer"]).strip().upper()))
    return items, [w for _, w in rows]


# -----------------------------------------------------------------------------
# the s1 generation protocol

PROTOCOLS = ("s1", "plain", "completion")


@dataclass
class GenConfig:
    """How eval.py generates: the protocol, its budgets, budget forcing and sampling."""
    protocol: str = "s1"          # s1: think, then answer; plain: one chat answer (s1's base runs);
    #                               completion: --template filled with the question, no chat turn
    template: str = "{question}"  # completion's prompt text ("Problem: {question}\nSolution:\n")
    max_context: int = 32768      # prompt + all generated tokens (s1: max_gen_toks, the context)
    thinking_budget: int = 0      # 0: auto = max_context - prompt - len(FINAL_ANSWER) - reserve
    answer_reserve: int = 100     # what auto leaves for the answer at least (s1's 100)
    max_answer_tokens: int = 0    # a cap on the answer (0: all that thinking left, as s1)
    wait: int = 0                 # budget forcing: an early end of thinking -> "Wait", N times
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0

    RANGES = dict(max_context="positive", top_p="unit", thinking_budget="nonnegative",
                  answer_reserve="nonnegative", max_answer_tokens="nonnegative",
                  wait="nonnegative", temperature="nonnegative")

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, "
                             f"got {self.protocol!r}")
        check_numbers(self)
        if "{question}" not in self.template:
            raise ValueError(f"--template must contain {{question}}, got {self.template!r}")


def generate(model, tok, questions, cfg, generator=None):
    """Answers to a batch of questions under cfg.protocol: one dict per question."""
    if cfg.protocol == "s1":
        return s1_generate(model, tok, questions, cfg, generator)
    if cfg.protocol == "plain":
        texts = [render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
                 for q in questions]
    else:  # completion: the text a base model saw in pretraining, e.g. a textbook's page
        texts = [cfg.template.replace("{question}", q) for q in questions]
    return plain_generate(model, tok, [tok.encode(t) for t in texts], cfg, generator)


def plain_generate(model, tok, prompts, cfg, generator=None):
    """One generation from each prompt (token ids) up to the context limit (or
    --max-answer-tokens); the answer is read from the whole output. With the chat template this is
    s1's base-model protocol."""
    budgets = [cfg.max_context - len(p) for p in prompts]
    if cfg.max_answer_tokens:
        budgets = [min(b, cfg.max_answer_tokens) for b in budgets]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens fills --max-context")
    outs = model.generate(prompts, max(budgets), temperature=cfg.temperature, top_p=cfg.top_p,
                          stop_ids=[tok.im_end, tok.eot], generator=generator)
    res = []
    for o, budget in zip(outs, budgets):
        o = o[:budget]
        ended = bool(o) and o[-1] in (tok.im_end, tok.eot)
        res.append(dict(generation=tok.decode(o[:-1] if ended else o), thinking_tokens=0,
                        answer_tokens=len(o), thinking_truncated=False, answer_truncated=not ended))
    return res


def s1_generate(model, tok, questions, cfg, generator=None):
    """Two-phase s1 generation for a batch of questions (cfg: a GenConfig); a dict per question.

    With P the prompt (chat template + think marker) and F = FINAL_ANSWER, in tokens:
        thinking budget (auto) = max_context - |P| - |F| - answer_reserve    (s1's "auto")
        answer budget = max_context - |P| - |thinking| - |answer head|, capped by max_answer_tokens
    so the answer may use all that thinking left of the context, as s1's second call may."""
    stops = [tok.im_start, tok.im_end, tok.eot]
    prompts = [tok.encode(s1_prompt(q)) for q in questions]
    reserve = len(tok.encode(FINAL_ANSWER)) + cfg.answer_reserve
    auto = cfg.thinking_budget <= 0
    budgets = [cfg.max_context - len(p) - reserve if auto else cfg.thinking_budget for p in prompts]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no thinking budget "
                         "within --max-context")
    think = [[] for _ in prompts]
    natural = [False] * len(prompts)
    waits_left = [cfg.wait] * len(prompts)
    todo = list(range(len(prompts)))
    wait_ids = tok.encode("Wait")
    while todo:
        outs = model.generate([prompts[i] + think[i] for i in todo],
                              max(budgets[i] - len(think[i]) for i in todo),
                              temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stops,
                              generator=generator)
        nxt = []
        for i, o in zip(todo, outs):
            o = o[:budgets[i] - len(think[i])]  # a batch shares one length: cut each to its budget
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
        heads.append(ANSWER if natural[i] else ("" if text.endswith("\n") else "\n") + FINAL_ANSWER)
    inputs = [p + t + tok.encode(h) for p, t, h in zip(prompts, think, heads)]
    room = [cfg.max_context - len(x) for x in inputs]
    if cfg.max_answer_tokens:
        room = [min(r, cfg.max_answer_tokens) for r in room]
    if min(room) < 1:
        raise ValueError("a prompt and its thinking leave no room for the answer within "
                         "--max-context (set --thinking-budget lower)")
    answers = model.generate(inputs, max(room), temperature=cfg.temperature, top_p=cfg.top_p,
                             stop_ids=[tok.im_end, tok.eot], generator=generator)
    res = []
    for i, a in enumerate(answers):
        a = a[:room[i]]  # a batch shares one length: cut each to its room
        ended = bool(a) and a[-1] in (tok.im_end, tok.eot)
        gen = THINK + tok.decode(think[i]) + heads[i] + tok.decode(a[:-1] if ended else a)
        res.append(dict(generation=gen, thinking_tokens=len(think[i]), answer_tokens=len(a),
                        thinking_truncated=not natural[i], answer_truncated=not ended))
    return res


# -----------------------------------------------------------------------------
# run


def accuracy_ci(scores, seed=0):
    """95% bootstrap interval of the mean of per-problem scores."""
    if not scores:
        return [None, None]
    return bootstrap_ci(lambda i: sum(scores[j] for j in i) / len(i), [len(scores)], seed=seed)


def grade_sample(bench, generation, gold, question=None):
    """(extracted answer, correct, error). Grading never raises: an answer the grader fails on is
    ungradeable, counted as wrong and reported with its id (results.json). GPQA's question lets
    an answer that restates one option's text count as that option."""
    try:
        pred = (extract_letter(generation, question) if bench == "gpqa"
                else extract_answer(generation))
        return pred, grade(bench, generation, gold, question), None
    except Exception as e:  # e.g. RecursionError on a degenerate answer: never lose the run
        return None, False, f"{type(e).__name__}: {str(e)[:200]}"


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
                generation=asdict(gen), batch_size=args.batch_size, seed=args.seed,
                samples_per_problem=n_samples)


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


def cmd_run(args):
    rank, world, device = setup_dist()
    gen = config_from_flags(GenConfig, args)
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
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter,
                         **{f"--bench {n}": p for n, p, _ in benches}})
    tok = Tokenizer(args.tokenizer or args.model)
    n_samples = args.samples_per_problem if gen.temperature > 0 else 1
    settings = run_settings(args, gen, benches, tok, n_samples)
    if rank == 0:
        start_run(args.out, "run.json", settings, lambda n: n in RUN_FILES or re.fullmatch(
            r"samples\.rank-\d{5}\.jsonl", n), args.overwrite, "eval.py run")
    torch.distributed.barrier()
    model, identity = load_model(args.model, args.adapter, args.dtype, args.merge, device,
                                 args.other_base)
    jobs = [(benches[b][0], it, k) for b, (_, _, items) in enumerate(benches) for it in items
            for k in range(n_samples)]
    # fixed batches, batch i on rank i % world, seeded per batch: the same answers for any world
    # size, and for a run that was killed and continued
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    done = finished_records(args.out, rank)
    mine = [(bi, batch) for bi, batch in enumerate(batches) if bi % world == rank
            and not all((name, it["id"], k) in done for name, it, k in batch)]
    bar = tqdm(total=sum(len(b) for _, b in mine), desc=f"eval rank {rank}", disable=rank != 0,
               file=sys.stderr)
    t0, n_tok = time.time(), 0
    part_file = os.path.join(args.out, f"samples.rank-{rank:05d}.jsonl")
    with AppendLog(part_file) as part:
        for bi, batch in mine:
            g = torch.Generator(device=device).manual_seed(args.seed + bi)
            outs = generate(model, tok, [it["question"] for _, it, _ in batch], gen, g)
            lines = []
            for (name, it, k), o in zip(batch, outs):
                pred, correct, error = grade_sample(name, o["generation"], it["gold"],
                                                    it["question"])
                # GPQA's authors ask that its questions never be written out
                rec = dict(benchmark=name, id=it["id"], sample=k, gold=it["gold"], extracted=pred,
                           correct=correct, grading_error=error, **o,
                           question=None if name == "gpqa" else it["question"])
                lines.append(json.dumps(rec) + "\n")
                n_tok += o["thinking_tokens"] + o["answer_tokens"]
            part.write("".join(lines))
            part.flush()  # each finished batch is on disk before the next starts
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
    bar.close()
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
# ablations


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
        for r, w in list(zip(rows, where))[:args.max_sequences]:
            q = r.get("question") or qs.get((r.get("benchmark"), str(r.get("id"))))
            if q is None:
                raise SystemExit(f"ablate: {w} has no question (GPQA samples): pass "
                                 "--bench gpqa=PATH")
            prompt = tok.encode(render_chat([{"role": "user", "content": q}],
                                            add_generation_prompt=True))
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
    if not (torch.isfinite(logp).all() and torch.isfinite(ref_logp).all()):
        raise ValueError(f"ablate: non-finite logits with {sel} switched off (NaN or inf in the "
                         "weights or activations; try --dtype float32)")
    p_ref, p = ref_logp.exp(), logp.exp()
    kl_fa = (p_ref * (ref_logp - logp)).sum(-1)  # (T,)
    kl_af = (p * (logp - ref_logp)).sum(-1)
    m = torch.tensor(mask[1:] + [0], dtype=torch.bool, device=kl_fa.device)
    avg = lambda v, w: (v[w].mean().item() if w.any() else float("nan"))
    allm = torch.ones_like(m)
    return dict(kl_full_abl_assistant=avg(kl_fa, m), kl_abl_full_assistant=avg(kl_af, m),
                kl_full_abl_all=avg(kl_fa, allm), kl_abl_full_all=avg(kl_af, allm),
                kl_full_abl_assistant_maxpos=kl_fa[m].max().item() if m.any() else float("nan"))


def ablation_pass(model, seqs, sets, desc="ablate"):
    """{experiment: [row]} for sets {experiment: [(label, selection)]}: each row holds the mean,
    std and max over the sequences of every kl_stats value."""
    device = model.lm_head.weight.device
    per = {e: {lab: [] for lab, _ in s} for e, s in sets.items()}
    for _, ids, mask in tqdm(seqs, desc=desc, file=sys.stderr):
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            ref = torch.log_softmax(model(x).float(), dim=-1)[0]
        for e, s in sets.items():
            for lab, sel in s:
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
                row.update({f"{k}_mean": mean, f"{k}_std": std,
                            f"{k}_max": max(v) if v else float("nan")})
            results[e].append(row)
    return results


def greedy_ablation(model, seqs, metric, single=None, order="rescore"):
    """The official iterative MLP ablation (iterative_mlp_ablation_by_matrix.py): MLP adapters are
    switched off one at a time, always the one whose removal, on top of those already off, raises
    `metric` least (mean over the sequences; the paper's max_kl is kl_full_abl_assistant_maxpos;
    ties in site order). Every remaining adapter is re-scored against the current state at each
    step: n(n+1)/2 adapter-sets for n adapters, the first n of them the single ablations, reused
    from `single` (the "single" experiment's rows) when it ran. order="fixed" is a cheaper
    variant (n passes after the scores): one order from the single scores, applied cumulatively.
    -> (single score rows, cumulative rows with n_ablated and the site added)."""
    mlp = [(l, t) for l, t in sites(model) if t in MLP]
    labels = [f"L{l}.{t}" for l, t in mlp]
    known = {r["label"]: r for r in single or []}
    if all(lab in known for lab in labels):
        scores = [known[lab] for lab in labels]
    else:
        sets = {"score": [(lab, dict(sites=[s])) for lab, s in zip(labels, mlp)]}
        scores = ablation_pass(model, seqs, sets, "greedy: score")["score"]
    least = lambda rows, idx: min(idx, key=lambda i: (rows[i][f"{metric}_mean"], i))
    if order == "fixed":
        ranked = sorted(range(len(mlp)), key=lambda i: (scores[i][f"{metric}_mean"], i))
        steps = [(f"+{labels[i]}", dict(sites=[mlp[j] for j in ranked[:n + 1]]))
                 for n, i in enumerate(ranked)]
        cumulative = ablation_pass(model, seqs, {"greedy": steps}, "greedy: cumulative")["greedy"]
    else:
        first = least(scores, range(len(mlp)))
        ranked, cumulative = [first], [dict(scores[first])]
        while len(ranked) < len(mlp):
            left = [i for i in range(len(mlp)) if i not in ranked]
            sets = {"step": [(f"+{labels[i]}", dict(sites=[mlp[j] for j in ranked + [i]]))
                             for i in left]}
            rows = ablation_pass(model, seqs, sets, f"greedy: step {len(ranked) + 1}")["step"]
            k = least(rows, range(len(left)))
            ranked.append(left[k])
            cumulative.append(rows[k])
    for n, row in enumerate(cumulative):
        row.update(label=f"+{labels[ranked[n]]}", n_ablated=n + 1, added=labels[ranked[n]])
    return scores, cumulative


def cmd_ablate(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.adapter:
        raise SystemExit("ablate: --adapter is required")
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter,
                         "--samples": args.samples, "--s1": args.s1})
    outputs = [os.path.join(args.out, f) for f in ("ablations.json", "ablations.html")]
    fresh_outputs(outputs, args.overwrite)
    tok = Tokenizer(args.tokenizer or args.model)
    model, identity = load_model(args.model, args.adapter, args.dtype, device=device,
                                 other_base=args.other_base)
    seqs = ablation_sequences(args, tok)
    made_from = dict(samples=file_identity(args.samples) if args.samples else None,
                     s1=file_identity(args.s1) if args.s1 else None, max_tokens=args.max_tokens,
                     max_sequences=args.max_sequences, s1_rows=args.s1_rows, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    sets = ablation_sets(model, args.block)
    chosen = [e for e in args.experiments.split(",") if e]
    unknown = [e for e in chosen if e not in sets and e != "greedy"]
    if unknown:
        raise SystemExit(f"ablate: unknown experiments {unknown}; expected some of "
                         f"{list(sets) + ['greedy']}")
    results = ablation_pass(model, seqs, {e: sets[e] for e in ["none"] + chosen if e in sets})
    if "greedy" in chosen:
        made_from["greedy_metric"] = args.greedy_metric
        made_from["greedy_order"] = args.greedy
        results["greedy_score"], results["greedy"] = greedy_ablation(
            model, seqs, args.greedy_metric, results.get("single"), args.greedy)
    out = dict(identity=identity, made_from=made_from, sequences=[s[0] for s in seqs],
               tokens=sum(len(s[1]) for s in seqs), sites=[list(s) for s in sites(model)],
               results=results)
    write_json(os.path.join(args.out, "ablations.json"), out)
    write_atomic(os.path.join(args.out, "ablations.html"), ablation_html(out))
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
    return out


# -----------------------------------------------------------------------------
# CLI


def add_model_flags(p, adapter_required=False):
    """--model, --adapter, --tokenizer, --dtype: what load_model and the tokenizer need."""
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--adapter", required=adapter_required, help="PEFT adapter directory")
    p.add_argument("--other-base", action="store_true",
                   help="use an adapter trained on another base than --model")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")


def parser():
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_flags(s):
        add_model_flags(s)
        s.add_argument("--zip-password", help="password of a GPQA zip")
        s.add_argument("--seed", type=number(int, "seed"), default=0,
                       help="seeds the sampling of batch i with seed + i (run); --s1 rows (ablate)")

    r = sub.add_parser("run", help="generate and grade")
    model_flags(r)
    r.add_argument("--bench", action="append", required=True,
                   help="NAME=PATH, NAME in " + ", ".join(BENCHMARKS))
    r.add_argument("--out", required=True, help="run directory: run.json, samples.jsonl, "
                   "results.json")
    r.add_argument("--merge", action="store_true",
                   help="merge the adapter into the weights before decoding")
    r.add_argument("--limit", type=number(int, "nonnegative"), default=0,
                   help="first N problems of each benchmark (0: all)")
    r.add_argument("--batch-size", type=number(int, "positive"), default=8,
                   help="questions generated together")
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

    a = sub.add_parser("ablate", help="KL of ablated vs full adapter")
    model_flags(a)
    a.add_argument("--samples", help="samples.jsonl from `eval.py run` (held-out generations)")
    a.add_argument("--bench", action="append",
                   help="NAME=PATH to recover the questions of --samples")
    a.add_argument("--s1", help="s1K-1.1 rows to add (training sequences)")
    a.add_argument("--s1-rows", type=number(int, "positive"), default=16,
                   help="training rows drawn from --s1 (seeded by --seed)")
    a.add_argument("--max-sequences", type=number(int, "positive"), default=16,
                   help="first N generations of --samples")
    a.add_argument("--max-tokens", type=number(int, "positive"), default=4096,
                   help="each sequence cut to this many tokens")
    a.add_argument("--block", type=number(int, "positive"), default=8,
                   help="layers per block ablation")
    a.add_argument("--experiments", default="layer,block,single,type,mlp_vs_attn,greedy",
                   help="comma-separated, among layer, block, single, type, mlp_vs_attn, greedy")
    a.add_argument("--greedy-metric", default="kl_full_abl_assistant_maxpos",
                   choices=["kl_full_abl_assistant_maxpos", "kl_full_abl_assistant"],
                   help="what scores each MLP adapter in the greedy ablation (the paper's max_kl: "
                   "the mean over sequences of the largest KL at one position)")
    a.add_argument("--greedy", default="rescore", choices=["rescore", "fixed"],
                   help="rescore (the official): every remaining MLP adapter re-scored against "
                   "the current state at each step, n(n+1)/2 sets; fixed: one order from the "
                   "single scores, n sets")
    a.add_argument("--out", required=True, help="directory for ablations.json and ablations.html")
    a.add_argument("--overwrite", action="store_true", help="replace ablations.* in --out")
    a.set_defaults(func=cmd_ablate)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("eval.py"):
        return args.func(args)


if __name__ == "__main__":
    main()
