"""train.py on CPU: 1 process vs torchrun 2 processes, resume after SIGKILL, loss normalisation,
dry run, errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import recipe
from helpers import QWEN2_5_32B_JSON, ROOT, run_script, script_cmd, tiny_env

pytestmark = pytest.mark.slow
PY = sys.executable


def rows(n=6):
    return [dict(question=f"What is {i}*3?",
                 deepseek_thinking_trajectory=f"{i}*3 is {3 * i}. " * (1 + 3 * (i % 3)),
                 deepseek_attempt=f"{3 * i}") for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_env(tmp_path_factory.mktemp("train"), adapters=())
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows()) + "\n")
    return d


def run(setup, out, *extra, nproc=1, check=True, wait=True):
    args = ["--model", setup / "model", "--data", setup / "rows.jsonl", "--out", out,
            "--dtype", "float32", "--global-batch", 4, "--epochs", 2, "--lr", "1e-2", *extra]
    if not wait:
        return subprocess.Popen(script_cmd("train.py", args, nproc), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return run_script("train.py", args, nproc, check)


def losses(out):
    return [json.loads(l)["loss"] for l in open(out / "metrics.jsonl")]


def wait_for_steps(out, n, timeout=120):
    """Block until a running train.py has logged n steps to out/metrics.jsonl (or time runs out)."""
    f, t0 = out / "metrics.jsonl", time.time()
    while time.time() - t0 < timeout and not (f.exists() and len(f.read_text().splitlines()) >= n):
        time.sleep(0.02)


def adapter(out):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_one_process_equals_two(setup, tmp_path, mode):
    run(setup, tmp_path / "a", "--mode", mode)
    run(setup, tmp_path / "b", "--mode", mode, nproc=2)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 4 and la[-1] < la[0]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    if mode == "lora":
        a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
        assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    else:
        from model import Qwen2
        ma, mb = (Qwen2.from_pretrained(str(tmp_path / d / "model")) for d in ("a", "b"))
        for (k, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=k)


def test_cpu_offload_trains_as_without_it(setup, tmp_path):
    """--cpu-offload (FSDP2's CPUOffloadPolicy: sharded state and the optimizer step on the host)
    changes where the full finetune's state lives, not what it computes."""
    run(setup, tmp_path / "a", "--mode", "full", "--max-steps", 2, nproc=2)
    run(setup, tmp_path / "b", "--mode", "full", "--max-steps", 2, "--cpu-offload", nproc=2)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)
    r = run(setup, tmp_path / "c", "--cpu-offload", check=False)
    assert r.returncode != 0 and "--cpu-offload is for --mode full" in r.stderr


