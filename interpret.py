"""
What each adapter scalar and each SAE feature fires on: exact max-activating examples over a
collected activation store (sae.py collect), with random non-zero samples and per-feature statistics.

    python interpret.py mine --acts acts/ --tokenizer /models/Qwen2.5-32B-Instruct --out interp/ [--sae sae/]

Work in progress (issue 8): the dashboard, autointerp, the MLP-neuron baseline and steering
experiments are not written yet; this file holds the mining they will build on.

Features: every adapter scalar in both polarities (`L{layer}.{target}+` is u, `...-` is -u), and,
with --sae, every SAE latent (`sae{j}`). An example is a token where the feature is > 0.

Top-k, exact and deterministic: per document, a greedy pick of the largest value (the earliest
token on ties), then the next, each pick hiding its +-dedup neighbours, at most per_doc picks; the
documents' picks are merged into the global top-k by (value desc, token index asc). Plain top-k is
dedup = 0, per_doc = k. The official code's trackers kept the wrong examples (PAPER.md G1-2); the
brute-force oracle in tests/test_interpret.py checks this one.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from sae import SAE, ActivationStore

# -----------------------------------------------------------------------------
# features


def feature_names(sites, sae=None):
    names = [f"L{l}.{t}+" for l, t in sites] + [f"L{l}.{t}-" for l, t in sites]
    if sae is not None:
        names += [f"sae{j}" for j in range(sae.n_latents)]
    return names


@torch.no_grad()
def feature_values(acts, sae=None):
    """(T, d) adapter scalars -> (T, F) feature values: u, -u, then SAE latents (batch-independent)."""
    vals = [acts, -acts]
    if sae is not None:
        vals.append(sae.encode(acts))
    return torch.cat(vals, dim=1)


# -----------------------------------------------------------------------------
# exact streaming top-k


def doc_picks(vals, k, dedup, per_doc):
    """Greedy picks of one document, for all features at once. vals (T, F) -> (values, positions),
    each (P, F) with P <= min(per_doc, k); -inf / -1 where a feature has nothing left above 0."""
    T, F = vals.shape
    v = vals.clone()
    pos = torch.arange(T, device=v.device)[:, None]
    out_v, out_p = [], []
    for _ in range(min(per_doc, k, T)):
        m, a = v.max(0)  # first maximum on ties: the earliest token
        ok = m > 0
        out_v.append(torch.where(ok, m, torch.full_like(m, -torch.inf)))
        out_p.append(torch.where(ok, a, torch.full_like(a, -1)))
        if not ok.any():
            break
        v.masked_fill_((pos - a[None, :]).abs() <= dedup, -torch.inf)  # the pick and its neighbours
    if not out_v:
        return torch.empty(0, F), torch.empty(0, F, dtype=torch.long)
    return torch.stack(out_v), torch.stack(out_p)


def merge_topk(best_v, best_i, new_v, new_i, k):
    """Keep the k largest of (best, new) per feature; ties go to the smaller token index."""
    v = torch.cat([best_v, new_v])
    i = torch.cat([best_i, new_i])
    # order by (value desc, index asc): sort by index first, then a stable sort by value
    o = i.argsort(dim=0, stable=True)
    v, i = v.gather(0, o), i.gather(0, o)
    o = (-v).argsort(dim=0, stable=True)
    return v.gather(0, o)[:k], i.gather(0, o)[:k]


def mine(store, sae=None, k=32, dedup=0, per_doc=None, n_random=16, seed=0):
    """Top-k examples and a uniform random sample of non-zero activations for every feature.

    Returns (top_v, top_i, rnd_v, rnd_i) as (k or n_random, F) tensors of values and global token
    indices (-inf / -1 where a feature has fewer examples), plus per-feature counts of tokens > 0."""
    per_doc = per_doc or k
    F = len(feature_names(store.index["sites"], sae))
    top_v, top_i = torch.full((0, F), -torch.inf), torch.zeros((0, F), dtype=torch.long)
    rnd_k, rnd_i, rnd_v = torch.zeros((0, F)), torch.zeros((0, F), dtype=torch.long), torch.zeros((0, F))
    fired = torch.zeros(F, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    base = 0
    from tqdm import tqdm
    for s in tqdm(range(len(store.index["shards"])), desc="mine", file=sys.stderr):
        acts = torch.from_numpy(np.array(store.shard(s), dtype=np.float32))
        vals = feature_values(acts, sae)
        fired += (vals > 0).sum(0)
        for d in store.index["shards"][s]["docs"]:
            seg = vals[d["start"]:d["start"] + d["length"]]
            pv, pp = doc_picks(seg, k, dedup, per_doc)
            pi = torch.where(pp >= 0, pp + base + d["start"], torch.full_like(pp, -1))
            top_v, top_i = merge_topk(top_v, top_i, pv, pi, k)
        # random sample: the n_random smallest uniform keys among a feature's non-zero tokens
        keys = torch.rand(vals.shape, generator=g).masked_fill(vals <= 0, torch.inf)
        idx = torch.arange(len(vals))[:, None].expand_as(vals) + base
        ck, ci, cv = torch.cat([rnd_k, keys]), torch.cat([rnd_i, idx]), torch.cat([rnd_v, vals])
        o = ck.argsort(dim=0, stable=True)[:n_random]
        rnd_k, rnd_i, rnd_v = ck.gather(0, o), ci.gather(0, o), cv.gather(0, o)
        base += len(vals)
    rnd_i = torch.where(torch.isinf(rnd_k), torch.full_like(rnd_i, -1), rnd_i)
    top_i = torch.where(torch.isinf(top_v), torch.full_like(top_i, -1), top_i)
    return top_v, top_i, rnd_v, rnd_i, fired


def quantiles(store, sae=None, qs=(0.5, 0.9, 0.99, 0.999), block=256):
    """Exact per-feature quantiles over every token (numpy's linear interpolation), computed a block
    of features at a time so memory stays at tokens x block."""
    F = len(feature_names(store.index["sites"], sae))
    out = np.zeros((F, len(qs)))
    for f0 in range(0, F, block):
        cols = []
        for s in range(len(store.index["shards"])):
            acts = torch.from_numpy(np.array(store.shard(s, check=False), dtype=np.float32))
            cols.append(feature_values(acts, sae)[:, f0:f0 + block].numpy())
        out[f0:f0 + block] = np.quantile(np.concatenate(cols), qs, axis=0).T
    return out


# -----------------------------------------------------------------------------
# examples with context


def locate(store):
    """Global token index -> (shard, document record, position in document) lookup tables."""
    starts, docs = [], []
    base = 0
    for s, sh in enumerate(store.index["shards"]):
        for d in sh["docs"]:
            starts.append(base + d["start"])
            docs.append((s, d))
        base += sh["tokens"]
    return np.array(starts), docs


def example(store, tok, lookup, token_index, value, feature_col, sae, context):
    starts, docs = lookup
    j = int(np.searchsorted(starts, token_index, side="right") - 1)
    s, d = docs[j]
    pos = token_index - starts[j]
    lo, hi = max(0, pos - context), min(d["length"], pos + context + 1)
    ids = np.asarray(store.tokens(s)[d["start"] + lo:d["start"] + hi]).tolist()
    acts = torch.from_numpy(np.array(store.shard(s, check=False)[d["start"] + lo:d["start"] + hi], dtype=np.float32))
    vals = feature_values(acts, sae)[:, feature_col].tolist()
    return dict(value=float(value), doc=d["doc"], source=d["source"], pos=int(pos), doc_length=d["length"],
                target=int(pos - lo), tokens=[tok.id_to_token_str(i) for i in ids], acts=[round(v, 5) for v in vals])


def cmd_mine(args):
    from data import Tokenizer
    store = ActivationStore(args.acts)
    sae = SAE.load(args.sae) if args.sae else None
    tok = Tokenizer(args.tokenizer)
    names = feature_names(store.index["sites"], sae)
    top_v, top_i, rnd_v, rnd_i, fired = mine(store, sae, args.k, args.dedup, args.per_doc, args.n_random, args.seed)
    qs = quantiles(store, sae)
    n_tok = store.index["shape"][0]
    lookup = locate(store)
    feats = []
    for f, name in enumerate(names):
        ex = lambda vs, ids: [example(store, tok, lookup, int(i), v, f, sae, args.context)
                              for v, i in zip(vs[:, f].tolist(), ids[:, f].tolist()) if i >= 0]
        feats.append(dict(id=f, name=name, freq=fired[f].item() / max(1, n_tok),
                          quantiles=dict(zip(("q50", "q90", "q99", "q999"), qs[f].tolist())),
                          top=ex(top_v, top_i), random=sorted(ex(rnd_v, rnd_i), key=lambda e: -e["value"])))
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "features.json")
    with open(out + ".tmp", "w") as fh:
        json.dump(dict(acts=os.path.abspath(args.acts), sae=args.sae, k=args.k, dedup=args.dedup, per_doc=args.per_doc,
                       context=args.context, tokens=n_tok, features=feats), fh)
    os.replace(out + ".tmp", out)
    print(f"mine: {len(feats)} features over {n_tok:,} tokens -> {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mine", help="exact top-k examples, random samples and statistics per feature")
    m.add_argument("--acts", required=True)
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--sae")
    m.add_argument("--out", required=True)
    m.add_argument("--k", type=int, default=32)
    m.add_argument("--dedup", type=int, default=0, help="hide picks within this many tokens of a better one")
    m.add_argument("--per-doc", type=int, default=0, help="at most this many examples per document (0: k)")
    m.add_argument("--n-random", type=int, default=16)
    m.add_argument("--context", type=int, default=24)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_mine)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"interpret.py: {e}") from None


if __name__ == "__main__":
    main()
