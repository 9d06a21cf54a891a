"""
A rehearsal of the GPU-cluster run: the commands of README.md's section "The run on a GPU
cluster" (and with --doc running, every command block of docs/running.md), read from the docs
themselves and run in order on a tiny random Qwen2, s1K-1.1-shaped rows and tiny benchmark files,
so that a step that breaks shows up in minutes, before GPU-days.

    python rehearse.py --out /tmp/rehearsal              # 2 processes: your GPUs, else the CPU
    python rehearse.py --nproc 8 --tokenizer /models/Qwen2.5-32B-Instruct --out /tmp/rehearsal
    python rehearse.py --doc running --out /tmp/rehearsal-running   # docs/running.md's blocks
    python rehearse.py --print                           # the commands it would run

What changes against the README, and nothing else:
- the inputs: the downloads are made here, tiny, at the paths the README's variables name (a path
  from the filesystem root, such as /models/..., is taken inside --out); s1K-1.1 is written as
  parquet when pyarrow is installed, else as .jsonl (and $D names that file);
- `torchrun --nproc_per_node=8` runs --nproc processes, `python` is this interpreter and the
  scripts are this checkout's;
- SHRINK below: sizes only (steps, problems, documents, tokens), appended to each command;
- an LLM server (`--llm-url`) is a stand-in on this machine that answers autointerp's prompts in
  their formats (autointerp.stand_in_reply); commands of other tools (lm_eval) and of
  the optional vLLM engine (`--engine vllm`, tests/test_vllm.py) are not run.
tests/test_rehearse.py runs it in CI on 2 CPU processes, so an edit of the README that breaks the
path fails the suite.
"""
import http.server
import json
import os
import random
import re
import shlex
import subprocess
import sys
import threading
import time

import torch

from autointerp import stand_in_reply
from checkpoint import save_hf_checkpoint, tokenizer_files
from common import Parser, number
from data import DEFAULT_SYSTEM, Tokenizer, train_tokenizer
from model import Qwen2, Qwen2Config

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTION = "## The run on a GPU cluster"
DOCS = dict(readme=("README.md", SECTION), running=(os.path.join("docs", "running.md"), None))

# the only flags the rehearsal adds: sizes, per command (script, or script and subcommand)
SHRINK = {
    "train.py": ["--max-steps", "2"],
    "eval.py run": ["--limit", "2", "--max-context", "320"],
    "ablate.py": ["--max-sequences", "2", "--max-tokens", "160"],
    "collect.py": ["--max-docs", "4"],
    "sae.py train": ["--steps", "40", "--batch-size", "64"],
    "sae.py sweep": ["--steps", "40", "--batch-size", "64"],
    "interpret.py steer": ["--limit", "2", "--max-context", "320", "--max-answer-tokens", "16"],
    "rollout.py": ["--max-tokens", "64", "--targets", "4"],
}

# the tiny model: Qwen2's architecture (GQA, q/k/v biases), saved in bf16 as Qwen2.5's checkpoints
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16")

# -----------------------------------------------------------------------------
# the README's commands


def cluster_commands(path, section=SECTION):
    """The commands of a doc's section (all of it for None), in order: every line of its ```bash
    blocks, continuation lines joined and comments dropped."""
    text = open(path, encoding="utf-8").read()
    if section is not None:
        if section not in text:
            raise ValueError(f"{path}: no section {section!r}")
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    cmds = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()  # a comment after the command
        if line and not line.startswith("#"):
            cmds.append(re.sub(r"\s+", " ", line))
    return cmds


def assignments(cmd):
    """{NAME: value} when the command only sets shell variables (`M=...; D=...`), else None."""
    out = {}
    for part in cmd.split(";"):
        words = shlex.split(part)
        if len(words) != 1 or not re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            return None
        name, value = words[0].split("=", 1)
        out[name] = value
    return out


def downloads(cmds):
    """[(local dir, dataset?)] of the README's `huggingface-cli download` lines."""
    out = []
    for c in cmds:
        w = shlex.split(c)
        if w[:2] == ["huggingface-cli", "download"]:
            out.append((w[w.index("--local-dir") + 1], "dataset" in w))
    return out


def command_key(words):
    """"script.py" or "script.py sub" of a command's words (SHRINK's keys)."""
    i = next(i for i, w in enumerate(words) if w.endswith(".py"))
    sub = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith(("-", "$")) else ""
    key = f"{os.path.basename(words[i])} {sub}".strip()
    return key if key in SHRINK else os.path.basename(words[i])


