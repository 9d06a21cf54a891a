"""
Train a rank-1 LoRA (or a full finetune) of Qwen2 on s1K-1.1 with the paper's recipe, under FSDP2.

    # the paper: rank-1 LoRA on all 7 projections of Qwen2.5-32B-Instruct, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --preset s1.1-rank1-32b \\
        --model /models/Qwen2.5-32B-Instruct --data s1K-1.1.parquet --out runs/rank1
    # the full-finetune baseline (s1.1-32B's recipe)
    torchrun --standalone --nproc_per_node=8 train.py --preset s1.1-full-32b \\
        --model ... --data ... --out runs/full
    # CPU smoke run (gloo), one process or two
    python train.py --model tiny/ --data rows.jsonl --out runs/cpu --dtype float32 --global-batch 4
    torchrun --nproc_per_node=2 train.py --model tiny/ --data rows.jsonl --out runs/cpu2 \\
        --dtype float32 --global-batch 4
    # the plan (steps, warm-up, tokens, memory per GPU) without loading weights
    python train.py --preset s1.1-rank1-32b --model /models/Qwen2.5-32B-Instruct \\
        --data s1K-1.1.parquet --dry-run

The recipe is in recipe.py; what the run adds:
- Loss: summed CE over trained tokens / trained tokens of the whole global batch (every rank knows
  every sequence's count, so no extra collective). FSDP averages gradients over ranks, so each rank
  scales its loss by the world size. Every step of an epoch is full except the last (1000 rows / 16
  = 62.5 -> 63 steps per epoch, 315 in all).
- Checkpoints: --save-every steps and on SIGTERM, to out/ckpt/step-NNNNNN, completed by its
  meta.json, the older ones deleted after it: a crash at any point leaves one to --resume from.
  They record the model, data and tokenizer they were trained on; --resume refuses others. LoRA
  checkpoints are replicated, so they resume on any world size; full-mode ones are per-rank.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from checkpoint import (model_identity, read_safetensors, save_hf_checkpoint, tokenizer_files,
                        write_safetensors)
from common import (DTYPES, OWNER_FILE, AppendLog, Parser, add_config_flags, check_out, claim_dir,
                    cleanup_dist, code_version, config_from_flags, differences, file_identity,
                    keep_steps, not_a_link, print0, read_json, read_log, remove_path,
                    setup_dist, user_errors, write_atomic, write_json)
from data import data_identity, load_examples
from lora_files import ADAPTER_FILES, save_adapter
from model import PREFILL_CHUNK, KVCache, Qwen2Config, load_tokenizer, prefill_bytes
from protocols import auto_batch, slot_bytes
from recipe import (PRESETS, TrainConfig, build_model, empty_steps, lr_at, make_optimizer, plan,
                    step_batch, train_memory, trainable)

# settings that must agree between a checkpoint and the run resuming it (the model, data and
# tokenizer are compared by what they are: see origin())
RESUME_KEYS = ("mode", "dtype", "rank", "alpha", "rslora", "targets", "layers", "lr",
               "warmup_ratio", "epochs", "global_batch", "beta1", "beta2", "eps", "weight_decay",
               "grad_clip", "block_size", "seed")


def parser():
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, TrainConfig, choices=dict(mode=("lora", "full"), dtype=sorted(DTYPES),
                                                   preset=sorted(PRESETS)))
    return p


def parse_args(argv=None):
    ns = parser().parse_args(argv)
    if ns.preset and ns.preset not in PRESETS:
        raise SystemExit(f"--preset {ns.preset!r}: expected one of {sorted(PRESETS)}")
    try:
        return config_from_flags(TrainConfig, ns, PRESETS.get(ns.preset or ""))
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from None


# -----------------------------------------------------------------------------
# checkpoints (safetensors + JSON only: nothing is ever unpickled)


def checkpoints(out):
    """The complete checkpoints in out/ckpt, oldest first. Each is a step-NNNNNN directory (steps
    done) whose meta.json, written last, marks it complete; a crash at any moment leaves the
    previous one whole, so this list never loses the newest finished save."""
    root = os.path.join(out, "ckpt")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    complete = lambda n: os.path.isfile(os.path.join(root, n, "meta.json"))
    return [os.path.join(root, n) for n in names if re.fullmatch(r"step-\d{6}", n) and complete(n)]


def save_checkpoint(cfg, model, opt, step, losses, rank, world, origin):
    """out/ckpt/step-NNNNNN: trainable weights, AdamW state, step, losses, RNG and what the run is
    made from. Written to a temp directory, completed by meta.json and renamed; older checkpoints
    are deleted only after that."""
    names = [n for n, _ in trainable(model)]
    tensors = {}
    for n, p in trainable(model):
        tensors[f"param.{n}"] = p.detach()
        for k, v in opt.state.get(p, {}).items():
            tensors[f"state.{n}.{k}"] = v.detach()
    if cfg.mode == "full":  # per-rank shards
        local = {k: (v.to_local() if isinstance(v, DTensor) else v).cpu().contiguous()
                 for k, v in tensors.items()}
    else:  # replicated: rank 0 writes one file
        local = {k: v.cpu().contiguous() for k, v in tensors.items()}
    local["rng.torch"] = torch.get_rng_state()
    meta = dict(step=step, world=world, mode=cfg.mode, losses=losses, names=names,
                config=asdict(cfg), origin=origin)
    root = os.path.join(cfg.out, "ckpt")
    final = os.path.join(root, f"step-{step + 1:06d}")
    tmp = os.path.join(root, f".tmp-step-{step + 1:06d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crash at this step
        os.makedirs(tmp)
    dist.barrier()
    if cfg.mode == "full" or rank == 0:
        name = f"rank{rank:05d}-of-{world:05d}" if cfg.mode == "full" else "state"
        try:
            write_safetensors(local, os.path.join(tmp, f"{name}.safetensors"))
        except OSError:  # a full disk: no half checkpoint left behind to fill it further
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()
    if rank == 0:
        write_json(os.path.join(tmp, "meta.json"), meta)  # last: the checkpoint is complete
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(cfg.out)[:-1]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(cfg, model, opt, rank, world, origin):
    """Restore the newest complete checkpoint: (next step, losses so far); (0, []) when there is
    none yet. Refuses one made with other settings, another model or other data, naming what
    differs."""
    found = checkpoints(cfg.out)
    if not found:  # killed before its first save: nothing to continue, so start at step 1
        print0(f"--resume: no complete checkpoint in {os.path.join(cfg.out, 'ckpt')} yet; "
               "starting at step 1")
        return 0, []
    path = found[-1]
    meta = read_json(os.path.join(path, "meta.json"))
    diff = {k: (meta["config"].get(k), getattr(cfg, k)) for k in RESUME_KEYS
            if meta["config"].get(k) != getattr(cfg, k)}
    if diff:
        raise SystemExit(f"--resume: {path} is from another run's config; differing settings "
                         + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}"
                                     for k, (a, b) in diff.items()))
    changed = differences(meta.get("origin") or {}, origin)
    if changed:
        raise SystemExit(f"--resume: {path} was trained on other inputs: " + "; ".join(changed[:3]))
    if cfg.mode == "full" and meta["world"] != world:
        raise SystemExit(f"--resume: {path} holds full-model shards for {meta['world']} ranks; run "
                         f"with --nproc_per_node={meta['world']} (adapter checkpoints resume on "
                         "any world size)")
    file = (os.path.join(path, f"rank{rank:05d}-of-{world:05d}.safetensors") if cfg.mode == "full"
            else os.path.join(path, "state.safetensors"))
    sd = read_safetensors(file)
    params = dict(trainable(model))
    if sorted(params) != sorted(meta["names"]):
        raise SystemExit(f"--resume: {path} holds other trainable tensors than this model has")
    with torch.no_grad():
        for n, p in params.items():
            _copy_into(p, sd[f"param.{n}"])
            st = {k.split(".")[-1]: v for k, v in sd.items()
                  if k.startswith(f"state.{n}.") and k.count(".") == n.count(".") + 2}
            if st:
                opt.state[p] = {k: (_like(p, v) if k != "step" else v.clone())
                                for k, v in st.items()}
    torch.set_rng_state(sd["rng.torch"])
    return meta["step"] + 1, meta["losses"]


def _like(p, v):
    if isinstance(p, DTensor):
        return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False)
    return v.to(p.device)


def _copy_into(p, v):
    (p.to_local() if isinstance(p, DTensor) else p).copy_(v)


def save_final(cfg, model, rank, provenance):
    """LoRA: a PEFT adapter in out/adapter. Full: an HF checkpoint in out/model with the base's
    tokenizer files (so that eval.py, transformers and vLLM load it as they load the base),
    gathered tensor by tensor (every rank takes part in each gather; rank 0 writes the shards as
    they fill). Both with rank1.json: what they were made from. They belong to this run: a
    resumed run replaces them."""

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    if cfg.mode == "lora":
        sd = {n: full(p) for n, p in model.named_parameters() if ".lora_" in n}
        if rank == 0:
            save_adapter(model, os.path.join(cfg.out, "adapter"), base_model_name_or_path=cfg.model,
                         state_dict=sd, provenance=provenance, overwrite=True,
                         command="train.py")
        return
    dtype = DTYPES[cfg.dtype]
    gathered = ((n, full(t).to(dtype)) for n, t in model.hf_tensors())  # all ranks gather each
    if rank == 0:
        save_hf_checkpoint(os.path.join(cfg.out, "model"), gathered,
                           {**model.cfg.to_hf_dict(), "torch_dtype": cfg.dtype},
                           copy_files=tokenizer_files(cfg.tokenizer or cfg.model),
                           extra=provenance, overwrite=True, command="train.py")
    else:
        for _ in gathered:
            pass


# -----------------------------------------------------------------------------
# main


def restore_steps(path, losses, lr_of, total):
    """Before a resumed run appends: a step the checkpoint holds but the log lost (its last line
    cut by a kill or a full disk) gets its row back from the checkpoint (loss and learning rate;
    what only the step knew, marked), so that metrics.jsonl has every step once, in order."""
    rows = {r["step"]: r for r in read_log(path)}
    lost = [s for s in range(1, len(losses) + 1) if s not in rows]
    if lost:
        for s in lost:
            rows[s] = dict(step=s, total=total, loss=losses[s - 1], lr=lr_of(s - 1),
                           grad_norm=None, restored="from the checkpoint: the log had lost it")
        write_atomic(path, "".join(json.dumps(rows[s]) + "\n" for s in sorted(rows)))
        print0(f"train.py: {path} had lost step(s) {lost[:5]}; restored from the checkpoint")


def dry_run(cfg, mcfg, stats, world, empty):
    """Print the plan (and return it): steps, schedule, the optimizer steps that would have no
    trained-on tokens (train.py refuses to start with any), and the memory per GPU of this run
    and of the later stages on the same model, for --world-size GPUs of --gpu-gb each (no GPU is
    needed to plan)."""
    world = cfg.world_size or world
    mem = train_memory(cfg, mcfg, world)
    n = stats["rows"] if stats else None
    spe, total, warmup = plan(cfg, n) if n else (None, None, None)
    gb = lambda b: round(b / 1e9, 2)
    plan_d = dict(mode=cfg.mode, world=world, trainable_params=mem["trainable_params"],
                  base_params=mem["base_params"],
                  optimizer=dict(name="AdamW", lr=cfg.lr, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip),
                  scheduler=dict(name="cosine", warmup_ratio=cfg.warmup_ratio, warmup_steps=warmup,
                                 min_lr=0.0),
                  epochs=cfg.epochs, global_batch=cfg.global_batch, steps_per_epoch=spe,
                  total_steps=total, micro_batch=cfg.micro_batch,
                  accumulation_per_rank=math.ceil(math.ceil(cfg.global_batch / world)
                                                  / cfg.micro_batch), data=stats,
                  memory_per_gpu_gb={k: gb(v) for k, v in mem.items()
                                     if k not in ("base_params", "trainable_params", "host")},
                  host_memory_per_gpu_gb=gb(mem["host"]), gpu_gb=cfg.gpu_gb,
                  fits=mem["total"] <= cfg.gpu_gb * 1e9,
                  later_stages=later_stages(mcfg, mem["base_params"], cfg.gpu_gb * 1e9),
                  steps_without_trained_tokens=empty)
    print0(json.dumps(plan_d, indent=1))
    return plan_d


def later_stages(mcfg, n_base, gpu_bytes):
    """Memory per GPU of eval.py run (one model copy per GPU, its batch chosen as
    protocols.auto_batch chooses it at s1's 32,768-token context) and collect.py (one document of
    up to that context, in windows of 4,096 tokens), with bf16 weights on a GPU of gpu_bytes
    (less CONTEXT_BYTES for the CUDA context)."""
    weights, ctx = n_base * 2, 32768
    dtype = torch.bfloat16
    free = gpu_bytes - CONTEXT_BYTES - weights
    try:
        batch, why = auto_batch(mcfg, dtype, ctx, free, 10**6)
    except ValueError as e:
        batch, why = 0, str(e)
    collect = weights + KVCache.row_bytes(mcfg, ctx, dtype) + prefill_bytes(mcfg, 4096, ctx, dtype)
    slots = batch * slot_bytes(mcfg, dtype, ctx)
    run = weights + prefill_bytes(mcfg, PREFILL_CHUNK, ctx, dtype) + slots
    return {"eval.py run": dict(batch=batch, why=why, memory_per_gpu_gb=round(run / 1e9, 2)),
            "collect.py": dict(window=4096, document_tokens=ctx,
                               memory_per_gpu_gb=round(collect / 1e9, 2))}


CONTEXT_BYTES = 5 * 10**8  # what the CUDA context and its libraries take on each GPU


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = setup_dist()
    try:
        with user_errors("train.py"):
            return train(cfg, rank, world, device)
    finally:
        cleanup_dist()


OUTPUTS = ("config.json", "metrics.jsonl", "result.json", "ckpt", "adapter", "model")


def prepare_out(cfg):
    """Rank 0, before anything is written: --out must not touch the inputs and must be a directory
    train.py made (or a new one); an earlier run there is continued (--resume) or, with
    --overwrite, cleared of this script's outputs (and of nothing else)."""
    check_out(cfg.out, {"--model": cfg.model, "--data": cfg.data, "--tokenizer": cfg.tokenizer})
    found = [n for n in OUTPUTS if os.path.exists(os.path.join(cfg.out, n))]
    claim_dir(cfg.out, "train.py", found)
    if cfg.resume or not found:
        for n in found:  # a resumed run writes into them: never through a link to elsewhere
            not_a_link(os.path.join(cfg.out, n))
        return
    if not cfg.overwrite:
        raise SystemExit(f"train.py: {cfg.out} already holds a run ({', '.join(found)}); pass "
                         "--resume to continue it or --overwrite to start over")
    owned = dict(ckpt=lambda n: re.fullmatch(r"(\.tmp-)?step-\d{6}", n),
                 adapter=lambda n: n in ADAPTER_FILES + (OWNER_FILE,),
                 model=lambda n: n.endswith((".safetensors", ".json")) or n in ("merges.txt",))
    for n in found:
        path = os.path.join(cfg.out, n)
        if n in owned and not os.path.islink(path):
            foreign = [f for f in os.listdir(path) if not owned[n](f)]
            if foreign:
                raise SystemExit(f"train.py: {path} holds files train.py did not write "
                                 f"({foreign[:3]}); choose another --out")
        remove_path(path)  # a link itself, never what it points to


