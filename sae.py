"""
Training the BatchTopK SAE (batchtopk.py) on the adapter scalars (collect.py stores them).

    # 448 -> 3,584 latents, k = 16 (the paper's), on normalised inputs
    python sae.py train --acts acts/ --out sae/
    # the FVU-L0 frontier: k in {8, 16, 32} x expansion in {4, 8, 16} -> sweep.json, sweep.svg
    python sae.py sweep --acts acts/ --out sweep/
    # for other tools (interop.py): a folder SAELens loads; the mined features for Neuronpedia
    python sae.py export --sae sae/ --out sae_lens/
    python sae.py export --sae sae/ --format neuronpedia --features interp/features.json \
        --autointerp interp/auto/ --out neuronpedia/
    # library use (the config and the step are in batchtopk.py)
    from batchtopk import SAEConfig
    from sae import train_sae
    sae = train_sae(x, SAEConfig(expansion=8, k=16))      # x: (N, d) float tensor

The paper's recipe (docs/paper.md section E) with the official code's flaws fixed (G4 and G5):
- Per-dimension input scale (the std) and b_dec from the data mean; each decoder row starts at a
  different training row (--init random: random directions), W_enc at W_dec^T, calibrated. Decoder
  rows keep unit norm: the parallel gradient is removed before a step, rows renormalised after.
- BatchTopK selection with ReLU; the inference threshold is an EMA of the smallest selected
  activation. The decoder side of a step is a sparse product over the k * B selected pairs, so a
  step costs two dense (B, d) x (d, n) products instead of five.
- AuxK loss on latents that have not fired for a tenth of the run (at least 100 mean firing
  intervals; `schedule`), k_aux = d / 2, target residual detached, coefficient 1/32.
- Adam, lr 5e-4: 100 warm-up steps, constant, linear decay over the last 20%. The default trains
  on 10M tokens (one epoch at the paper's scale; more epochs on a smaller store); held-out FVU at
  every tenth of the run says whether it reached a plateau (`convergence`), a warning when not.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
from safetensors.torch import save
from tqdm import tqdm

from batchtopk import SAE, SAEConfig, evaluate, update
from checkpoint import read_safetensors, safetensors_metadata
from common import (AppendLog, Parser, add_config_flags, check_out, config_from_flags,
                    differences, file_identity, keep_steps, numbers, pick_device, read_json,
                    read_log, same_origin, start_run, user_errors, write_atomic, write_json)
from figures import frontier_chart
from interop import export_neuronpedia, export_saelens
from store import ActivationStore

# -----------------------------------------------------------------------------
# the schedule


def schedule(cfg, n_train, n_latents):
    """(steps per epoch, total steps, dead window). Epochs: cfg.epochs, or enough for min_tokens.
    Dead window: cfg.dead_tokens, or a tenth of the run (the official 1M at the paper's 10M), at
    least 100 mean firing intervals (n_latents / k): AuxK works on a small store too."""
    per_epoch = max(1, n_train // cfg.batch_size)
    epochs = cfg.epochs or max(1, math.ceil(cfg.min_tokens / (per_epoch * cfg.batch_size)))
    total = cfg.steps or per_epoch * epochs
    return per_epoch, total, cfg.dead_tokens or max(total * cfg.batch_size // 10,
                                                    100 * n_latents // cfg.k)


def convergence(curve, tol):
    """The held-out FVU measured at each tenth of the run -> how much it fell in the last tenth
    before the lr decay (the last 20%), in units of the data's variance (FVU is a fraction of
    it; a relative fall never ends on a power-law curve); plateau when that is at most tol."""
    fall = curve[6][1] - curve[7][1] if len(curve) >= 8 else None
    return dict(curve=curve, fall=fall, plateau=None if fall is None else fall <= tol)


def save_state(path, step, sae, opt, state, epoch_rng, agg):
    """What a resumed run needs, written whole: weights, Adam, counters, data order, log window."""
    t = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        t.update({f"opt.{i}.{k}": v for k, v in st.items()})
    t.update(since=state["since"], epoch_rng=epoch_rng)
    meta = dict(step=step, threshold_steps=state["threshold_steps"], agg=agg,
                curve=state["curve"])
    write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in t.items()},
                            metadata={"rank1": json.dumps(meta)}))


def load_state(path, sae, opt, state, dev):
    """Restore save_state's file; returns (steps done, epoch generator state, logging window)."""
    t = read_safetensors(path)
    meta = json.loads(safetensors_metadata(path)["rank1"])
    sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
    opt_sd = opt.state_dict()
    groups = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".")
            groups.setdefault(int(i), {})[name] = v.to(dev) if name != "step" else v
    opt.load_state_dict(dict(state=groups, param_groups=opt_sd["param_groups"]))
    state.update(since=t["since"].to(dev), threshold_steps=meta["threshold_steps"],
                 curve=meta["curve"])
    return meta["step"], t["epoch_rng"], meta["agg"]