def rewrite(cmd, nproc, llm_url=None, python=sys.executable):
    """The command as the rehearsal runs it (see the module docstring), or None when it is not a
    project command (downloads, installs, other tools: the rehearsal makes its own inputs)."""
    env, cmd = re.match(r"((?:\w+=\S+ )*)(.*)$", cmd).groups()  # VAR=value before the command
    m = re.match(r"torchrun (?:--standalone )?--nproc[_-]per[_-]node[= ]?\d+ (\S+\.py)(.*)$", cmd)
    if m:
        head = f"{shlex.quote(python)} -m torch.distributed.run --standalone " \
               f"--nproc_per_node={nproc}"
    else:
        m = re.match(r"python (\S+\.py)(.*)$", cmd)
        head = shlex.quote(python)
    if not m or "--engine vllm" in cmd:  # vLLM is optional: tests/test_vllm.py runs it
        return None
    script, rest = m.groups()
    if llm_url:
        rest = re.sub(r"--llm-url \S+", f"--llm-url {llm_url}", rest)
    extra = SHRINK.get(command_key([script] + rest.split()), [])
    return f"{env}{head} {shlex.quote(os.path.join(ROOT, script))}{rest} {' '.join(extra)}".rstrip()


# -----------------------------------------------------------------------------
# the inputs: a tiny model, s1K-1.1-shaped rows, benchmark files