def origin(cfg, tok):
    """What the run is made from: the base model, the data file and the tokenizer."""
    return dict(model=model_identity(cfg.model), data=data_identity(cfg.data),
                tokenizer=file_identity(tok.path))


def train(cfg, rank, world, device):
    """The run, phase by phase: the data (or the dry run's plan), the model and optimizer, the
    steps, the adapter or model at the end."""
    if not cfg.model:
        raise SystemExit("train.py: --model (an HF model directory) is required")
    mcfg = Qwen2Config.from_pretrained(cfg.model)
    if cfg.dry_run and not cfg.data:
        return dry_run(cfg, mcfg, None, world, None)
    if not cfg.data:
        raise SystemExit("train.py: --data (an s1K-1.1 .jsonl or .parquet file) is required")
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    examples, stats = load_examples(cfg.data, tok, cfg.block_size)
    trained = [sum(t != -100 for t in tg) for _, tg in examples]  # trained-on tokens per sequence
    empty = empty_steps(cfg, trained)
    if cfg.dry_run:
        return dry_run(cfg, mcfg, stats, world, empty)
    check_trainable(cfg, trained, empty)
    made_from = origin(cfg, tok)
    open_run(cfg, rank, world, mcfg, stats, made_from)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, mcfg, device, world)
    model.train()
    n_train = sum(p.numel() for _, p in trainable(model))
    print0(f"model: {cfg.mode}, {n_train:,} trainable parameters, world {world}, device "
           f"{device.type}")
    opt = make_optimizer(cfg, model)
    losses, total_run = run_steps(cfg, model, opt, examples, trained, made_from, rank, world,
                                  device)
    result = dict(steps=total_run, final_loss=losses[-1] if losses else None, losses=losses,
                  trainable_params=n_train, world=world, data_stats=stats, origin=made_from)
    save_final(cfg, model, rank, dict(made_from=made_from, config=asdict(cfg),
                                      steps=total_run, final_loss=result["final_loss"]))
    if rank == 0:
        write_json(os.path.join(cfg.out, "result.json"), result)
        what = "adapter" if cfg.mode == "lora" else "model"
        print0(f"done: {total_run} steps, final loss {losses[-1]:.4f}; "
               f"{what} in {os.path.join(cfg.out, what)}")
    return losses


