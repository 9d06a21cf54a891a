"""rehearse.py: README.md's cluster section, read from the README and run in order on a tiny model
with 2 CPU processes; the README's commands change only in sizes (SHRINK)."""
import json
import os
import shlex
import subprocess
import sys

import pytest

import rehearse
from helpers import ROOT

README = os.path.join(ROOT, "README.md")


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "rehearse.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_commands_run_as_written_but_for_their_sizes():
    """Each project command of the README runs with its own words, in order, and only SHRINK's
    size flags after them; the downloads and installs are the only lines not run."""
    cmds = rehearse.cluster_commands(README)
    assert any(c.startswith("torchrun") for c in cmds) and len(cmds) >= 15
    ran = 0
    for c in cmds:
        r = rehearse.rewrite(c, 2)
        if r is None:
            assert rehearse.assignments(c) is not None or c.split()[0] in ("huggingface-cli",
                                                                           "pip"), c
            continue
        ran += 1
        words, got = shlex.split(c), shlex.split(r)
        i, j = next(i for i, w in enumerate(words) if w.endswith(".py")), \
            next(j for j, w in enumerate(got) if w.endswith(".py"))
        assert got[j] == os.path.join(ROOT, words[i])
        extra = rehearse.SHRINK.get(rehearse.command_key(words), [])
        assert got[j + 1:] == words[i + 1:] + extra, c  # the README's words, then sizes only
        assert all(e.startswith("--") and e.lstrip("-").replace("-", "").isalpha()
                   or e.isdigit() for e in extra)
        assert ("--nproc_per_node=2" in got) == c.startswith("torchrun")
    assert ran == 13


@pytest.mark.slow
def test_the_readme_cluster_path_runs_end_to_end(tmp_path):
    """Every command of the README's cluster section exits 0 on 2 CPU processes and the next one
    consumes what it wrote: the recovery table, ablations, store, SAE, features, dashboard,
    report and rollout page all exist at the end."""
    r = run("--out", tmp_path / "r", "--nproc", 2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all 13 commands ran" in r.stdout
    d = tmp_path / "r"
    table = json.load(open(d / "results" / "recovery.json"))["table"]
    assert sorted(table) == ["aime24", "gpqa", "math500"]
    for f in ("runs/full/model/tokenizer.json", "runs/rank1/adapter/adapter_config.json",
              "results/ablate/ablations.json", "acts/index.json", "sae/cfg.json",
              "interp/features.json", "interp/dashboard.html", "report/report.html",
              "rollout/rollout.html"):
        assert (d / f).is_file(), f
    assert not (d / "results" / "ablate" / "ablations.parts.jsonl").exists()


@pytest.mark.slow
def test_every_command_block_of_running_md_runs_end_to_end(tmp_path):
    """docs/running.md's blocks, in order, with the README's inputs: training with its dry run,
    evaluation and both ablations, the export, collection, SAE and sweep, mining, dashboard,
    autointerp against the stand-in LLM, steering, the MLP baseline, compare, report, rollout.
    Only lm_eval (another tool) and the optional vLLM engine's two commands are not run."""
    r = run("--doc", "running", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all 25 commands ran" in r.stdout and r.stdout.count("skipped") == 3
    assert r.stdout.count("skipped (the optional vLLM engine)") == 2
    d = tmp_path / "r"
    for f in ("merged/config.json", "results/ablate_greedy/ablations.json", "sweep/sweep.json",
              "sae_lens/sae_weights.safetensors", "neuronpedia/features/batch-0.jsonl.gz",
              "interp/auto/categories.jsonl", "interp/steer.json", "interp/compare.json",
              "report/report.html"):
        assert (d / f).is_file(), f


def test_a_renamed_flag_in_the_readme_fails_the_rehearsal(tmp_path):
    """The rehearsal reads the README itself: renaming one flag of its first command stops it
    there, naming the step, the command and argparse's complaint."""
    text = open(README).read()
    assert text.count("--preset s1.1-rank1-32b") >= 1
    (tmp_path / "README.md").write_text(text.replace("--preset s1.1-rank1-32b",
                                                     "--presets s1.1-rank1-32b", 1))
    r = run("--readme", tmp_path / "README.md", "--out", tmp_path / "r")
    assert r.returncode != 0
    assert "step 1/13 failed" in r.stderr and "--presets s1.1-rank1-32b" in r.stderr
    assert "unrecognized arguments: --presets" in r.stderr or "ambiguous" in r.stderr


def test_the_readme_fused_path_check_runs_as_written():
    """The README's check of the fused kernels, run as written: on a machine without CUDA it
    says that the reference path is taken (on a GPU: the fused kernels, or the build's error)."""
    text = open(README).read()
    line = next(l for l in text.splitlines() if l.startswith("LORA_IMPL=cuda python -c"))
    cmd = line.split("   #")[0].replace("python", shlex.quote(sys.executable), 1)
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    want = "fused CUDA rank-1 kernels" if __import__("torch").cuda.is_available() else \
        "PyTorch reference path"
    assert f"lora: {want}" in r.stdout
