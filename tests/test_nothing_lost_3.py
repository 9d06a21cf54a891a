"""Nothing lost, round three: writes through links, two runs into one --out, JSON of another
kind, degenerate data and a log that lost its last line. Each case: the bad input, the one line
expected, nothing changed outside --out, and the rerun's result equal to an untroubled run's."""
import json
import os

import pytest

import common
from helpers import run_script, tiny_env
from test_nothing_lost import eval_args, rows, snapshot, train_args, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tiny_env(tmp_path_factory.mktemp("lost3"))
    write_jsonl(d / "rows.jsonl", rows(6))
    write_jsonl(d / "math.jsonl", [dict(problem=f"What is {i} + {i}?", answer=str(2 * i),
                                        id=f"p{i}") for i in range(4)])
    return d


def one_line(r, text):
    """A refusal: exit 1, the expected text on the last line of stderr, no traceback."""
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and text in r.stderr.strip().splitlines()[-1], r.stderr


def test_a_resumed_run_never_appends_through_a_link(env, tmp_path, monkeypatch):
    """eval.py run stopped mid-way, its rank file then replaced by a link to a file elsewhere:
    the rerun refuses in one line and the file elsewhere is as it was; without the link it
    finishes with an untroubled run's samples."""
    import eval as ev
    from protocols import stream

    def stop_at_second(*a, **k):
        for j, answer in enumerate(stream(*a, **k)):
            if j == 1:
                raise KeyboardInterrupt
            yield answer
    argv = [str(a) for a in eval_args(env, tmp_path / "run")]
    monkeypatch.setattr(ev, "stream", stop_at_second)
    with pytest.raises(SystemExit):
        ev.main(argv)
    monkeypatch.setattr(ev, "stream", stream)
    part = tmp_path / "run" / "samples.rank-00000.jsonl"
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_bytes(part.read_bytes())
    part.unlink()
    part.symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    r = run_script("eval.py", eval_args(env, tmp_path / "run"), check=False)
    one_line(r, f"{part}: is a link to {elsewhere}")
    assert elsewhere.read_bytes() == before
    part.unlink()
    os.replace(elsewhere, part)
    run_script("eval.py", eval_args(env, tmp_path / "run"))
    run_script("eval.py", eval_args(env, tmp_path / "clean"))
    assert (tmp_path / "run" / "samples.jsonl").read_text() == \
        (tmp_path / "clean" / "samples.jsonl").read_text()


def test_overwrite_and_resume_never_reach_through_a_linked_directory(env, tmp_path):
    """A run directory whose ckpt/ is a link to another run's: --resume refuses to write there,
    --overwrite removes the link itself (it stopped with "Cannot call rmtree on a symbolic link"
    after deciding to delete), and the other run's checkpoints are untouched."""
    run_script("train.py", train_args(env, tmp_path / "a", "--max-steps", 2))
    run_script("train.py", train_args(env, tmp_path / "b", "--max-steps", 1))
    other = snapshot(tmp_path / "a" / "ckpt")
    os.rename(tmp_path / "b" / "ckpt", tmp_path / "b-ckpt")
    (tmp_path / "b" / "ckpt").symlink_to(tmp_path / "a" / "ckpt")
    r = run_script("train.py", train_args(env, tmp_path / "b", "--max-steps", 2, "--resume"),
                   check=False)
    one_line(r, f"{tmp_path / 'b' / 'ckpt'}: is a link to")
    run_script("train.py", train_args(env, tmp_path / "b", "--max-steps", 2, "--overwrite"))
    assert snapshot(tmp_path / "a" / "ckpt") == other
    assert not (tmp_path / "b" / "ckpt").is_symlink()
    la, lb = ([json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl")]
              for d in ("a", "b"))
    assert la == lb


def test_two_runs_at_once_into_one_out(env, tmp_path):
    """While a run holds its --out (here: this test, as a run in progress would), eval.py run and
    sae.py train with other settings into it are refused in one line (both exited 0, leaving the
    run.json of one beside the results of the other); when it ends, the same command runs."""
    out = tmp_path / "busy"
    out.mkdir()
    common.lock_dir(str(out))
    try:
        r = run_script("eval.py", eval_args(env, out, "--thinking-budget", 30), check=False)
        one_line(r, "another run is writing there now")
        assert os.listdir(out) == []
    finally:
        common.release_locks()
    run_script("eval.py", eval_args(env, out, "--thinking-budget", 30))
    assert json.load(open(out / "run.json"))["generation"]["thinking_budget"] == 30


def test_json_of_another_kind_is_one_line(env, tmp_path):
    """report.py given an eval run's results.json where it wants the recovery table, or any JSON
    where it wants a steering result, names the file and what it expected (a KeyError before)."""
    run_script("eval.py", eval_args(env, tmp_path / "run", "--limit", 1))
    results = tmp_path / "run" / "results.json"
    r = run_script("report.py", ["--recovery", results, "--out", tmp_path / "rep"], check=False)
    one_line(r, f"{results}: not a recovery table (`eval.py compare --out`) (no 'table' in it)")
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"results": []}))
    r = run_script("report.py", ["--steer", other, "--out", tmp_path / "rep"], check=False)
    one_line(r, f"{other}: not a steering result")
    assert not (tmp_path / "rep").exists()
    for cmd in (["dashboard.py", "--out", tmp_path / "d.html"],
                ["interpret.py", "autointerp", "--out", tmp_path / "auto"]):
        r = run_script(cmd[0], [*cmd[1:], "--features", results], check=False)
        one_line(r, f"{results}: not features.json (`interpret.py mine`) (no 'features' in it)")


