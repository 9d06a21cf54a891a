"""Nothing lost, nothing mislabelled: fault injection for every command that writes.

Each numbered section reproduces one of the cases of the issue on lost work (outputs destroying
inputs, runs that could not be resumed, artifacts combined across adapters, raw tracebacks) and
checks what happens now: the files still there byte for byte, one line naming the item, and a
command killed with SIGKILL at three points giving, once rerun, what an uninterrupted run gives.
"""
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from ablate import kl_stats
from autointerp import autointerp
from batchtopk import SAE, SAEConfig
from benchmarks import load_benchmark
from checkpoint import safetensors_metadata
from common import publish_dir, read_json, read_log
from helpers import (ROOT, SHARED_DATA, FakeLLM, hf_tiny, kill_when, run_script, save_hf,
                     script_cmd, tiny_env)
from data import Tokenizer, load_s1
from eval import recovery_table
from grading import grade_sample
from llm import LLM
from lora import LoRALinear, adapters, apply_lora
from lora_files import load_adapter
from model import Qwen2, Qwen2Config
from protocols import GenConfig
from store import ActivationStore
from recipe import TrainConfig


def rows(n, long=1):
    return [dict(question=f"What is {i}+{i}?", deepseek_attempt=str(2 * i),
                 deepseek_thinking_trajectory=f"{i} plus {i} is {2 * i}. " * (long + i % 3))
            for i in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model with its tokenizer, two adapters of the same shape, s1 rows, a benchmark."""
    d = tiny_env(tmp_path_factory.mktemp("lost"), adapters=(("adapter", 0), ("adapter2", 1)))
    write_jsonl(d / "rows.jsonl", rows(6))
    write_jsonl(d / "math.jsonl", [dict(problem=f"What is {i} + {i}?", answer=str(2 * i),
                                        id=f"p{i}") for i in range(12)])
    return d


def snapshot(path):
    """{relative path: sha256} of every file below path: to check that nothing changed."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def collect(env, out, *extra, adapter="adapter", check=True):
    return run_script("collect.py", ["--model", env / "model", "--adapter", env / adapter,
                                     "--data", env / "rows.jsonl", "--out", out,
                                     "--docs-per-shard", 1, "--window", 16, *extra], check=check)


def eval_args(env, out, *extra):
    return ["run", "--model", env / "model", "--adapter", env / "adapter", "--out", out,
            "--bench", f"math500={env / 'math.jsonl'}", "--max-context", 4096,
            "--thinking-budget", 24, "--max-answer-tokens", 6, "--batch-size", 1, *extra]


def train_args(env, out, *extra):
    return ["--model", env / "model", "--data", env / "rows.jsonl", "--out", out,
            "--dtype", "float32", "--global-batch", 2, "--epochs", 2, "--lr", "1e-2", *extra]


def sae_args(acts, out, *extra):
    return ["train", "--acts", acts, "--out", out, "--expansion", 2, "--k", 4,
            "--batch-size", 16, "--steps", 40, "--save-every", 2, "--log-every", 4,
            "--holdout", 0.1, *extra]


# --- 1. outputs never destroy inputs or other outputs ------------------------------------------


def test_1_outputs_never_replace_inputs_or_other_outputs(env, tmp_path):
    collect(env, tmp_path / "acts")
    before = snapshot(tmp_path / "acts")
    r = run_script("sae.py", sae_args(tmp_path / "acts", tmp_path / "acts"), check=False)
    assert r.returncode != 0 and "is, holds or lies inside the input --acts" in r.stderr
    assert snapshot(tmp_path / "acts") == before  # the store is untouched
    # ablate.py into the run whose samples it reads: refused, the run untouched
    run_script("eval.py", eval_args(env, tmp_path / "lora", "--limit", 2))
    run_before = snapshot(tmp_path / "lora")
    ablate = lambda out: ["--model", env / "model", "--adapter", env / "adapter",
                          "--samples", tmp_path / "lora" / "samples.jsonl",
                          "--experiments", "layer", "--out", out]
    r = run_script("ablate.py", ablate(tmp_path / "lora"), check=False)
    assert r.returncode != 0 and "lies inside the input --samples" in r.stderr
    assert snapshot(tmp_path / "lora") == run_before
    # into a directory of other things: its two files beside them, which stay as they were
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    run_script("ablate.py", ablate(tmp_path / "results"))
    assert sorted(os.listdir(tmp_path / "results")) == ["ablations.html", "ablations.json",
                                                        "notes.txt"]
    assert (tmp_path / "results" / "notes.txt").read_text() == "keep me"
    r = run_script("ablate.py", ablate(tmp_path / "results"), check=False)  # again: stops
    assert r.returncode != 0 and "ablations.json: exists; pass --overwrite" in r.stderr
    # sae.py train keeps the metrics.jsonl it writes
    run_script("sae.py", sae_args(tmp_path / "acts", tmp_path / "sae"))
    assert sorted(os.listdir(tmp_path / "sae")) == ["cfg.json", "made_by.json", "metrics.json",
                                                    "metrics.jsonl", "sae.safetensors"]
    assert len((tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()) == 10
    # an export stops before replacing a directory it did not write
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = run_script("export.py", ["--model", env / "model", "--adapter", env / "adapter",
                                 "--out", tmp_path / "mine", "--overwrite"], check=False)
    assert r.returncode != 0 and "which export.py did not make (no made_by.json)" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # --overwrite and --resume act only in a directory the same command made
    shutil.copytree(env / "model", tmp_path / "hf")
    refusals = [("train.py", train_args(env, tmp_path / "hf", "--overwrite"), "hf", "which "
                 "train.py did not make"),
                ("train.py", train_args(env, tmp_path / "sae", "--resume"), "sae", "made by sae.py "
                 "train, not train.py"),
                ("sae.py", sae_args(tmp_path / "acts", tmp_path / "lora", "--overwrite"), "lora",
                 "made by eval.py run, not sae.py train"),
                ("eval.py", eval_args(env, tmp_path / "sae", "--overwrite"), "sae",
                 "made by sae.py train, not eval.py run"),
                ("collect.py", ["--model", env / "model", "--adapter", env / "adapter", "--data",
                                env / "rows.jsonl", "--out", tmp_path / "lora", "--overwrite"],
                 "lora", "made by eval.py run, not collect.py")]
    for script, args, d, want in refusals:
        before = snapshot(tmp_path / d)
        r = run_script(script, args, check=False)
        assert r.returncode != 0 and want in r.stderr, (script, r.stderr[-1000:])
        assert "Traceback" not in r.stderr and snapshot(tmp_path / d) == before


# --- 2. evaluation loses nothing -----------------------------------------------------------------


def test_2_grading_never_raises_and_ungradeable_answers_are_reported():
    degenerate = "<|im_start|>answer\nFinal Answer: " + "(" * 300
    pred, correct, error = grade_sample("math500", degenerate, "2")
    assert pred is None and correct is False and error.startswith("RecursionError")
    assert grade_sample("math500", "<|im_start|>answer\n\\boxed{2}", "2") == ("2", True, None)


def test_2_eval_run_killed_three_times_gives_the_uninterrupted_results(env, tmp_path):
    run_script("eval.py", eval_args(env, tmp_path / "ref"))
    out = tmp_path / "k"
    part = out / "samples.rank-00000.jsonl"
    lines = lambda: len(part.read_text().splitlines()) if part.exists() else 0
    for n in (1, 4, 8):  # kill after the n-th finished problem, then run again
        p = subprocess.Popen(script_cmd("eval.py", eval_args(env, out)), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(p, lambda: lines() >= n)
        assert not (out / "results.json").exists()
    with open(part, "a") as f:  # killed inside a write, or a full disk: a cut last line
        f.write('{"benchmark": "math500", "id": "p9", "sam')
    run_script("eval.py", eval_args(env, out))
    for f in ("results.json", "samples.jsonl"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert not part.exists()  # merged into samples.jsonl
    # a rerun with other settings stops, naming what differs and the flag
    r = run_script("eval.py", eval_args(env, out, "--thinking-budget", 8), check=False)
    assert (r.returncode != 0 and "generation.thinking_budget: recorded 24 vs now 8" in r.stderr
            and "pass --overwrite" in r.stderr)


# --- 3. collection resumes only what was collected the same way --------------------------------


def test_3_collect_refuses_to_mix_adapters(env, tmp_path):
    collect(env, tmp_path / "a")
    before = snapshot(tmp_path / "a")
    r = collect(env, tmp_path / "a", adapter="adapter2", check=False)
    assert r.returncode != 0 and "adapter.weights_sha256: recorded" in r.stderr
    assert "pass --overwrite" in r.stderr and snapshot(tmp_path / "a") == before
    collect(env, tmp_path / "a", "--overwrite", adapter="adapter2")
    assert ActivationStore(str(tmp_path / "a")).index["made_from"]["adapter"]["path"].endswith(
        "adapter2")


def test_3_collect_killed_three_times_gives_the_uninterrupted_store(env, tmp_path):
    collect(env, tmp_path / "ref")
    out = tmp_path / "k"
    for n in (1, 3, 5):  # kill once the n-th shard is finished
        p = subprocess.Popen(script_cmd("collect.py", [
            "--model", env / "model", "--adapter", env / "adapter", "--data", env / "rows.jsonl",
            "--out", out, "--docs-per-shard", 1, "--window", 16]), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(p, lambda: (out / f"shard-{n - 1:05d}.json").exists())
    collect(env, out)
    ref, got = snapshot(tmp_path / "ref"), snapshot(out)
    assert got.keys() == ref.keys()
    assert all(got[k] == ref[k] for k in ref if k.endswith(".npy"))
    a, b = (read_json(d / "index.json") for d in (tmp_path / "ref", out))
    assert a["shards"] == b["shards"] and a["shape"] == b["shape"]
    (out / "acts-00002.npy").unlink()  # a finished shard deleted: the rerun collects it again
    collect(env, out)
    assert snapshot(out) == got


# --- 4. training: same data, each step once, crash-safe checkpoints ----------------------------


def test_4_train_resume_checks_data_and_survives_a_crash_between_saves(env, tmp_path):
    out = tmp_path / "t"
    run_script("train.py", train_args(env, out, "--save-every", 1, "--max-steps", 3))
    ckpt = out / "ckpt"
    assert [p.name for p in ckpt.iterdir()] == ["step-000003"]
    # a crash in the middle of the next save: a newer, unfinished copy beside the complete one
    shutil.copytree(ckpt / "step-000003", ckpt / ".tmp-step-000004")
    os.remove(ckpt / ".tmp-step-000004" / "meta.json")
    run_script("train.py", train_args(env, out, "--save-every", 1, "--resume"))
    steps = [json.loads(l)["step"] for l in open(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # each step once
    run_script("train.py", train_args(env, tmp_path / "ref"))
    ref = read_json(tmp_path / "ref" / "result.json")["losses"]
    assert read_json(out / "result.json")["losses"] == ref
    # the data file changed under the same name: resume refuses, naming it
    data = write_jsonl(tmp_path / "rows.jsonl", rows(6))
    args = lambda *extra: ["--model", env / "model", "--data", data, "--out", tmp_path / "c",
                           "--dtype", "float32", "--global-batch", 2, *extra]
    run_script("train.py", args("--max-steps", 1))
    write_jsonl(data, rows(6, long=2))
    r = run_script("train.py", args("--resume"), check=False)
    assert r.returncode != 0 and "was trained on other inputs: data.bytes" in r.stderr


def test_4_train_killed_three_times_gives_the_uninterrupted_run(env, tmp_path):
    run_script("train.py", train_args(env, tmp_path / "ref"))
    out = tmp_path / "k"
    metrics = out / "metrics.jsonl"
    steps = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0
    for i, n in enumerate((1, 3, 5)):
        extra = ["--save-every", 1] + (["--resume"] if i else [])
        p = subprocess.Popen(script_cmd("train.py", train_args(env, out, *extra)), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(p, lambda: steps() >= n)
    with open(metrics, "a") as f:  # a cut last line of the step log
        f.write('{"step": 99, "lo')
    run_script("train.py", train_args(env, out, "--save-every", 1, "--resume"))
    ref, got = (read_json(d / "result.json") for d in (tmp_path / "ref", out))
    assert got["losses"] == ref["losses"]
    assert [json.loads(l)["step"] for l in open(metrics)] == list(range(1, ref["steps"] + 1))
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "ref", out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_append_only_logs_survive_a_cut_last_line_and_name_other_damage(tmp_path):
    """read_log drops a last line without its newline (and, for its writer, cuts it off the
    file so appending continues cleanly); damage anywhere else names the file and line."""
    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(str(f)) == [{"step": 1}, {"step": 2}]
    assert f.read_bytes().endswith(b'"lo')  # a reader leaves the file alone
    assert read_log(str(f), repair=True) == [{"step": 1}, {"step": 2}]
    assert f.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    f.write_bytes(b'{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{f} line 2: not valid JSON"):
        read_log(str(f))
    assert read_log(str(tmp_path / "none.jsonl")) == []


# --- 5. no trained-on tokens ----------------------------------------------------------------------


def test_5_no_trained_tokens_is_an_error_before_training(env, tmp_path):
    r = run_script("train.py", train_args(env, tmp_path / "z", "--block-size", 8), check=False)
    assert r.returncode != 0 and "no trained-on tokens within --block-size 8" in r.stderr
    assert not (tmp_path / "z" / "adapter").exists()
    r = run_script("train.py", train_args(env, tmp_path / "z", "--block-size", 8, "--dry-run"))
    assert json.loads(r.stdout[r.stdout.index("{"):])["steps_without_trained_tokens"] == [1, 2, 3,
                                                                                            4, 5, 6]


# --- 6. compare -----------------------------------------------------------------------------------


def results(per, name="math500"):
    return {"results": {name: {"accuracy": sum(per.values()) / len(per), "per_problem": per}}}


def test_6_compare_refuses_mismatched_problems_and_intersects_consistently():
    base = results({"a": 0.0, "b": 0.0, "c": 1.0, "d": 0.0})
    full = results({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    lora = results({"a": 1.0, "b": 0.0})  # a run with --limit 2
    with pytest.raises(ValueError, match="graded different problems.*pass --intersect"):
        recovery_table(base, full, lora)
    t = recovery_table(base, full, lora, intersect=True)["math500"]
    assert (t["base"], t["full"], t["lora"], t["problems"]) == (0.0, 1.0, 0.5, 2)
    assert t["recovery"] == 0.5 and all(0.0 <= x <= 1.0 for x in t["recovery_ci95"])
    with pytest.raises(ValueError, match="share no problem"):
        recovery_table(base, full, results({"x": 1.0}), intersect=True)
    with pytest.raises(ValueError, match=r"benchmarks \['aime24'\] are missing from some"):
        recovery_table(base, full, {"results": {**lora["results"], **results(
            {"a": 1.0}, "aime24")["results"]}})


def test_6_duplicate_problem_ids_are_errors(tmp_path):
    f = write_jsonl(tmp_path / "b.jsonl", [dict(problem="1+1", answer="2", id="x"),
                                           dict(problem="2+2", answer="4", id="x")])
    with pytest.raises(ValueError, match=r"b.jsonl line 2: problem id 'x' is already used at .*"
                                         r"b.jsonl line 1"):
        load_benchmark("math500", str(f))
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"results": {"math500": {"accuracy": 1, "per_problem": '
                                      '{"x": 1.0, "x": 0.0}}}}')
    r = run_script("eval.py", ["compare", run, run, run, "--out", tmp_path / "r.json"],
                   check=False)
    assert r.returncode != 0 and "duplicate problem ids ['x']" in r.stderr


# --- 7. autointerp --------------------------------------------------------------------------------


def feature(i):
    top = [dict(value=float(v), tokens=["a", "X", f"b{i}"], acts=[0, v, 0], target=1)
           for v in range(14, 0, -1)]
    inactive = [dict(value=0.0, tokens=["a", "o", f"b{i}"], acts=[0, 0, 0], target=1)] * 6
    return dict(id=i, name=f"f{i}", top=top, random=top[:2], inactive=inactive)


def test_7_failed_replies_are_retried_never_cached_and_reported(tmp_path, fake_llm):
    FakeLLM.delay = 0.5
    FakeLLM.script[:] = ["null", "garbage", "slow", 503]  # all for the first request, then fine
    llm = LLM(fake_llm, "fake", str(tmp_path / "cache"), backoff=0.01, timeout=0.2)
    assert llm([{"role": "user", "content": "q"}]) == "Fires on the letter X."
    assert llm.calls == 5
    assert len(os.listdir(tmp_path / "cache")) == 1  # only the good reply was cached
    # refused connections: retried, then one line naming the URL and the status
    dead = LLM("http://127.0.0.1:9/v1", "fake", str(tmp_path / "c2"), retries=2, backoff=0.01)
    with pytest.raises(RuntimeError, match=r"127.0.0.1:9/v1: connection failed .* after 3 "):
        dead([{"role": "user", "content": "q"}])
    assert os.listdir(tmp_path / "c2") == []
    # one feature's failure: named with its id, the other features' results kept
    FakeLLM.script[:] = [500] * 3
    llm = LLM(fake_llm, "fake", str(tmp_path / "c3"), retries=2, backoff=0.01, concurrency=1)
    out = autointerp([feature(0), feature(1)], llm)
    assert out[0]["error"].startswith("feature 0 (f0): http://127.0.0.1:")
    assert "HTTP 500 after 3 attempts" in out[0]["error"]
    assert out[1]["detection_balanced_accuracy"] == 1.0 and "error" not in out[1]


def test_7_autointerp_command_keeps_the_others_and_a_rerun_finishes(tmp_path, fake_llm):
    (tmp_path / "interp").mkdir()  # docs/running.md: --out interp/auto/ beside features.json
    (tmp_path / "interp" / "features.json").write_text(
        json.dumps(dict(features=[feature(0), feature(1)])))
    args = ["autointerp", "--features", tmp_path / "interp" / "features.json",
            "--out", tmp_path / "interp" / "auto", "--llm-url", fake_llm, "--concurrency", 1]
    FakeLLM.script[:] = [400]
    r = run_script("interpret.py", args, check=False)
    assert r.returncode != 0 and "1 features failed" in r.stderr and "feature 0 (f0)" in r.stderr
    got = [json.loads(l) for l in open(tmp_path / "interp" / "auto" / "autointerp.jsonl")]
    assert "error" in got[0] and got[1]["detection_balanced_accuracy"] == 1.0
    n = len(FakeLLM.requests)
    run_script("interpret.py", args)
    assert len(FakeLLM.requests) == n + 2  # only feature 0 is asked again
    assert all("error" not in json.loads(l)
               for l in open(tmp_path / "interp" / "auto" / "autointerp.jsonl"))


# --- 8. bad input: one line naming the file and what is wrong -----------------------------------


def test_8_bad_input_gives_one_line(env, tmp_path):
    def fails(script, args, *want):
        r = run_script(script, args, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        for w in want:
            assert w in r.stderr, r.stderr[-2000:]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(rows(1)[0]).encode() + b"\n{\"question\": \"caf\xe9\"}\n")
    fails("train.py", ["--model", env / "model", "--data", bad, "--out", tmp_path / "o"],
          "bad.jsonl line 2: not UTF-8 text")
    (tmp_path / "empty.jsonl").write_text("\n")
    fails("train.py", ["--model", env / "model", "--data", tmp_path / "empty.jsonl", "--out",
                       tmp_path / "o"], "empty.jsonl: no rows")
    # a store with a truncated shard, read without checksums
    collect(env, tmp_path / "acts")
    f = tmp_path / "acts" / "acts-00002.npy"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"acts-00002.npy: not a readable .npy array"):
        ActivationStore(str(tmp_path / "acts"), verify=False).shard(2)
    # an SAE of another width than the store
    SAE(5, 10, 2).save(str(tmp_path / "sae5"))
    fails("interpret.py", ["mine", "--acts", tmp_path / "acts", "--sae", tmp_path / "sae5",
                           "--tokenizer", env / "model", "--out", tmp_path / "m"],
          "an SAE of width 5", "stores 21 scalars")
    # ablate with --max-tokens that the prompt already fills
    s = write_jsonl(tmp_path / "s.jsonl", [dict(benchmark="math500", id="x", question="What?",
                                                generation="<|im_start|>think\nno")])
    fails("ablate.py", ["--model", env / "model", "--adapter", env / "adapter",
                        "--samples", s, "--max-tokens", 5, "--out", tmp_path / "ab"],
          "s.jsonl line 1: no assistant token within --max-tokens 5")
    # configs: not an object, a missing field, invalid JSON
    m2 = tmp_path / "m2"
    shutil.copytree(env / "model", m2)
    (m2 / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object, got list"):
        Qwen2Config.from_pretrained(str(m2))
    (m2 / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match=r"m2/config.json: not valid JSON"):
        Qwen2.from_pretrained(str(m2))
    ad = tmp_path / "ad"
    shutil.copytree(env / "adapter", ad)
    c = read_json(ad / "adapter_config.json")
    del c["r"]
    (ad / "adapter_config.json").write_text(json.dumps(c))
    fails("eval.py", ["run", "--model", env / "model", "--adapter", ad, "--out", tmp_path / "e",
                      "--bench", f"math500={env / 'math.jsonl'}"],
          "adapter_config.json: r: missing")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "gpqa-diamond",
                                                    "gpqa_diamond_mcq.zip")),
                    reason="../shared/data is not beside the checkout")
def test_8_every_wrong_gpqa_password_is_named():
    """About 1 wrong password in 256 passes zipfile's check byte and fails later (zlib, CRC)."""
    z = os.path.join(SHARED_DATA, "gpqa-diamond", "gpqa_diamond_mcq.zip")
    member = zipfile.ZipFile(z).namelist()[0]
    tricky = None
    for i in range(4000):
        try:
            zipfile.ZipFile(z).read(member, pwd=f"wrong-{i}".encode())
        except RuntimeError:
            continue  # the ordinary "Bad password"
        except Exception:
            tricky = f"wrong-{i}"
            break
    assert tricky is not None
    with pytest.raises(ValueError, match="wrong or missing --zip-password"):
        load_benchmark("gpqa", z, password=tricky)


# --- 9. a failed load_adapter leaves the model as it was -----------------------------------------


def test_9_load_adapter_is_transactional(env, tmp_path):
    ad = tmp_path / "ad"
    shutil.copytree(env / "adapter", ad)
    sd = load_file(ad / "adapter_model.safetensors")
    k = sorted(sd)[-1]  # the last site: every other one would be wrapped first
    sd[k] = torch.zeros(sd[k].shape[0] + 1, sd[k].shape[1])
    save_file(sd, ad / "adapter_model.safetensors")
    m = Qwen2.from_pretrained(str(env / "model"))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(m, str(ad))
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    load_adapter(m, str(env / "adapter"))  # the retry works
    assert len(adapters(m)) == 21


# --- 10. no silent mismatch -----------------------------------------------------------------------


def test_10_tied_head_that_differs_from_the_embedding_is_an_error(tmp_path):
    hf = hf_tiny(tie_word_embeddings=True)
    path = save_hf(hf, tmp_path / "tied")
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, f, metadata={"format": "pt"})
    Qwen2.from_pretrained(path)  # an equal copy is fine
    sd["lm_head.weight"][0, 0] += 1
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        Qwen2.from_pretrained(path)


def test_10_sae_of_another_adapter_and_bit_flips_are_caught(env, tmp_path):
    collect(env, tmp_path / "a1")
    collect(env, tmp_path / "a2", adapter="adapter2")
    run_script("sae.py", sae_args(tmp_path / "a2", tmp_path / "sae2"))
    r = run_script("interpret.py", ["mine", "--acts", tmp_path / "a1", "--sae", tmp_path / "sae2",
                                    "--tokenizer", env / "model", "--out", tmp_path / "m"],
                   check=False)
    assert r.returncode != 0 and "trained on another store" in r.stderr
    assert "adapter.weights_sha256" in r.stderr
    f = tmp_path / "a1" / "acts-00001.npy"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x10  # one bit of one stored value
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"acts-00001.npy: its checksum does not match"):
        ActivationStore(str(tmp_path / "a1")).load_all()


# --- kill -9 during SAE training ---------------------------------------------------------------


def test_sae_train_killed_three_times_gives_the_uninterrupted_sae(env, tmp_path):
    collect(env, tmp_path / "acts")
    # 120 steps: Ctrl-C at step 34 must land long before the end, even on a loaded machine
    args = lambda out: sae_args(tmp_path / "acts", out, "--steps", 120)
    run_script("sae.py", args(tmp_path / "ref"))
    out = tmp_path / "k"
    state = out / "train-state.safetensors"

    def step_on_disk():
        try:
            return json.loads(safetensors_metadata(str(state))["rank1"])["step"]
        except (ValueError, FileNotFoundError):
            return -1

    def saved_step(n):
        # a kill can land a few steps past its point, so the next run may start past the next
        # point: it is killed once it has saved a step of its own (never while it starts up)
        start = step_on_disk()
        return lambda: step_on_disk() >= max(n, start + 1)
    for n in (4, 14, 30):
        p = subprocess.Popen(script_cmd("sae.py", args(out)), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(p, saved_step(n))
    # a shell's background job (nohup ... &, a CI runner) inherits SIGINT ignored: give the
    # command the default a terminal's Ctrl-C meets
    p = subprocess.Popen(script_cmd("sae.py", args(out)), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert kill_when(p, saved_step(34), sig=signal.SIGINT) == 130  # Ctrl-C: one line, exit 130
    assert p.stderr.read().splitlines()[-1:] == [
        "sae.py: interrupted (SIGINT); run the same command again to continue"]
    with open(out / "metrics.jsonl", "a") as f:  # a cut last line of the step log
        f.write('{"step": 39, "fv')
    run_script("sae.py", args(out))
    ref = tmp_path / "ref"
    assert (out / "sae.safetensors").read_bytes() == (ref / "sae.safetensors").read_bytes()
    assert read_json(out / "metrics.json") == read_json(tmp_path / "ref" / "metrics.json")
    drop = lambda f: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}
                      for l in open(f)]
    assert drop(out / "metrics.jsonl") == drop(tmp_path / "ref" / "metrics.jsonl")
    assert not state.exists()


def test_numbers_are_checked_where_they_enter():
    """A NaN, a negative or an out-of-range number is one line naming the flag; --grad-clip 0 is
    no clipping (as HF reads it)."""
    for cls, field, value, want in (
            (TrainConfig, "lr", float("nan"), "--lr must be a finite number > 0"),
            (TrainConfig, "grad_clip", -1.0, "--grad-clip must be a finite number >= 0"),
            (TrainConfig, "beta2", 1.0, "--beta2 must be a finite number in \\[0, 1\\)"),
            (TrainConfig, "warmup_ratio", 1.5, "--warmup-ratio must be a finite number in"),
            (SAEConfig, "threshold_beta", float("nan"), "--threshold-beta must be a finite"),
            (SAEConfig, "steps", -3, "--steps must be a finite number >= 0"),
            (SAEConfig, "lr", float("inf"), "--lr must be a finite number >= 0"),
            (GenConfig, "temperature", -0.5, "--temperature must be a finite number >= 0"),
            (GenConfig, "top_p", 2.0, "--top-p must be a finite number in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=want):
            cls(**{field: value})
    assert TrainConfig(grad_clip=0.0).grad_clip == 0.0


def test_grad_clip_zero_means_no_clipping(env, tmp_path):
    """With --grad-clip 0 the first step equals an unclipped one (clip_grad_norm_'s own reading of
    0 zeroes every gradient, and B would stay 0)."""
    outs = {}
    for clip in ("0", "1e9"):
        out = tmp_path / clip
        run_script("train.py", train_args(env, out, "--grad-clip", clip, "--max-steps", 2,
                                          "--warmup-ratio", 0))
        outs[clip] = load_file(out / "adapter" / "adapter_model.safetensors")
    same = lambda a, b: all(torch.equal(outs[a][k], outs[b][k]) for k in outs[a])
    assert same("0", "1e9")
    assert any(v.abs().max() > 0 for k, v in outs["0"].items() if "lora_B" in k)


# --- round two: non-finite numbers, provenance, full disks, unwritable outputs -------------------


def test_non_finite_weights_and_logits_are_errors(env, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(env / "model", m)
    sd = load_file(m / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight holds "
                                         "non-finite values"):
        Qwen2.from_pretrained(str(m))
    ad = tmp_path / "ad"
    shutil.copytree(env / "adapter", ad)
    sd = load_file(ad / "adapter_model.safetensors")
    k = sorted(k for k in sd if "lora_B" in k)[0]
    sd[k][0] = float("inf")
    save_file(sd, ad / "adapter_model.safetensors")
    model = Qwen2.from_pretrained(str(env / "model"))
    with pytest.raises(ValueError, match=f"{k} has non-finite values"):
        load_adapter(model, str(ad))
    with torch.no_grad():
        model.lm_head.weight[7] = float("inf")
    with pytest.raises(ValueError, match="non-finite logits at new token 1"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    ref = torch.full((4, 300), float("nan"))
    with pytest.raises(ValueError, match="ablate: non-finite logits"):
        kl_stats(apply_lora(Qwen2.from_pretrained(str(env / "model")), verbose=False),
                 torch.tensor([[1, 2, 3, 4]]), [0, 1, 1, 1], ref, {})


def test_a_diverged_sae_is_not_saved_and_bad_outputs_are_one_line(env, tmp_path):
    collect(env, tmp_path / "acts")
    r = run_script("sae.py", sae_args(tmp_path / "acts", tmp_path / "sae", "--lr", "1e30"),
                   check=False)
    assert r.returncode != 0 and "training diverged at step" in r.stderr, r.stderr[-1000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "sae" / "sae.safetensors").exists()
    (tmp_path / "file").write_text("x")
    for out, want in ((tmp_path / "file", "file"), ("/sys/rank1-test/sae", "/sys/rank1-test")):
        r = run_script("sae.py", sae_args(tmp_path / "acts", out), check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1000:]
        assert [l for l in r.stderr.splitlines() if want in l], r.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_a_full_disk_is_one_line_and_the_rerun_gives_the_uninterrupted_results(env, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write that crosses it fails (EFBIG) midway,
    leaving a torn last line in the samples file."""
    run_script("eval.py", eval_args(env, tmp_path / "ref"))
    size = (tmp_path / "ref" / "samples.jsonl").stat().st_size
    limit = max(size // 2, (tmp_path / "ref" / "run.json").stat().st_size + 1)
    assert limit < size

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
    out = tmp_path / "full"
    r = subprocess.run(script_cmd("eval.py", eval_args(env, out)), cwd=ROOT, text=True,
                       capture_output=True, preexec_fn=full_disk)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if "File too large" in l]
    assert len(errors) == 1 and "samples.rank-00000.jsonl" in errors[0], r.stderr[-2000:]
    part = (out / "samples.rank-00000.jsonl").read_bytes()
    assert len(part) == limit and not part.endswith(b"\n")  # the tear
    run_script("eval.py", eval_args(env, out))
    for f in ("results.json", "samples.jsonl"):
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_a_rerun_regrades_with_this_grader_and_results_name_the_code(env, tmp_path):
    out = tmp_path / "e"
    run_script("eval.py", eval_args(env, out, "--limit", 3))
    first = read_json(out / "results.json")
    assert len(first["code"]["scripts_sha256"]) == 64 and "commit" in first["code"]
    recs = [json.loads(l) for l in open(out / "samples.jsonl")]
    recs[1] = {**recs[1], "extracted": "999", "correct": not recs[1]["correct"]}  # old grader
    write_jsonl(out / "samples.jsonl", recs)
    r = run_script("eval.py", eval_args(env, out, "--limit", 3))
    assert "1 answers graded anew" in r.stdout + r.stderr
    assert read_json(out / "results.json") == first


def test_compare_refuses_runs_on_different_benchmark_files():
    def run(sha):
        r = results({"a": 0.0, "b": 1.0})
        r["settings"] = {"benchmarks": [{"name": "math500", "file": {"sha256": sha}}]}
        return r
    full = run("f" * 64)
    full["results"]["math500"]["per_problem"] = {"a": 1.0, "b": 1.0}
    recovery_table(run("f" * 64), full, run("f" * 64))
    with pytest.raises(ValueError, match="math500: the runs read different benchmark files"):
        recovery_table(run("f" * 64), full, run("0" * 64))


def test_benchmark_names_are_unique(env, tmp_path):
    r = run_script("eval.py", eval_args(env, tmp_path / "e", "--bench",
                                        f"math500={env / 'math.jsonl'}"), check=False)
    assert r.returncode != 0 and "math500 is given twice" in r.stderr
    assert not (tmp_path / "e").exists()


def test_stale_temp_dirs_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".tmp-out-{host}-{dead.pid}-abc123"
    alive = tmp_path / f".tmp-out-{host}-{os.getpid()}-def456"
    other = tmp_path / f".tmp-other-{host}-{dead.pid}-abc123"
    for d in (stale, alive, other):
        d.mkdir()
        (d / "shard").write_text("65 GB at 32B")
    publish_dir(tmp_path / "out", lambda t: open(os.path.join(t, "x"), "w").close(), lambda n: True,
                command="test")
    assert not stale.exists() and alive.exists() and other.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["made_by.json", "x"]


def test_other_configs_and_empty_traces_are_named(env, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(env / "model", m)
    c = read_json(m / "config.json")
    c.pop("model_type")
    c["architectures"] = ["MistralForCausalLM"]
    (m / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="architectures is \\['MistralForCausalLM'\\], expected "
                                         "Qwen2ForCausalLM"):
        Qwen2Config.from_pretrained(str(m))
    rs = rows(3)
    rs[1]["deepseek_thinking_trajectory"] = " \n"
    _, stats = load_s1(str(write_jsonl(tmp_path / "r.jsonl", rs)), Tokenizer(str(env / "model")))
    assert stats["empty_thinking"] == 1 and stats["rows"] == 3