def train_sae(x, cfg=None, log=print, metrics_file=None, state_file=None):
    """Train on an in-memory (N, d) float tensor; returns the SAE (.metrics: held-out metrics).
    With state_file, training state is saved there every cfg.save_every steps and a run that
    finds the file continues from it, with the same result as a run that was never stopped."""
    cfg = cfg or SAEConfig()
    dev = pick_device(cfg.device)
    x, hold, train, g = split(x, cfg, dev)
    sae = init_sae(x, train, cfg, dev)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps_per_epoch, total, dead_tokens = schedule(cfg, len(train), sae.n_latents)
    state = dict(since=torch.zeros(sae.n_latents, dtype=torch.long, device=dev), threshold_steps=0,
                 dead_tokens=dead_tokens, curve=[])
    start, agg, epoch_rng = 0, {}, None
    if state_file and os.path.isfile(state_file):
        start, epoch_rng, agg = load_state(state_file, sae, opt, state, dev)
        g.set_state(epoch_rng)  # draws this epoch's order again, and goes on as it did
        order = train[torch.randperm(len(train), generator=g)]
    bar = tqdm(range(start, total), desc="sae", file=sys.stderr, disable=log is None)
    t0 = time.time()
    for step in bar:
        if step % steps_per_epoch == 0:
            epoch_rng = g.get_state()
            order = train[torch.randperm(len(train), generator=g)]
        i = step % steps_per_epoch
        xb = x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].float().to(dev) / sae.scale
        # linear warm-up, constant, linear decay to 0 over the last 20%
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup), (total - step) / (0.2 * total))
        for grp in opt.param_groups:
            grp["lr"] = lr
        m = update(sae, opt, xb, cfg, state)
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:  # stop before a diverged SAE is saved, mined or resumed from
            raise ValueError(f"sae: training diverged at step {step + 1} (non-finite {bad[0]}); "
                             "lower --lr")
        for k, v in m.items():
            agg[k] = agg.get(k, 0.0) + v
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            n = (step % cfg.log_every) + 1
            rec = {"step": step + 1, **{k: v / n for k, v in agg.items()},
                   "tokens_per_s": (step + 1 - start) * cfg.batch_size / (time.time() - t0)}
            log_step(sae, hold, rec, metrics_file, bar)
            agg = {}
        if len(hold) and (step + 1) % max(1, total // 10) == 0 and len(state["curve"]) < 10:
            state["curve"].append((step + 1, evaluate(sae, hold[:8192])["fvu"]))
        if state_file and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_state(state_file, step + 1, sae, opt, state, epoch_rng, agg)
    sae.metrics = heldout_metrics(sae, hold, cfg, total, dead_tokens, state["curve"], log)
    return sae.cpu()


def split(x, cfg, dev):
    """x checked (2-D, finite): (x, the held-out rows on dev, the training rows' indices, the
    generator that drew them and draws each epoch's order)."""
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"train_sae: expected an (N, d) tensor, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"train_sae: row {int(bad.nonzero()[0])} holds NaN or Inf values")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=g)
    n_hold = int(len(x) * cfg.holdout)
    return x, x[perm[:n_hold]].float().to(dev), perm[n_hold:], g


def init_sae(x, train, cfg, dev):
    """A new SAE: input scales (std per input, with normalize) and decoder bias from up to 200k
    training rows, weights initialised from them (init "data") or at random."""
    if cfg.k > cfg.expansion * x.shape[1]:
        raise ValueError(f"--k {cfg.k}: more than the {cfg.expansion * x.shape[1]} latents "
                         f"(--expansion {cfg.expansion} x {x.shape[1]} inputs)")
    sae = SAE(x.shape[1], cfg.expansion * x.shape[1], cfg.k).to(dev)
    with torch.no_grad():
        sample = x[train[:200_000]].float().to(dev)
        if cfg.normalize:
            sae.scale.copy_(sample.std(0).clamp(min=1e-8 * sample.std(0).max().clamp(min=1e-30)))
        sae.b_dec.copy_((sample / sae.scale).mean(0))
        sae.init_weights(sample / sae.scale - sae.b_dec if cfg.init == "data" else None,
                         torch.Generator().manual_seed(cfg.seed))
    return sae


def log_step(sae, hold, rec, metrics_file, bar):
    """A logged step's record (threshold and held-out FVU added) to metrics.jsonl and the bar."""
    rec["threshold"] = sae.threshold.item()
    if len(hold):
        rec["heldout_fvu"] = evaluate(sae, hold[:8192])["fvu"]
    if metrics_file:
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
    bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("fvu", "l0", "dead")})