def check_trainable(cfg, trained, empty):
    """Refuse data that would train on nothing, in all or in some optimizer steps."""
    if not sum(trained):
        raise SystemExit(f"train.py: {cfg.data} has no trained-on tokens within --block-size "
                         f"{cfg.block_size}: every assistant turn starts after it")
    if empty:
        raise SystemExit(f"train.py: {len(empty)} optimizer steps (e.g. {empty[:5]}) would have "
                         f"no trained-on tokens at --block-size {cfg.block_size} and "
                         f"--global-batch {cfg.global_batch}; raise either, or check the data")


def open_run(cfg, rank, world, mcfg, stats, made_from):
    """The output directory (checked, claimed) and its config.json, written by rank 0 while the
    others wait; the data's statistics printed."""
    if rank == 0:
        prepare_out(cfg)
        write_json(os.path.join(cfg.out, "config.json"),
                   {**asdict(cfg), "world": world, "model_config": asdict(mcfg),
                    "data_stats": stats, "origin": made_from, "code": code_version()})
    dist.barrier()
    print0(f"data: {stats['rows']} rows, {stats['tokens']:,} tokens, {stats['target_tokens']:,} "
           f"trained-on; {stats['truncated']} truncated at {cfg.block_size} tokens, losing "
           f"{stats['target_tokens_lost']:,} trained-on tokens"
           + (f"; {stats['empty_thinking']} with an empty thinking trace (trained on the answer "
              "alone)" if stats.get("empty_thinking") else ""))


