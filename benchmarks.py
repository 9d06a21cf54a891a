"""
The benchmark files as s1 evaluates them: AIME24/25 and MATH500 (jsonl or parquet rows with a
problem and an answer) and GPQA-Diamond (the MCQ jsonl, also inside a password zip, or the original
CSV, whose options are ordered as s1's harness orders them). Errors name the file, line and field.

    from benchmarks import load_benchmark
    items = load_benchmark("math500", "data/math500/test.jsonl")    # [{id, question, gold}]
"""
import csv
import json
import os
import random
import zipfile
import zlib

from data import read_rows
from grading import BENCHMARKS

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
            if not str(a).strip():  # graded, every answer would be wrong without a word
                raise ValueError(f"{w}: field 'answer' is empty")
            if not str(q).strip():
                raise ValueError(f"{w}: field 'problem' is empty")
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
        rows = _gpqa_zip_rows(path, password)
    elif path.endswith(".csv"):
        rows = _gpqa_csv_rows(path)
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


def _gpqa_zip_rows(path, password):
    """[(row, where)] of the MCQ jsonl inside a password-protected zip."""
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
    return rows


def _gpqa_csv_rows(path):
    """[(row, where)] of the original CSV, options ordered as s1's harness orders them."""
    # s1's gpqa_diamond_openai task: per row, in file order, the list [Incorrect Answer 1-3,
    # Correct Answer] shuffled by Python's random seeded with lm-eval's seed (0), and the
    # question and options as they are in the file
    need = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3"]
    with open(path, newline="", encoding="utf-8") as f:
        rng = random.Random(GPQA_OPTION_SEED)
        rows = []
        for n, r in enumerate(csv.DictReader(f), 2):
            miss = [k for k in need if not r.get(k)]
            if miss:
                raise ValueError(f"{path} line {n}: missing field {miss[0]!r}")
            choices = [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)] + [r["Correct Answer"]]
            rng.shuffle(choices)
            listing = "\n".join(f"{'ABCD'[j]}) {c}" for j, c in enumerate(choices))
            rows.append(({"question": r["Question"] + "\n\n" + listing,
                          "answer": "ABCD"[choices.index(r["Correct Answer"])],
                          "id": r.get("Record ID", n)}, f"{path} line {n}"))
    return rows