def heldout_metrics(sae, hold, cfg, total, dead_tokens, curve, log):
    """The trained SAE's held-out metrics with the run's size and convergence (None without
    held-out rows), logged, with a warning when the FVU had not reached a plateau."""
    mm = evaluate(sae, hold) if len(hold) else None
    if mm:
        mm.update(steps=total, train_tokens=total * cfg.batch_size, dead_tokens=dead_tokens,
                  convergence=convergence(curve, cfg.plateau))
    if mm and log:
        log(f"sae: held-out FVU {mm['fvu']:.4f} (raw {mm['fvu_raw']:.4f}) | L0 {mm['l0']:.2f} | "
            f"dead {100 * mm['dead_fraction']:.1f}% | {mm['tokens']} tokens")
        if mm["convergence"]["plateau"] is False:
            log(f"sae: warning: held-out FVU still fell {mm['convergence']['fall']:.4f} in the "
                f"last tenth before the lr decay (plateau: {cfg.plateau:g}); train longer "
                "(--epochs)")
    return mm


# -----------------------------------------------------------------------------
# command line


SAE_FILES = ("sae.safetensors", "cfg.json", "metrics.jsonl", "metrics.json", "run.json",
             "train-state.safetensors")


def cmd_train(args):
    """Train on a store into --out. A rerun with the same store and settings continues an
    unfinished run (train-state.safetensors) or, when it finished, has nothing to do; other
    settings need --overwrite (which replaces this command's files only)."""
    check_out(args.out, {"--acts": args.acts})
    store = ActivationStore(args.acts)
    cfg = config_from_flags(SAEConfig, args)
    settings = {k: v for k, v in asdict(cfg).items() if k != "save_every"}  # what decides it
    made_from = dict(store=store.identity(), config=settings)
    out = lambda n: os.path.join(args.out, n)
    if os.path.isfile(out("cfg.json")) and not args.overwrite:
        same_origin(read_json(out("cfg.json")).get("made_from") or {}, made_from, out("cfg.json"))
        print(f"sae: {args.out} already holds this SAE")
        return SAE.load(args.out)
    start_run(args.out, "run.json", made_from, SAE_FILES.__contains__, args.overwrite,
              "sae.py train")
    state_file = out("train-state.safetensors")
    step = (json.loads(safetensors_metadata(state_file)["rank1"])["step"]
            if os.path.isfile(state_file) else 0)
    keep_steps(out("metrics.jsonl"), step)
    with AppendLog(out("metrics.jsonl")) as mf:
        sae = train_sae(store.load_all(), cfg, metrics_file=mf, state_file=state_file)
    write_json(out("metrics.json"), dict(heldout=sae.metrics, sites=store.index["sites"],
                                         made_from=made_from))
    sae.save(args.out, cfg, sae.metrics, made_from)  # cfg.json last: the SAE is complete
    for n in ("train-state.safetensors", "run.json"):
        if os.path.exists(out(n)):
            os.remove(out(n))
    return sae


def cmd_sweep(args):
    """The frontier: an SAE per (k, expansion) in OUT/k{k}-x{expansion}/ (resumable, as train),
    then sweep.json and sweep.svg (held-out FVU against L0, dead fraction per setting)."""
    check_out(args.out, {"--acts": args.acts})
    store = ActivationStore(args.acts)
    cfg = {k: v for k, v in asdict(config_from_flags(SAEConfig, args)).items()
           if k not in ("k", "expansion", "save_every")}
    made_from = dict(store=store.identity(), ks=args.ks, expansions=args.expansions, config=cfg)
    if int(store.index["shape"][0] * cfg["holdout"]) < 1:  # the frontier is drawn from it
        raise ValueError(f"--holdout {cfg['holdout']}: the sweep compares its settings by their "
                         f"held-out FVU, and {store.index['shape'][0]:,} tokens x "
                         f"{cfg['holdout']} hold out none; give a larger fraction")
    summary = os.path.join(args.out, "sweep.json")
    if os.path.isfile(summary) and not args.overwrite:
        same_origin(read_json(summary).get("made_from") or {}, made_from, summary)
    rows = []
    for e in args.expansions:
        for k in args.ks:
            sub = os.path.join(args.out, f"k{k}-x{e}")
            cmd_train(argparse.Namespace(**{**vars(args), "k": k, "expansion": e, "out": sub}))
            c = read_json(os.path.join(sub, "cfg.json"))
            rows.append(dict(k=k, expansion=e, n_latents=c["n_latents"], dir=sub, **{
                m: c["final"][m] for m in ("fvu", "fvu_raw", "l0", "dead_fraction", "steps")},
                plateau=c["final"]["convergence"]["plateau"]))
    write_json(summary, dict(made_from=made_from, rows=rows))
    write_atomic(os.path.join(args.out, "sweep.svg"), frontier_chart(rows))
    print(f"sae sweep: {len(rows)} settings -> {os.path.join(args.out, 'sweep.svg')}")
    return rows