def run_steps(cfg, model, opt, examples, trained, made_from, rank, world, device):
    """Every optimizer step from the start or the checkpoint on: (the losses of all steps, the
    steps of the run)."""
    spe, total, warmup = plan(cfg, len(examples))
    total_run = min(total, cfg.max_steps) if cfg.max_steps else total
    start, losses = 0, []
    if cfg.resume:
        start, losses = load_checkpoint(cfg, model, opt, rank, world, made_from)
    params = [p for _, p in trainable(model)]  # once: the step's all-reduce and clipping use them
    metrics_file = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        keep_steps(metrics_file, start)
        restore_steps(metrics_file, losses, lambda s: lr_at(cfg, s, total, warmup), total_run)
    # Ctrl-C (SIGINT) and a scheduler's SIGTERM finish the step, save a checkpoint and exit
    # with 128 + the signal's number, so that `train.py && eval.py` stops there
    stop = {"sig": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.__setitem__("sig", s))
    t_saved = time.time()
    metrics = AppendLog(metrics_file) if rank == 0 else None
    bar = tqdm(total=total_run, initial=start, disable=rank != 0, desc="train", file=sys.stderr)
    t_start = time.time()
    for step in range(start, total_run):
        t0 = time.time()
        rows = step_batch(cfg, step, len(examples), spe)
        loss, gnorm = forward_backward(cfg, model, params, examples, trained, rows, rank, world,
                                       device)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise SystemExit(f"train.py: non-finite {what} at step {step + 1} (loss {loss}, "
                             f"grad-norm {gnorm}); stopping, the last good checkpoint in "
                             f"{cfg.out}/ckpt is kept")
        lr = lr_at(cfg, step, total, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        eta = (time.time() - t_start) / (step + 1 - start) * (total_run - step - 1) / 60
        n_all = sum(len(examples[i][0]) for i in rows)
        log_step(bar, metrics, dict(step=step + 1, total=total_run, loss=loss, lr=lr,
                                    grad_norm=gnorm, tokens_per_s=n_all / (time.time() - t0),
                                    peak_mem_gb=peak_memory_gb(device), eta_min=eta))
        sig = agreed_signal(stop["sig"], world, device)
        due = (cfg.save_every and (step + 1) % cfg.save_every == 0
               or cfg.save_minutes and time.time() - t_saved >= 60 * cfg.save_minutes)
        if sig or step + 1 == total_run or due:
            save_checkpoint(cfg, model, opt, step, losses, rank, world, made_from)
            t_saved = time.time()
        if sig:
            bar.close()
            print0(f"{signal.Signals(sig).name}: saved the checkpoint after step {step + 1} in "
                   f"{cfg.out}/ckpt; to continue, run the same command with --resume")
            raise SystemExit(128 + sig)
    bar.close()
    return losses, total_run


def forward_backward(cfg, model, params, examples, trained, rows, rank, world, device):
    """One optimizer step's gradients (not yet applied): this rank's share of the global batch
    in micro-batches, the loss normalised by the global batch's trained-on tokens; the adapters'
    gradients averaged over ranks, all clipped. (loss, gradient norm before clipping)."""
    n_tok = sum(trained[i] for i in rows)
    mine, mb = rows[rank::world], cfg.micro_batch
    n_micro = math.ceil(math.ceil(len(rows) / world) / mb)  # equal on all ranks (collectives)
    local_loss = torch.zeros((), device=device)
    for j in range(n_micro):
        chunk = mine[j * mb:(j + 1) * mb]
        weight = 1.0 if chunk else 0.0  # a padding micro-step contributes nothing
        chunk = chunk or rows[:1]
        # right padding is exact for a causal model: real tokens never attend to later positions
        n = max(len(examples[i][0]) for i in chunk)
        ids = torch.tensor([examples[i][0] + [0] * (n - len(examples[i][0])) for i in chunk],
                           device=device)
        tgt = torch.tensor([examples[i][1] + [-100] * (n - len(examples[i][1])) for i in chunk],
                           device=device)
        loss_sum = model(ids, tgt, chunk_size=cfg.loss_chunk)
        (loss_sum * (weight * world / max(n_tok, 1))).backward()
        local_loss += loss_sum.detach() * weight
    if cfg.mode == "lora" and world > 1:  # replicated adapters: average as FSDP does
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    dist.all_reduce(local_loss)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)  # 0: none
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    return local_loss.item() / max(n_tok, 1), gnorm


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0


def log_step(bar, metrics, rec):
    """The step's line on the console (rank 0) and its record in metrics.jsonl."""
    if metrics is not None:
        bar.write(f"step {rec['step']:05d}/{rec['total']:05d} | loss {rec['loss']:.6f} | "
                  f"lr {rec['lr']:.3e} | grad-norm {rec['grad_norm']:.4f} | "
                  f"tok/s {rec['tokens_per_s']:.0f} | mem {rec['peak_mem_gb']:.2f}GB | "
                  f"eta {rec['eta_min']:.1f}m")
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
    bar.update(1)


def agreed_signal(sig, world, device):
    """The signal this rank caught, or the largest any rank caught: every rank stops after the
    same step, as the save is collective."""
    if world > 1:
        flag = torch.tensor([float(sig)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        sig = int(flag.item())
    return sig


if __name__ == "__main__":
    main()