def test_degenerate_data_is_refused_naming_the_line(env, tmp_path):
    """A benchmark whose gold answer is empty was graded (every answer wrong, without a word); an
    SAE sweep holding out no token raised a TypeError at its end."""
    bench = write_jsonl(tmp_path / "b.jsonl", [dict(problem="1+1?", answer="2"),
                                               dict(problem="2+2?", answer=" ")])
    r = run_script("eval.py", ["run", "--model", env / "model", "--bench", f"math500={bench}",
                               "--out", tmp_path / "e"], check=False)
    one_line(r, f"{bench} line 2: field 'answer' is empty")
    run_script("collect.py", ["--model", env / "model", "--adapter", env / "adapter", "--data",
                              env / "rows.jsonl", "--out", tmp_path / "acts"])
    r = run_script("sae.py", ["sweep", "--acts", tmp_path / "acts", "--out", tmp_path / "sw",
                              "--holdout", 0, "--steps", 4], check=False)
    one_line(r, "--holdout 0.0: the sweep compares its settings by their held-out FVU")
    assert not (tmp_path / "sw").exists()


def test_a_log_that_lost_its_last_line_gets_the_step_back(env, tmp_path):
    """metrics.jsonl cut after the step the checkpoint holds (a kill or a full disk mid-write):
    the resumed run restores that step's row from the checkpoint, so every step is logged once,
    and the losses are an uninterrupted run's."""
    run_script("train.py", train_args(env, tmp_path / "a", "--max-steps", 4))
    run_script("train.py", train_args(env, tmp_path / "b", "--max-steps", 2, "--save-every", 1))
    log = tmp_path / "b" / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1][:10])  # step 2 lost mid-line
    r = run_script("train.py", train_args(env, tmp_path / "b", "--max-steps", 4, "--resume"))
    assert "had lost step(s) [2]" in r.stdout
    got = [json.loads(l) for l in log.read_text().splitlines()]
    want = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    assert got[1]["restored"] and got[1]["lr"] == pytest.approx(want[1]["lr"])