def test_micro_batches_equal_single_sequences(setup, tmp_path):
    """Right-padded micro-batches of unequal sequences (3 + 1 of a global batch of 4) train exactly
    like the paper's micro-batch 1."""
    run(setup, tmp_path / "a", "--mode", "lora")
    run(setup, tmp_path / "b", "--mode", "lora", "--micro-batch", "3")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_pretraining_corpus_is_packed(setup, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"What is {i}*3? The product is {3 * i}."})
                              + "\n" for i in range(40)))
    r = run(setup, tmp_path / "p", "--mode", "full", "--data", str(corpus), "--block-size", "32",
            "--micro-batch", "4")
    cfg = json.load(open(tmp_path / "p" / "config.json"))
    stats = cfg["data_stats"]
    assert (stats["documents"] == 40 and stats["tokens"] == stats["target_tokens"]
            == 32 * stats["rows"])
    assert len(losses(tmp_path / "p")) == 2 * -(-stats["rows"] // 4), r.stdout[-500:]


def test_resume_after_sigkill_and_across_world_sizes(setup, tmp_path):
    run(setup, tmp_path / "ref")
    ref, ref_ad = losses(tmp_path / "ref"), adapter(tmp_path / "ref")
    # SIGKILL after step 2 has been logged, then resume
    p = run(setup, tmp_path / "k", "--save-every", "1", wait=False)
    wait_for_steps(tmp_path / "k", 2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "k" / "adapter").exists()
    run(setup, tmp_path / "k", "--save-every", "1", "--resume")
    res = json.load(open(tmp_path / "k" / "result.json"))
    assert max(abs(x - y) for x, y in zip(res["losses"], ref)) < 1e-6 and len(res["losses"]) == 4
    a = adapter(tmp_path / "k")
    assert max((a[k] - ref_ad[k]).abs().max().item() for k in a) < 1e-6
    # 2 ranks for 2 steps, resumed on 1 rank; and 1 rank resumed on 2
    run(setup, tmp_path / "w21", "--max-steps", "2", nproc=2)
    run(setup, tmp_path / "w21", "--resume")
    run(setup, tmp_path / "w12", "--max-steps", "2")
    run(setup, tmp_path / "w12", "--resume", nproc=2)
    for d in ("w21", "w12"):
        res = json.load(open(tmp_path / d / "result.json"))
        assert max(abs(x - y) for x, y in zip(res["losses"], ref)) < 1e-5, d
        a = adapter(tmp_path / d)
        assert max((a[k] - ref_ad[k]).abs().max().item() for k in a) < 1e-5, d


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_save_exit_nonzero_and_resume_equals_an_uninterrupted_run(setup, tmp_path, sig):
    """A scheduler's SIGTERM and Ctrl-C both finish the step, save a checkpoint and exit with
    128 + the signal (so `train.py && eval.py` stops); --resume then gives the uninterrupted run."""
    run(setup, tmp_path / "ref", "--epochs", "30")
    p = run(setup, tmp_path / "t", "--epochs", "30", wait=False)
    wait_for_steps(tmp_path / "t", 1)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, out[-2000:]
    assert f"{sig.name}: saved the checkpoint" in out and "--resume" in out
    assert "Traceback" not in out
    (step_dir,) = (tmp_path / "t" / "ckpt").iterdir()  # the one complete checkpoint
    meta = json.load(open(step_dir / "meta.json"))
    assert step_dir.name == f"step-{meta['step'] + 1:06d}"
    assert meta["step"] + 1 == len(losses(tmp_path / "t")) < 60
    run(setup, tmp_path / "t", "--epochs", "30", "--resume")
    assert losses(tmp_path / "t") == losses(tmp_path / "ref")
    a, b = adapter(tmp_path / "t"), adapter(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_by_wall_time_by_default(setup, tmp_path):
    """Without --save-every, a run still checkpoints every --save-minutes (20 by default)."""
    run(setup, tmp_path / "m", "--save-minutes", "1e-9", "--max-steps", "3")
    assert sorted(d.name for d in (tmp_path / "m" / "ckpt").iterdir()) == ["step-000003"]
    assert json.load(open(tmp_path / "m" / "config.json"))["save_minutes"] == 1e-9


def test_loss_normalised_by_tokens_of_the_global_batch(setup, tmp_path):
    """Step 1 on 2 ranks x accumulation 2, sequences of very different trained lengths: the logged
    loss is sum CE / trained tokens of all 4 sequences (not a mean of per-sequence means), and the
    gradient norm is that of this loss; both recomputed here by hand from the saved initial
    adapter."""
    from data import Tokenizer, load_s1
    from lora import adapters
    from lora_files import load_adapter
    from model import Qwen2
    run(setup, tmp_path / "n", "--max-steps", "1", "--grad-clip", "1e9",
        nproc=2)  # lr is 0 at step 1
    rec = json.loads(open(tmp_path / "n" / "metrics.jsonl").readline())
    ex, _ = load_s1(str(setup / "rows.jsonl"), Tokenizer(str(setup / "model")), 20000)
    cfg = recipe.TrainConfig(global_batch=4, epochs=2)
    batch = recipe.step_batch(cfg, 0, len(ex), recipe.plan(cfg, len(ex))[0])
    counts = [sum(t != -100 for t in ex[i][1]) for i in batch]
    assert max(counts) >= 2 * min(counts)  # very different lengths
    m = Qwen2.from_pretrained(str(setup / "model"))
    load_adapter(m, str(tmp_path / "n" / "adapter"), verbose=False)
    sums = [m(torch.tensor([ex[i][0]]), torch.tensor([ex[i][1]]), chunk_size=64) for i in batch]
    loss = sum(sums) / sum(counts)
    assert abs(loss.item() - rec["loss"]) < 1e-6
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / 4
    assert abs(mean_of_means.item() - rec["loss"]) > 1e-4  # the test can tell the two apart
    loss.backward()
    gn = torch.sqrt(sum((p.grad ** 2).sum() for a in adapters(m) for p in (a.lora_A,
                                                                           a.lora_B))).item()
    assert abs(gn - rec["grad_norm"]) < 1e-5 * max(1, gn)


def test_lr_schedule_and_plan_match_hf():
    cfg = recipe.TrainConfig(**recipe.PRESETS["s1.1-rank1-32b"])
    spe, total, warm = recipe.plan(cfg, 1000)
    assert (spe, total, warm) == (63, 315, 16)
    assert recipe.lr_at(cfg, 0, total, warm) == 0.0
    assert recipe.lr_at(cfg, 8, total, warm) == pytest.approx(5e-4)
    assert recipe.lr_at(cfg, 16, total, warm) == pytest.approx(1e-3)
    assert recipe.lr_at(cfg, 314, total, warm) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 298 / 299)))
    transformers = pytest.importorskip("transformers")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sch = transformers.get_cosine_schedule_with_warmup(opt, warm, total)
    for s in range(total):
        assert recipe.lr_at(cfg, s, total, warm) == pytest.approx(opt.param_groups[0]["lr"],
                                                                 abs=1e-12)
        opt.step()
        sch.step()


