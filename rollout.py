"""
One rollout (a reasoning trace), read every way the official code reads one: the adapter state
as a token x site heatmap (aggregate_activations/), and, by analyses.py, the attention heads the
adapter changes, which scalars move each prediction (attribution), how SAE latents respond to one
another (interaction) and the adapter's writes beside the MLP's (projection norms).

    python rollout.py --model M --adapter A --acts acts/ --doc 0 [--sae sae/] --out rollout/

Writes rollout.html (a self-contained page: no network, every text escaped, the data in JSON script
elements read with textContent), rollout.json (every number on it and what it was made from), and
attention_kl.npy (layers, heads, T) and attribution.npy (targets, T, sites) in float32. The
document is one of --acts' (its tokens and its stored scalars, which the heatmap draws unchanged);
the store must come from --model and --adapter. Costs at 32B: docs/running.md.
"""
import os

import numpy as np
import torch

from analyses import (attention_kl, attribute, backward_bytes, head_patterns, latent_effects,
                      layer_norms, source_latents, top_heads)
from batchtopk import SAE, check_sae
from checkpoint import model_identity
from common import (Parser, add_device_flag, add_model_flags, check_out, differences,
                    file_identity, free_memory, fresh_outputs, lock_dir, number, pick_device,
                    read_json, remove_path, sha256_file, user_errors, write_atomic, write_json)
from figures import provenance_lines, safe_json
from lora import site_label
from lora_files import adapter_identity, load_model
from model import load_tokenizer
from protocols import RESERVE
from store import ActivationStore, write_npy

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "rollout.html")
OUTPUTS = ("rollout.html", "rollout.json", "attention_kl.npy", "attribution.npy")


def document(store, doc):
    """(record, token ids, stored scalars (T, sites) float32) of document `doc` of the store."""
    for s, sh in enumerate(store.index["shards"]):
        for d in sh["docs"]:
            if d["doc"] == doc:
                lo, hi = d["start"], d["start"] + d["length"]
                return (d, np.asarray(store.tokens(s)[lo:hi]).tolist(),
                        np.array(store.shard(s)[lo:hi], dtype=np.float32))
    raise ValueError(f"{store.path}: no document {doc} (it holds {store.index.get('documents')} "
                     "documents, numbered from 0)")


def check_store(store, args):
    """The store's scalars must be this model's and this adapter's, or the page would draw one
    adapter's state beside another's attention and attributions."""
    made = store.index.get("made_from") or {}
    for what, rec, now in (("--model", made.get("model"), lambda: model_identity(args.model)),
                           ("--adapter", made.get("adapter"),
                            lambda: adapter_identity(args.adapter))):
        diff = differences(rec, now()) if rec else []
        if diff:
            raise ValueError(f"--acts {args.acts}: collected with another {what} ({diff[0]})")


def sparse_rows(base, adapted, k):
    """Per query: the k keys with the largest weight in either model, as [key, base, adapted]."""
    out = []
    for t in range(len(base)):
        both = torch.maximum(base[t, :t + 1], adapted[t, :t + 1])
        keys = both.topk(min(k, t + 1)).indices.tolist()
        out.append([[j, round(float(base[t, j]), 5), round(float(adapted[t, j]), 5)]
                    for j in keys])
    return out


def target_positions(T, n):
    """Every position when T <= n, else n positions spread evenly over the trace."""
    return list(range(T)) if T <= n else np.unique(np.linspace(0, T - 1, n).round()).astype(
        int).tolist()


def interaction(model, sae, ids, state, n, strength):
    z = sae.encode(torch.from_numpy(state).to(sae.W_enc.device))
    e = latent_effects(model, sae, ids, source_latents(z, n), strength)
    rows = []
    for i, eff in zip(e["sources"], e["effect"]):
        eff = eff.clone()
        eff[i] = 0  # the source itself: what the edit removed or added
        top = eff.abs().argsort(descending=True)[:8].tolist()
        rows.append(dict(source=i, clean=float(e["clean"][i]),
                         moved=[[j, float(eff[j])] for j in top if eff[j] != 0]))
    return dict(mode=e["mode"], rows=rows)


PARTS = "rollout.parts"  # each finished analysis of a run, removed when the page is written


def part(out, name, made_from, compute):
    """An analysis's (JSON part, array or None): read back from out/rollout.parts/ where an
    earlier run with the same inputs and settings finished it, else computed and saved there at
    once, so that an error or a kill in a later analysis loses none of the earlier ones."""
    d = os.path.join(out, PARTS)
    meta, arr = os.path.join(d, f"{name}.json"), os.path.join(d, f"{name}.npy")
    if os.path.isfile(meta):
        rec = read_json(meta)
        if not differences(rec.get("made_from") or {}, made_from):
            intact = not rec.get("array") or (os.path.isfile(arr)
                                              and sha256_file(arr) == rec["array"])
            if intact:
                print(f"rollout: {name} read back from {d}")
                return rec["part"], np.load(arr) if rec.get("array") else None
    js, a = compute()
    os.makedirs(d, exist_ok=True)
    sha = write_npy(arr, a) if a is not None else None
    write_json(meta, dict(made_from=made_from, part=js, array=sha))
    return js, a