def test_text_and_tokenizers_that_cannot_work_are_one_line(env, tmp_path):
    """A lone UTF-16 surrogate in a row, a row far longer than the block can use, a tokenizer.json
    cut in half and a tokenizer with more ids than the model's embedding each ended in a
    traceback from inside tokenizers or torch (or, for the long row, in the kernel killing the
    process after minutes); each is now one line naming the file, and the row or field."""
    bad = tmp_path / "surrogate.jsonl"
    good = json.dumps(rows(1)[0])
    bad.write_text(good + "\n" + good.replace('"What', '"\\ud800What') + "\n")
    r = run_script("train.py", train_args(env, tmp_path / "t1", "--data", bad), check=False)
    one_line(r, f"{bad} line 2: field 'question' is not valid Unicode (a lone surrogate at "
             "character 1)")
    long = tmp_path / "long.jsonl"
    write_jsonl(long, rows(2) + [dict(rows(1)[0], deepseek_thinking_trajectory="x" * 70_000)])
    r = run_script("train.py", train_args(env, tmp_path / "t2", "--data", long, "--block-size",
                                          1000), check=False)
    one_line(r, f"{long} line 3: 70,0")
    assert "more than 64 x --block-size 1000 can hold" in r.stderr
    cut = tmp_path / "cut"
    cut.mkdir()
    text = (env / "model" / "tokenizer.json").read_text()
    (cut / "tokenizer.json").write_text(text[:len(text) // 2])
    r = run_script("eval.py", eval_args(env, tmp_path / "e1", "--tokenizer", cut), check=False)
    one_line(r, f"{cut / 'tokenizer.json'}: not a readable tokenizer.json")
    wide = tmp_path / "wide"
    wide.mkdir()
    from helpers import tiny_tokenizer
    tok = tiny_tokenizer(wide)  # 300 ids: the env model has 300 rows; add some
    tok.tk.add_tokens([f"<extra{i}>" for i in range(20)])
    tok.tk.save(str(wide / "tokenizer.json"))
    r = run_script("eval.py", eval_args(env, tmp_path / "e2", "--tokenizer", wide), check=False)
    one_line(r, f"{wide / 'tokenizer.json'}: 320 token ids, more than the 300 rows of")
    assert not (tmp_path / "t1").exists() and not (tmp_path / "e2").exists()


def test_inputs_that_no_longer_match_what_made_them(env, tmp_path):
    """An adapter whose adapter_config.json was edited after training (another lora_alpha scales
    every update) was used as edited although its rank1.json says otherwise; report.py combined
    ablations made on one base with a store collected on another."""
    run_script("train.py", train_args(env, tmp_path / "t", "--max-steps", 1))
    adapter = tmp_path / "t" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 32}))
    r = run_script("eval.py", ["run", "--model", env / "model", "--adapter", adapter, "--bench",
                               f"math500={env / 'math.jsonl'}", "--out", tmp_path / "e"],
                   check=False)
    one_line(r, f"{adapter / 'adapter_config.json'} no longer matches the training recorded in "
             f"{adapter / 'rank1.json'} (alpha: 16.0 at training vs 32.0 now)")
    run_script("collect.py", ["--model", env / "model", "--adapter", env / "adapter", "--data",
                              env / "rows.jsonl", "--out", tmp_path / "acts"])
    samples = write_jsonl(tmp_path / "s.jsonl", [dict(benchmark="math500", id="0",
                                                      question="What is 1+1?",
                                                      generation="<|im_start|>think\n2")])
    run_script("ablate.py", ["--model", env / "model", "--adapter", env / "adapter", "--samples",
                             samples, "--experiments", "layer", "--out", tmp_path / "ab"])
    ab = json.loads((tmp_path / "ab" / "ablations.json").read_text())
    ab["identity"]["model"]["config_sha256"] = "0" * 64  # made on another base
    (tmp_path / "other.json").write_text(json.dumps(ab))
    r = run_script("report.py", ["--ablations", tmp_path / "other.json", "--acts",
                                 tmp_path / "acts", "--out", tmp_path / "rep"], check=False)
    one_line(r, "--ablations and --acts were made on different base models (config_sha256")
    run_script("report.py", ["--ablations", tmp_path / "ab" / "ablations.json", "--acts",
                             tmp_path / "acts", "--out", tmp_path / "rep"])


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_completes(env, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk when the full finetune writes its checkpoint (an
    800 KB shard): safetensors' own error became a traceback; now it is one line naming the file,
    no half checkpoint is left, and the rerun gives an untroubled run's losses."""
    import resource
    import signal
    import subprocess
    from helpers import ROOT, script_cmd
    args = train_args(env, tmp_path / "full", "--mode", "full", "--max-steps", 2)

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
    r = subprocess.run(script_cmd("train.py", args), cwd=ROOT, text=True, capture_output=True,
                       preexec_fn=full_disk)
    one_line(r, "[Errno 27] File too large")
    assert "rank00000-of-00001.safetensors" in r.stderr.splitlines()[-1]
    assert not [n for n in os.listdir(tmp_path / "full" / "ckpt") if n.startswith(".tmp")]
    run_script("train.py", [*args, "--resume"])
    run_script("train.py", train_args(env, tmp_path / "clean", "--mode", "full", "--max-steps", 2))
    got, want = ([json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl")]
                 for d in ("full", "clean"))
    assert got == pytest.approx(want, abs=1e-6)


def test_an_adapter_on_another_base_of_the_same_shapes_is_one_line(env, tmp_path):
    """Two bases of the same shapes (config.json, weight file names and sizes all equal) and other
    weights: an adapter trained on one was used on the other without a word; now it is refused,
    naming both; --other-base takes it as meant, and a record of an earlier version (without
    weights_sample) still matches its own base."""
    import shutil
    from helpers import hf_tiny, save_hf
    other = tmp_path / "other"
    save_hf(hf_tiny(seed=1, vocab_size=300), other)
    shutil.copy(env / "model" / "tokenizer.json", other / "tokenizer.json")
    assert (other / "config.json").read_bytes() == (env / "model" / "config.json").read_bytes()
    run_script("train.py", train_args(env, tmp_path / "t", "--max-steps", 1))
    adapter = tmp_path / "t" / "adapter"
    args = lambda model, out, *extra: ["run", "--model", model, "--adapter", adapter, "--bench",
                                       f"math500={env / 'math.jsonl'}", "--out", tmp_path / out,
                                       "--max-context", 4096, "--thinking-budget", 8,
                                       "--max-answer-tokens", 4, *extra]
    r = run_script("eval.py", args(other, "e"), check=False)
    one_line(r, f"{adapter} was trained on {env / 'model'}, whose config or weights differ from "
             f"{other}'s (weights_sample); pass --other-base to use it anyway")
    assert not (tmp_path / "e" / "samples.jsonl").exists()
    run_script("eval.py", args(other, "e", "--other-base"))
    rec = json.loads((adapter / "rank1.json").read_text())
    del rec["made_from"]["model"]["weights_sample"]  # written before weights were sampled
    (adapter / "rank1.json").write_text(json.dumps(rec))
    run_script("eval.py", args(env / "model", "own"))
    assert (tmp_path / "own" / "results.json").is_file()


def test_a_huge_document_and_flags_that_turn_checkpoints_off_are_one_line(env, tmp_path):
    """A pretraining document of 16.8M characters was tokenized whole (one 100 MB line got the
    process killed by the kernel, with no word); --save-every 0 with --save-minutes 0 trained
    to the end with no checkpoint, so a kill lost the whole run."""
    from data import MAX_DOCUMENT_CHARS, Tokenizer, load_text
    from train import main as train_main
    corpus = write_jsonl(tmp_path / "text.jsonl", [dict(text="a b " * 100),
                                                   dict(text="x" * (MAX_DOCUMENT_CHARS + 1))])
    with pytest.raises(ValueError, match=f"{corpus} line 2: a document of 16,777,217 characters, "
                                         "more than 16,777,216; split it into documents"):
        load_text(str(corpus), Tokenizer(str(env / "model")), 16)
    with pytest.raises(SystemExit, match="--save-every 0 and --save-minutes 0 save no checkpoint "
                                         "before the end"):
        train_main([str(a) for a in train_args(env, tmp_path / "t", "--save-minutes", 0)])
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("err", ["ENOSPC", "EDQUOT", "EROFS"])
def test_an_os_error_during_an_atomic_write_names_the_file_and_leaves_no_temp(tmp_path,
                                                                              monkeypatch, err):
    """A full disk, a quota or a read-only file system at the fsync of an atomic write: the error
    named the temp file, and the temp file stayed; now one error names the file being written,
    the old file is whole and no temp file is left."""
    import errno
    path = tmp_path / "results.json"
    common.write_atomic(str(path), "old")

    def fail(fd):
        raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)))
    monkeypatch.setattr(common.os, "fsync", fail)
    with pytest.raises(OSError, match=f"writing {path}: {os.strerror(getattr(errno, err))}"):
        common.write_atomic(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