def s1_rows(n, seed=0):
    """Rows with s1K-1.1's columns: arithmetic questions with worked traces."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(10, 99), rng.randrange(2, 9)
        steps = "".join(f"Step {k}: {a} + {k * b} = {a + k * b}.\n" for k in range(1, 2 + i % 4))
        answer = str(a + (1 + i % 4) * b)
        rows.append(dict(solution=answer, question=f"Start at {a} and add {b}, {1 + i % 4} times. "
                         "What do you get?", cot_type="math", source_type="rehearsal",
                         metadata=json.dumps({"id": i}), gemini_thinking_trajectory=steps,
                         gemini_attempt=answer, deepseek_thinking_trajectory=steps,
                         deepseek_attempt=f"The answer is $\\boxed{{{answer}}}$.",
                         gemini_grade="Yes", gemini_grade_reason="", deepseek_grade="Yes",
                         deepseek_grade_reason=""))
    return rows


def write_rows(path, rows):
    """jsonl, or parquet for a .parquet path (pyarrow)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_benchmark(name, path, n=4):
    """A tiny file in the layout of the real one: AIME24 / MATH500 rows, or GPQA's CSV columns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    qs = [(f"What is {7 + i} times {3 + i}?", str((7 + i) * (3 + i))) for i in range(n)]
    if path.endswith(".csv"):
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Record ID", "Question", "Correct Answer", "Incorrect Answer 1",
                        "Incorrect Answer 2", "Incorrect Answer 3", "Explanation",
                        "High-level domain", "Subdomain"])
            for i, (q, a) in enumerate(qs):
                w.writerow([f"rec{i}", q, a, str(int(a) + 1), str(int(a) + 2), str(int(a) - 1),
                            "arithmetic", "Math", "Arithmetic"])
        return
    key = "unique_id" if name.startswith("math") else "id"
    write_rows(path, [{key: f"{name}/{i}", "problem": q, "answer": a}
                      for i, (q, a) in enumerate(qs)])


def make_model(path, tokenizer=None, seed=0):
    """A random Qwen2 (TINY) in HF's layout with its tokenizer: the given one (e.g. Qwen2.5's), or
    a small BPE trained here on the rehearsal's text."""
    os.makedirs(path, exist_ok=True)
    if tokenizer:
        tok_files = tokenizer_files(tokenizer)
    else:
        tok_dir = os.path.join(os.path.dirname(path), "tokenizer")
        text = [DEFAULT_SYSTEM, "think answer Final Answer: Wait"] + [
            json.dumps(r) for r in s1_rows(64, seed=1)]
        train_tokenizer(text, tok_dir, 512, TINY["max_position_embeddings"])
        tok_files = tokenizer_files(tok_dir)
    vocab = -(-Tokenizer(os.path.dirname(tok_files[0])).vocab_size // 64) * 64
    cfg = Qwen2Config.from_dict({**TINY, "vocab_size": vocab})
    torch.manual_seed(seed)
    model = Qwen2(cfg)
    model.init_weights()
    tensors = ((k, v.to(torch.bfloat16)) for k, v in model.hf_tensors())
    save_hf_checkpoint(path, tensors, {**cfg.to_hf_dict(), "torch_dtype": "bfloat16"},
                       copy_files=tok_files, overwrite=True, command="rehearse.py")


def make_inputs(cmds, work, tokenizer):
    """Write the inputs the README's downloads and variables name, under work; -> {NAME: value}
    of the shell variables the commands use."""
    env = {}
    for c in cmds:
        env.update(assignments(c) or {})
    inside = lambda p: os.path.join(work, p.lstrip("/")) if p.startswith("/") else p
    env = {k: " ".join(inside(w) if w.startswith("/") else w for w in v.split(" "))
           for k, v in env.items()}
    for local, dataset in downloads(cmds):
        local = inside(local)
        if not dataset:
            make_model(os.path.join(work, local), tokenizer)
            continue
        for k, v in env.items():  # the variable that names a file of this dataset
            if v.startswith(local.rstrip("/") + "/"):
                if v.endswith(".parquet") and not has_pyarrow():
                    env[k] = v = v[:-len(".parquet")] + ".jsonl"
                write_rows(os.path.join(work, v), s1_rows(24))
    for value in list(env.values()) + cmds:
        for name, path in re.findall(r"--bench (\w+)=([^\s\"']+)", value):
            write_benchmark(name, os.path.join(work, path))
    return env


def has_pyarrow():
    try:
        import pyarrow.parquet  # noqa: F401
        return True
    except ImportError:
        return False


class StandInLLM(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint on this machine: autointerp.stand_in_reply."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": stand_in_reply(body["messages"])}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def stand_in_llm():
    """Serve StandInLLM on a free port of 127.0.0.1 for this process's life: its base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_port}/v1"


# -----------------------------------------------------------------------------
# main


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", default="rehearsal", help="working directory: the inputs and every "
                   "output of the run (default: ./rehearsal)")
    p.add_argument("--nproc", type=number(int, "positive"), default=2,
                   help="processes for each torchrun command (GPUs where there are)")
    p.add_argument("--tokenizer", help="a directory with tokenizer.json to use (e.g. Qwen2.5's); "
                   "default: a small BPE trained here")
    p.add_argument("--doc", choices=sorted(DOCS), default="readme",
                   help="readme (default): README.md's cluster section; running: every command "
                   "block of docs/running.md (with the README's inputs and variables)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="the README whose variables (and, with --doc readme, whose cluster "
                   "section) are rehearsed (default: this checkout's)")
    p.add_argument("--print", action="store_true",
                   help="print the commands as they would run, and stop")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    doc, section = DOCS[args.doc]
    doc = args.readme if args.doc == "readme" else os.path.join(ROOT, doc)
    try:
        inputs = cluster_commands(args.readme)
        cmds = cluster_commands(doc, section)
    except (OSError, ValueError) as e:
        raise SystemExit(f"rehearse.py: {e}") from None
    url = stand_in_llm() if any("--llm-url" in c for c in cmds) and not args.print else None
    steps = [(c, rewrite(c, args.nproc, url)) for c in cmds if assignments(c) is None]
    if args.print:
        for c, r in steps:
            print(r or f"(skipped: {c})")
        return 0
    work = os.path.abspath(args.out)
    if os.path.exists(work) and os.listdir(work):
        raise SystemExit(f"rehearse.py: {work} is not empty; choose a new --out")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, **make_inputs(inputs + cmds, work, args.tokenizer)}
    run = [r for _, r in steps if r]
    print(f"rehearse: {len(run)} commands of {doc} in {work}", flush=True)
    i = 0
    for c, r in steps:
        if r is None:
            why = ("the optional vLLM engine" if "--engine vllm" in c
                   else "not a command of this project")
            print(f"rehearse: skipped ({why}): {c}", flush=True)
            continue
        i += 1
        print(f"rehearse: step {i}/{len(run)}: {c}", flush=True)
        t0 = time.time()
        with open(os.path.join(work, f"step-{i:02d}.log"), "w") as log:
            p = subprocess.run(["bash", "-c", r], cwd=work, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
        if p.returncode != 0:
            lines = open(log.name, errors="replace").read().splitlines()
            said = list(dict.fromkeys(l for l in lines if re.match(r"\w+\.py: ", l)))
            print("\n".join(said or lines[-40:]), file=sys.stderr)  # a command's own error line
            raise SystemExit(f"rehearse.py: step {i}/{len(run)} failed (exit {p.returncode}): "
                             f"{c}\n  ran as: {r}\n  its output: {log.name}")
        print(f"rehearse: step {i} done in {time.time() - t0:.0f} s", flush=True)
    print(f"rehearse: all {len(run)} commands ran; their outputs are in {work}")
    return 0


if __name__ == "__main__":
    main()