def attribution_tokens(args, model, T, device):
    """How many of the trace's tokens attribution reads: --attribution-tokens, checked against
    the device's free memory (attribution.backward_bytes); 0 picks the most that fit. A number
    that does not fit is refused before any analysis runs, naming the flag."""
    free = free_memory(device) - RESERVE
    need = lambda n: backward_bytes(model.cfg, n, model.lm_head.weight.dtype)
    fit = max((n for n in range(1, T + 1) if need(n) <= free), default=0)
    n = min(args.attribution_tokens or fit, T)
    if n < 1 or need(n) > free:
        raise ValueError(f"--attribution-tokens {args.attribution_tokens}: attribution keeps "
                         f"~{need(max(n, 1)) / 1e9:.1f} GB for its backward and "
                         f"{free / 1e9:.1f} GB are free beside the weights; at most {fit} tokens "
                         "fit here")
    how = "the most that fit" if not args.attribution_tokens else "--attribution-tokens"
    print(f"rollout: attribution over the first {n} of {T} tokens ({how}; ~{need(n) / 1e9:.1f} "
          f"GB of {free / 1e9:.1f} GB free)")
    return n


def build(args):
    """The trace read every way, its parts saved as they finish, then the page and its files."""
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter, "--acts": args.acts,
                         "--sae": args.sae})
    outs = {n: os.path.join(args.out, n) for n in OUTPUTS}
    fresh_outputs(list(outs.values()), args.overwrite)
    device = pick_device(args.device)
    store = ActivationStore(args.acts)
    check_store(store, args)
    rec, ids, state = document(store, args.doc)
    ids, state = ids[:args.max_tokens], state[:args.max_tokens]
    sae = None
    if args.sae:
        sae = SAE.load(args.sae, device)
        check_sae(sae, args.sae, store)
    model, identity = load_model(args.model, args.adapter, args.dtype, device=device,
                                 other_base=args.other_base)
    tok = load_tokenizer(args.model, args.tokenizer)
    sites = [site_label(layer, t) for layer, t in store.index["sites"]]
    T = len(ids)
    print(f"rollout: document {args.doc} ({T} tokens{', truncated' if T < rec['length'] else ''})")
    n_attr = attribution_tokens(args, model, T, device)
    made_from = dict(model=identity["model"], adapter=identity["adapter"],
                     acts=store.identity(), doc=args.doc,
                     sae=file_identity(os.path.join(args.sae, "cfg.json")) if args.sae else None,
                     settings=dict(max_tokens=args.max_tokens, targets=args.targets,
                                   attribution_tokens=n_attr, top_heads=args.top_heads,
                                   keys=args.keys, latents=args.latents, strength=args.strength,
                                   dtype=identity["dtype"]))
    os.makedirs(args.out, exist_ok=True)
    lock_dir(args.out)

    parts = analyse(args, model, ids, n_attr, made_from)
    heads, kl, attr = parts["heads"], parts["kl"], parts["attr"]
    data = dict(doc=dict(rec, tokens=T), tokens=[tok.id_to_token_str(i) for i in ids],
                sites=sites, state=state.tolist(), **page_sections(parts, tok))
    if sae is not None:
        data["interaction"] = part(args.out, "interaction", made_from, lambda: (interaction(
            model, sae, ids, state, args.latents, args.strength), None))[0]
    data["provenance"] = provenance_lines(made_from)
    write_outputs(outs, data, made_from, kl, attr)
    remove_path(os.path.join(args.out, PARTS))  # all of it is in the outputs now
    print(f"rollout: top head L{heads[0][0]}.H{heads[0][1]} (mean KL {heads[0][2]:.3g}); "
          f"{len(data['attribution']['positions'])} attributed positions -> "
          f"{outs['rollout.html']}")
    return data


