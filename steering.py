"""
Steering (docs/paper.md F6), measured: generate while pushing the adapter's state, for each strength
and seed, and record what changes (thinking length, counts of marker words, accuracy). Three modes:

- an SAE feature (--sae, --feature): its decoder direction added to the adapter scalars u;
- one adapter scalar (--site L12.gate_proj): a constant added to its u;
- LoRA-A in the residual stream (--residual L12.up_proj, F6's first mode): the adapter's unit
  reading direction a/|a| added to the residual stream after that layer's attention, the
  strength in units of the attention output's mean norm on the prompts.

    python interpret.py steer --model M --adapter A --sae sae/ --feature 638 --strengths 0,10,30 \\
        --seeds 0,1,2 --bench math500=math500.jsonl --limit 20 --out interp/steer.json

The official code steered every position of one sampled generation and reported text only.
"""
import json
from contextlib import contextmanager, nullcontext

import torch

from batchtopk import SAE
from benchmarks import load_benchmark
from common import (add_config_flags, add_device_flag, add_model_flags, check_out,
                    config_from_flags, fresh_outputs, number, numbers, pick_device, write_atomic)
from data import chat_prompt
from grading import grade
from lora import adapters, parse_site_label, sites, steer
from lora_files import load_model
from model import load_tokenizer
from engine import sequence_seed
from protocols import PROTOCOLS, GenConfig, generate


def sae_offsets(sae, feature, strength, sites):
    """strength * the feature's decoder direction, as offsets of the raw adapter scalars."""
    delta = strength * sae.W_dec[feature].detach() * sae.scale  # normalised -> raw space
    return {tuple(s): float(delta[i]) for i, s in enumerate(sites)}


@contextmanager
def steer_residual(model, layer, vec):
    """Add vec to the attention output of `layer` (the residual stream after attention) at every
    position of every forward in the context, as the LoRA-A steering of docs/paper.md F6; removed
    on exit."""
    h = model.model.layers[layer].self_attn.register_forward_hook(
        lambda mod, inp, out: out + vec.to(out.dtype))
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def attention_norm(model, tok, questions, layer):
    """The mean norm of `layer`'s attention output over the tokens of the questions' prompts: the
    unit of --residual's strengths (the paper scales by this norm too)."""
    norms = []
    h = model.model.layers[layer].self_attn.register_forward_hook(
        lambda mod, inp, out: norms.append(out[0].float().norm(dim=-1)))
    try:
        for q in questions:
            ids = tok.encode(chat_prompt(q))
            model(torch.tensor([ids], device=model.lm_head.weight.device))
    finally:
        h.remove()
    return torch.cat(norms).mean().item()


def cmd_steer(args):
    """Generate under steering for each strength and seed and measure: thinking length, counts of
    chosen words, accuracy (with --bench)."""
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter, "--sae": args.sae})
    fresh_outputs([args.out], args.overwrite)
    device = pick_device(args.device)
    model, identity = load_model(args.model, args.adapter, args.dtype, device=device,
                                 other_base=args.other_base)
    tok = load_tokenizer(args.model, args.tokenizer)
    gen = config_from_flags(GenConfig, args, STEER_GEN)
    items = steer_items(args)
    steering, norm = steering_edit(args, model, tok, items, device)
    words = [w for w in args.words.split(",") if w]
    results = []
    for c in args.strengths:
        for seed in args.seeds:
            with steering(c) if c != 0 else nullcontext():
                outs = generate(model, tok, [it["question"] for it in items], gen,
                                [sequence_seed(seed, i) for i in range(len(items))],
                                args.batch_size)
            r = measure(items, outs, words, c, seed)
            results.append(r)
            print(f"strength {c:g} seed {seed} | thinking {r['mean_thinking_tokens']:.1f} tokens | "
                  + " ".join(f"{w} {v:.2f}" for w, v in r["word_counts"].items())
                  + (f" | accuracy {r['accuracy']:.3f}" if r["accuracy"] is not None else ""))
    out = dict(identity=identity, sae=args.sae, feature=args.feature, site=args.site,
               residual=args.residual, attention_norm=norm if args.residual else None,
               results=results)
    write_atomic(args.out, json.dumps(out, indent=1))
    return out


def steer_items(args):
    """The questions steered: a benchmark's (--bench, --limit) or the --prompt texts."""
    if args.bench:
        name, _, path = args.bench.partition("=")
        items = [dict(it, bench=name) for it in load_benchmark(name, path, args.zip_password)]
        items = items[:args.limit or None]
    else:
        items = [dict(id=str(i), question=q, gold=None, bench=None)
                 for i, q in enumerate(args.prompt or [])]
    if not items:
        raise SystemExit("steer: give --bench NAME=PATH or --prompt TEXT")
    return items