def cmd_export(args):
    """The SAE as an SAELens folder, or its mined features (and explanations) in Neuronpedia's
    export layout (interop.py)."""
    check_out(args.out, {"--sae": args.sae, "--features": args.features,
                         "--autointerp": args.autointerp})
    sae = SAE.load(args.sae)
    if args.format == "saelens":
        export_saelens(sae, args.sae, args.out, args.overwrite)
        print(f"sae export: {args.sae} -> {args.out} (sae_lens.SAE.load_from_disk reads it)")
        return
    if not args.features:
        raise ValueError("--format neuronpedia needs --features (interpret.py mine's "
                         "features.json, mined with this --sae)")
    data = read_json(args.features, ("features",), "features.json (`interpret.py mine`)")
    mined_with = (data.get("made_from") or {}).get("sae")
    diff = differences(mined_with or {}, file_identity(os.path.join(args.sae, "cfg.json")))
    if mined_with is None or diff:
        raise ValueError(f"{args.features}: not mined with the SAE in {args.sae} "
                         f"({'; '.join(diff[:2]) or 'mined without --sae'})")
    rows, explainer = [], None
    if args.autointerp:
        rows = read_log(os.path.join(args.autointerp, "autointerp.jsonl"))
        explainer = read_json(os.path.join(args.autointerp, "autointerp.json")).get("llm_model")
    feats = [f for f in data["features"] if f["name"].startswith("sae")]
    n = export_neuronpedia(sae, feats, rows, explainer, args.out, args.model_id, args.source,
                           args.overwrite)
    print(f"sae export: {n[0]} features, {n[1]} examples, {n[2]} explanations -> {args.out}")


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the BatchTopK SAE on a collected store")
    s = sub.add_parser("sweep", help="train over k x expansion: the FVU-L0 frontier")
    s.add_argument("--ks", type=numbers(int, "positive"), default=[8, 16, 32],
                   help="comma-separated k values (default: 8,16,32)")
    s.add_argument("--expansions", type=numbers(int, "positive"), default=[4, 8, 16],
                   help="comma-separated expansion factors (default: 4,8,16)")
    for c, func in ((t, cmd_train), (s, cmd_sweep)):
        c.add_argument("--acts", required=True, help="a store written by collect.py")
        c.add_argument("--out", required=True, help="SAE directory (sweep: one per k x expansion)")
        c.add_argument("--overwrite", action="store_true",
                       help="replace SAEs trained in --out with other settings")
        add_config_flags(c, SAEConfig, skip=("k", "expansion") if c is s else (),
                         choices=dict(init=("data", "random")))
        c.set_defaults(func=func)
    e = sub.add_parser("export", help="the SAE for SAELens, or its features for Neuronpedia")
    e.add_argument("--sae", required=True, help="an SAE directory (sae.py train)")
    e.add_argument("--format", choices=("saelens", "neuronpedia"), default="saelens",
                   help="saelens: a folder sae_lens.SAE.load_from_disk reads; neuronpedia: "
                   "features/, activations/, explanations/ as gzipped jsonl")
    e.add_argument("--out", required=True, help="the directory to write")
    e.add_argument("--features", help="neuronpedia: features.json of interpret.py mine --sae")
    e.add_argument("--autointerp", help="neuronpedia: interpret.py autointerp's --out directory "
                   "(its explanations)")
    e.add_argument("--model-id", default="qwen2.5-32b-instruct",
                   help="neuronpedia: the model's id in the rows")
    e.add_argument("--source", default="rank1-lora-batchtopk",
                   help="neuronpedia: the source (SAE set) id in the rows")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    e.set_defaults(func=cmd_export)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("sae.py"):
        return args.func(args)


if __name__ == "__main__":
    main()