def analyse(args, model, ids, n_attr, made_from):
    """The trace's attention KL, attribution and norms, each a part saved as it finishes (and
    read back when a killed run finished it)."""
    def attention():
        kl = attention_kl(model, ids)
        heads = top_heads(kl, args.top_heads)
        pats = head_patterns(model, ids, [(layer, h) for layer, h, _ in heads])
        return dict(heads=heads, patterns={f"{layer}.{h}": sparse_rows(*pats[layer, h], args.keys)
                                           for layer, h, _ in heads}), kl.astype(np.float32)

    def attribution():
        att = attribute(model, ids[:n_attr], target_positions(n_attr, args.targets),
                        progress=True)
        return (dict(positions=att["positions"], tokens=att["tokens"]),
                att["attr"].float().numpy())

    def norms():
        got = layer_norms(model, ids)
        return dict(got["layer_means"], abs_b_projection=np.abs(got["b_projection"]).mean(
            1).tolist()), None
    att_js, kl = part(args.out, "attention", made_from, attention)
    attr_js, attr = part(args.out, "attribution", made_from, attribution)
    # "on": the residual's definition (earlier versions read the raw residual stream)
    norms_js, _ = part(args.out, "norms", {**made_from, "on": "post_attention_layernorm output"},
                       norms)
    return dict(heads=[tuple(h) for h in att_js["heads"]], patterns=att_js["patterns"], kl=kl,
                attr_js=attr_js, attr=attr, norms=norms_js)


def page_sections(parts, tok):
    """The page's attention, attribution and norms sections from the parts."""
    heads, kl, attr, attr_js = parts["heads"], parts["kl"], parts["attr"], parts["attr_js"]
    return dict(
        kl=dict(heads=heads, layer_mean=kl.mean(1).tolist(), overall=kl.mean((0, 1)).tolist(),
                per_head={f"{layer}.{h}": kl[layer, h].tolist() for layer, h, _ in heads},
                patterns=parts["patterns"]),
        attribution=dict(positions=attr_js["positions"],
                         predicted=[tok.id_to_token_str(i) for i in attr_js["tokens"]],
                         by_source=[attr[i, :t + 1].sum(-1).tolist()
                                    for i, t in enumerate(attr_js["positions"])],
                         by_site=attr.sum(1).tolist()),
        norms=parts["norms"])


def write_outputs(outs, data, made_from, kl, attr):
    """The two arrays (.npy), the page, and rollout.json (what the page shows, and the arrays'
    shapes and hashes)."""
    sums = dict(attention_kl=write_npy(outs["attention_kl.npy"], kl),
                attribution=write_npy(outs["attribution.npy"], attr))
    with open(TEMPLATE, encoding="utf-8") as f:
        write_atomic(outs["rollout.html"], f.read().replace("__DATA__", safe_json(data), 1))
    summary = {k: v for k, v in data.items() if k not in ("provenance",)}
    write_json(outs["rollout.json"], dict(made_from=made_from, arrays=dict(
        attention_kl=dict(file="attention_kl.npy", shape=list(kl.shape),
                          sha256=sums["attention_kl"],
                          axes="layer, head, query position: KL(base || adapted)"),
        attribution=dict(file="attribution.npy", shape=list(attr.shape),
                         sha256=sums["attribution"],
                         axes="target (positions), source position, site: grad x activation")),
        **summary))


def parser():
    p = Parser(description=__doc__.split("\n\n")[1].strip())
    add_model_flags(p, adapter_required=True)
    p.add_argument("--acts", required=True, help="the activation store from `collect.py` (the "
                   "document's tokens and stored scalars)")
    p.add_argument("--doc", type=number(int, "nonnegative"), default=0,
                   help="the document's number in the store (default 0)")
    p.add_argument("--sae", help="the SAE trained on --acts: adds the feature interaction")
    p.add_argument("--max-tokens", type=number(int, "positive"), default=1024,
                   help="keep the document's first N tokens (the official views use 1,024)")
    p.add_argument("--targets", type=number(int, "positive"), default=256,
                   help="attribute at most N target positions (spread evenly; one backward each)")
    p.add_argument("--attribution-tokens", type=number(int, "nonnegative"), default=0,
                   help="attribution reads the trace's first N tokens (its forward is kept for "
                   "the backward: ~15 GB at 512 tokens at 32B); 0 (default): the most that fit "
                   "in the device's free memory, said in one line")
    p.add_argument("--top-heads", type=number(int, "positive"), default=8,
                   help="heads whose patterns the page shows (by mean KL)")
    p.add_argument("--keys", type=number(int, "positive"), default=8,
                   help="keys kept per query in the page's attention patterns")
    p.add_argument("--latents", type=number(int, "positive"), default=8,
                   help="with --sae: the trace's most active latents, each removed in turn")
    p.add_argument("--strength", type=number(float), help="with --sae: steer each source latent "
                   "by this much instead of removing it")
    add_device_flag(p)
    p.add_argument("--out", required=True, help="directory for rollout.html, rollout.json and the "
                   "arrays")
    p.add_argument("--overwrite", action="store_true", help="replace this command's files in --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("rollout.py"):
        return build(args)


if __name__ == "__main__":
    main()