def steering_edit(args, model, tok, items, device):
    """(strength -> a context manager that steers the model by it, the residual stream's
    attention-output norm for --residual or None): an SAE feature, one adapter's scalar, or LoRA-A
    added in the residual stream."""
    layout = sites(model)

    def site(label):
        try:
            return parse_site_label(label)
        except ValueError as e:
            raise SystemExit(f"steer: {e}") from None
    if args.sae:
        sae = SAE.load(args.sae)
        if args.feature >= sae.W_dec.shape[0]:
            raise SystemExit(f"steer: --feature {args.feature}: the SAE has "
                             f"{sae.W_dec.shape[0]} latents")
        return lambda c: steer(model, sae_offsets(sae, args.feature, c, layout)), None
    if args.site:
        return lambda c: steer(model, {site(args.site): c}), None
    if args.residual:
        l, t = site(args.residual)
        if t not in ("gate_proj", "up_proj") or (l, t) not in layout:
            raise SystemExit(f"steer: --residual {args.residual}: expected the gate_proj or "
                             "up_proj adapter of a layer the adapter covers")
        a = next(m for m in adapters(model) if (m.layer, m.target) == (l, t)).lora_A[0].detach()
        norm = attention_norm(model, tok, [it["question"] for it in items], l)
        unit = (a / a.norm()).to(device)
        return lambda c: steer_residual(model, l, c * norm * unit), norm
    raise SystemExit("steer: give --sae DIR --feature F, --site L12.gate_proj or "
                     "--residual L12.up_proj")


def measure(items, outs, words, c, seed):
    """One strength and seed's record: thinking length, words per generation, accuracy."""
    correct = [grade(it["bench"], o["generation"], it["gold"], it["question"])
               for it, o in zip(items, outs) if it["bench"]]
    return dict(strength=c, seed=seed, n=len(outs),
                mean_thinking_tokens=sum(o["thinking_tokens"] for o in outs) / len(outs),
                thinking_truncated=sum(o["thinking_truncated"] for o in outs),
                word_counts={w: sum(o["generation"].count(w) for o in outs) / len(outs)
                             for w in words},
                accuracy=sum(correct) / len(correct) if correct else None,
                examples=[o["generation"][:2000] for o in outs[:2]])


# steer's generation defaults: short budgets, sampling (eval.py's are the s1 protocol's)
STEER_GEN = dict(max_context=4096, max_answer_tokens=256, temperature=0.7)


def add_steer_flags(st):
    """`interpret.py steer`'s flags."""
    add_model_flags(st, adapter_required=True)
    st.add_argument("--sae", help="SAE directory: steer along one latent's decoder direction")
    st.add_argument("--feature", type=number(int, "nonnegative"), default=0,
                    help="the latent to steer with --sae")
    st.add_argument("--site", help="steer one adapter scalar instead, e.g. L12.gate_proj")
    st.add_argument("--residual", help="or add the a vector of this gate_proj / up_proj adapter "
                    "to the residual stream after that layer's attention (docs/paper.md F6), "
                    "strength in units of the attention output's mean norm, e.g. L12.up_proj")
    st.add_argument("--strengths", type=numbers(float), default=[0.0, 10.0, 30.0],
                    help="comma-separated steering strengths (default: 0,10,30)")
    st.add_argument("--seeds", type=numbers(int, "seed"), default=[0],
                    help="comma-separated sampling seeds (default: 0)")
    st.add_argument("--bench", help="NAME=PATH: measure accuracy on these problems")
    st.add_argument("--zip-password", help="password of a GPQA zip")
    st.add_argument("--limit", type=number(int, "nonnegative"), default=20,
                    help="first N problems of --bench (0: all)")
    st.add_argument("--prompt", action="append", help="a question to steer on (repeatable)")
    st.add_argument("--words", default="Wait,Hmm,But",
                    help="comma-separated words counted in the generations")
    st.add_argument("--out", required=True, help="the JSON file to write")
    st.add_argument("--batch-size", type=number(int, "positive"), default=8,
                    help="questions generated together")
    add_config_flags(st, GenConfig, choices=dict(protocol=PROTOCOLS), defaults=STEER_GEN)
    add_device_flag(st)
    st.add_argument("--overwrite", action="store_true", help="replace the --out file")