def test_lora_base_is_stored_in_dtype_and_full_mode_keeps_fp32_masters(setup):
    """A bf16 LoRA run holds (and computes with) a bf16 base and fp32 adapters; full mode holds
    fp32 masters that FSDP casts to bf16 for compute. Copying a checkpoint into a model built in
    fp32 kept the base in fp32: twice the memory, and attention off the flash kernels."""
    code = ("import json, common, recipe; from model import Qwen2Config\n"
            "dev = common.setup_dist()[2]\n"
            f"mcfg = Qwen2Config.from_pretrained({str(setup / 'model')!r})\n"
            "for mode in ('lora', 'full'):\n"
            f"    cfg = recipe.TrainConfig(model={str(setup / 'model')!r}, mode=mode,"
            " dtype='bfloat16')\n"
            "    m = recipe.build_model(cfg, mcfg, dev, 1)\n"
            "    print(json.dumps(sorted({f'{p.dtype} {p.requires_grad}'"
            " for p in m.parameters()})))")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    lora, full = (json.loads(line) for line in r.stdout.splitlines())
    assert lora == ["torch.bfloat16 False", "torch.float32 True"]
    assert full == ["torch.float32 True"]


def test_dry_run_paper_preset_on_32b_config(tmp_path, setup):
    (tmp_path / "config.json").write_text(QWEN2_5_32B_JSON)
    (tmp_path / "s1k.jsonl").write_text("\n".join(json.dumps(r) for r in rows(1000)) + "\n")
    r = subprocess.run([PY, os.path.join(ROOT, "train.py"), "--preset", "s1.1-rank1-32b",
                        "--model", str(tmp_path), "--tokenizer", str(setup / "model"),
                        "--data", str(tmp_path / "s1k.jsonl"), "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout[r.stdout.index("{"):])
    assert plan["trainable_params"] == 8_388_608 and plan["base_params"] == 32_763_876_352
    assert plan["optimizer"] == dict(name="AdamW", lr=1e-3, betas=[0.9, 0.95], eps=1e-8,
                                     weight_decay=1e-4, grad_clip=1.0)
    assert (plan["steps_per_epoch"], plan["total_steps"],
            plan["scheduler"]["warmup_steps"]) == (63, 315, 16)
    assert plan["epochs"] == 5 and plan["global_batch"] == 16


def test_dry_run_plans_any_world_size_by_hand(tmp_path):
    """--dry-run --world-size 8 on one CPU process: memory per GPU of each README run at 32B,
    against the sums written out here (the parameter counts of docs/paper.md section H)."""
    (tmp_path / "config.json").write_text(QWEN2_5_32B_JSON)
    base, layer, root = 32_763_876_352, 487_605_248, 778_567_680 * 2 + 5120
    acts = 20000 * 5120 * 2 * 64 + 20000 * (12 * 5120 + 4 * 27648) * 2 + 1024 * 152064 * 4 * 3
    gathered = (2 * layer + root) * 2
    want = {"s1.1-rank1-32b": dict(sharded=base * 2 / 8, gathered=gathered,
                                   adapters=8_388_608 * 16, activations=acts),
            "s1.1-full-32b": dict(sharded=base * 16 / 8, gathered=gathered + layer * 6,
                                  adapters=0, activations=acts)}
    for preset, extra in (("s1.1-rank1-32b", []), ("s1.1-full-32b", []),
                          ("s1.1-full-32b", ["--cpu-offload"])):
        r = subprocess.run([PY, os.path.join(ROOT, "train.py"), "--preset", preset, "--model",
                            str(tmp_path), "--dry-run", "--world-size", "8", *extra],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        plan = json.loads(r.stdout[r.stdout.index("{"):])
        w = dict(want[preset])
        host = w["sharded"] if extra else 0
        w["sharded"] -= host
        mem = plan["memory_per_gpu_gb"]
        assert mem == {**{k: round(v / 1e9, 2) for k, v in w.items()},
                       "total": round(sum(w.values()) / 1e9, 2)}, (preset, extra)
        assert plan["host_memory_per_gpu_gb"] == round(host / 1e9, 2) and plan["world"] == 8
        assert plan["fits"] == (preset != "s1.1-full-32b" or bool(extra))  # 95 GB without offload
    stages = plan["later_stages"]  # bf16 weights + one prefill + slots x KV row on 80e9 bytes
    assert stages["eval.py run"]["batch"] == 1 and stages["eval.py run"]["memory_per_gpu_gb"] == \
        round((base * 2 + 2048 * (4 * 5120 + 3 * 27648) * 2 + 2048 * 32768 + 152064 * 8
               + 2 * 64 * 8 * 128 * 32768 * 2 + 8 * 32769 + 16 * 152064) / 1e9, 2)
    assert stages["collect.py"]["memory_per_gpu_gb"] == round(
        (base * 2 + 2 * 64 * 8 * 128 * 32768 * 2 + 4096 * (4 * 5120 + 3 * 27648) * 2
         + 4096 * 32768 + 152064 * 8) / 1e9, 2)


def test_full_mode_checkpoint_loads_in_transformers_with_its_tokenizer(setup, tmp_path):
    """train.py --mode full writes a model directory that transformers loads, weights and
    tokenizer, as it loads the base: the README's eval of runs/full/model needs it."""
    transformers = pytest.importorskip("transformers")
    run(setup, tmp_path / "f", "--mode", "full", "--max-steps", 1)
    d = tmp_path / "f" / "model"
    assert (d / "tokenizer.json").read_bytes() == (setup / "model" / "tokenizer.json").read_bytes()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    from model import Qwen2
    ours = Qwen2.from_pretrained(str(d))
    ids = torch.tensor([tok.encode("What is 12*3?")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input


def test_error_malformed_data(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows(1)[0]) + "\n{not json\n")
    r = subprocess.run([PY, "train.py", "--model", str(setup / "model"), "--data", str(bad),
                        "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "bad.jsonl line 2: not valid JSON" in r.stderr
    bad.write_text(json.dumps({k: v for k, v in rows(1)[0].items()
                               if k != "deepseek_thinking_trajectory"}) + "\n")
    r = subprocess.run([PY, "train.py", "--model", str(setup / "model"), "--data", str(bad),
                        "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    want = "bad.jsonl line 1: field 'deepseek_thinking_trajectory' must be a string, got nothing"
    assert want in r.stderr
    r = subprocess.run([PY, "train.py", "--model", str(setup / "model"), "--data",
                        str(tmp_path / "nope.jsonl")],
                       capture_output=True, text=True, cwd=ROOT)
    assert "nope.jsonl: no such data file" in r.stderr
    assert not (tmp_path / "o" / "ckpt").exists()


def test_error_checkpoint_from_another_config(setup, tmp_path):
    run(setup, tmp_path / "c", "--max-steps", "1")
    r = run(setup, tmp_path / "c", "--resume", "--lr", "5e-3", check=False)
    assert (r.returncode != 0 and "is from another run's config" in r.stderr
            and "lr: checkpoint 0.01 vs now 0.005" in r.stderr)
    r = run(setup, tmp_path / "c", "--resume", "--dtype", "bfloat16", check=False)
    assert r.returncode != 0 and "dtype: checkpoint 'float32' vs now 'bfloat16'" in r.stderr
    r = run(setup, tmp_path / "c", check=False)
    assert (r.returncode != 0 and "already holds a run" in r.stderr
            and "pass --resume to continue it or --overwrite to start over" in r.stderr)


def test_error_unwritable_output(setup, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")  # root ignores permissions: use a path under a regular file instead
        out = blocker / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "run"
    r = run(setup, out, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [l for l in r.stderr.splitlines() if str(out) in l]
