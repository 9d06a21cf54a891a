"""
The paper's interpretation tools over a collected activation store (collect.py): what each adapter
scalar and each SAE feature fires on (mine), LLM explanations and scores (autointerp), LoRA
features against MLP neurons (compare), and steering with a measured effect (steer, in
steering.py).

    python interpret.py mine --acts acts/ --tokenizer M --out interp/ [--sae sae/]
    python interpret.py autointerp --features interp/features.json --out interp/ --llm-url URL \\
        [--rubric] [--categorise]
    python interpret.py steer --model M --adapter A --sae sae/ --feature 638 --strengths 0,10,30 \\
        --bench math500=math500.jsonl --limit 20 --out interp/steer.json
    python interpret.py steer ... --residual L40.up_proj --strengths 0,1,2   # LoRA-A, F6
    # LoRA features vs MLP neurons (collect.py --mlp-neurons 6; mine --population mlp; autointerp)
    python interpret.py compare --lora interp/autointerp.jsonl --mlp interp_mlp/autointerp.jsonl \\
        --out interp/compare.json

Features: every adapter scalar in both polarities (`L{layer}.{target}+` is u, `...-` is -u), and,
with --sae, every SAE latent (`sae{j}`); or (--population mlp) the MLP neurons of the
baseline, both polarities (`N{layer}.{index}+/-`). An example is a token where the feature is > 0.

Top-k, exact and deterministic: per document, a greedy pick of the largest value (the earliest
token on ties), then the next, each pick hiding its +-dedup neighbours, at most per_doc picks; the
documents' picks are merged into the global top-k by (value desc, token index asc). Plain top-k is
dedup = 0, per_doc = k. The official code's trackers kept the wrong examples (docs/paper.md G1-2);
the brute-force oracle in tests/test_interpret.py checks this one.
"""
import argparse
import json
import os
import sys
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from autointerp import autointerp, categorise, compare_populations
from batchtopk import SAE, check_sae
from common import (Parser, add_device_flag, check_out, file_identity, fresh_outputs, number,
                    pick_device, read_json, same_origin, user_errors, write_atomic, write_json)
from data import Tokenizer, read_rows
from llm import LLM
from lora import site_label
from steering import add_steer_flags, cmd_steer
from store import ActivationStore

# -----------------------------------------------------------------------------
# features


def feature_names(sites, sae=None, population="lora"):
    if population == "mlp":  # sites are (layer, neuron) pairs of the MLP-neuron baseline
        return [f"N{l}.{i}+" for l, i in sites] + [f"N{l}.{i}-" for l, i in sites]
    names = [site_label(l, t) + sign for sign in "+-" for l, t in sites]
    if sae is not None:
        names += [f"sae{j}" for j in range(sae.n_latents)]
    return names


def population_sites(store, population):
    return store.index["mlp_neurons"] if population == "mlp" else store.index["sites"]


def raw_shard(store, s, population, check=True):
    """The stored values a population's features are made of: adapter scalars or MLP neurons."""
    arr = store.mlp(s) if population == "mlp" else store.shard(s, check=check)
    return torch.from_numpy(np.array(arr, dtype=np.float32))


@torch.no_grad()
def feature_values(acts, sae=None):
    """(T, d) adapter scalars -> (T, F) feature values: u, -u, then SAE latents (thresholded)."""
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
    if dedup == 0:  # nothing to hide: the picks are the sorted values (stable: earliest first)
        v, p = vals.sort(dim=0, descending=True, stable=True)
        v, p = v[:min(per_doc, k)], p[:min(per_doc, k)]
        ok = v > 0
        return v.masked_fill(~ok, -torch.inf), p.masked_fill(~ok, -1)
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


class Mined(NamedTuple):
    """What mine() finds for F features: values and global token indices, (k or n_random, F) each,
    -inf / -1 where a feature has fewer."""
    top_v: torch.Tensor     # the top-k values
    top_i: torch.Tensor
    random_v: torch.Tensor  # a uniform sample of the feature's non-zero activations
    random_i: torch.Tensor
    fired: torch.Tensor     # (F,) how many tokens are > 0
    inactive_i: torch.Tensor  # a uniform sample of tokens where it is not active (negatives)
    mass: torch.Tensor      # (F,) the sum of the values > 0 (an SAE latent's activation mass, F4)


def mine(store, sae=None, k=32, dedup=0, per_doc=None, n_random=16, seed=0, population="lora",
         device="cpu"):
    """Top-k examples and a uniform random sample of non-zero activations for every feature, in
    one pass over the store: a Mined (docs/paper.md F4 for the activation mass)."""
    per_doc = per_doc or k
    F = len(feature_names(population_sites(store, population), sae, population))
    top_v, top_i = torch.full((0, F), -torch.inf), torch.zeros((0, F), dtype=torch.long)
    empty = (torch.zeros((0, F)), torch.zeros((0, F), dtype=torch.long), torch.zeros((0, F)))
    rnd, neg = empty, empty
    fired = torch.zeros(F, dtype=torch.long)
    mass = torch.zeros(F, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    base = 0
    for s in tqdm(range(len(store.index["shards"])), desc="mine", file=sys.stderr):
        vals = feature_values(raw_shard(store, s, population).to(device), sae)
        fired += (vals > 0).sum(0).cpu()
        mass += vals.clamp(min=0).sum(0, dtype=torch.float64).cpu()
        for d in store.index["shards"][s]["docs"]:
            seg = vals[d["start"]:d["start"] + d["length"]]
            pv, pp = (t.cpu() for t in doc_picks(seg, k, dedup, per_doc))
            pi = torch.where(pp >= 0, pp + base + d["start"], torch.full_like(pp, -1))
            top_v, top_i = merge_topk(top_v, top_i, pv, pi, k)
        # uniform samples: the n_random smallest random keys among a feature's non-zero tokens, and
        # (as negatives for autointerp's detection score) among the tokens where it is not active
        vals = vals.cpu()
        keys = torch.rand(vals.shape, generator=g)
        idx = torch.arange(len(vals))[:, None].expand_as(vals) + base
        rnd = _reservoir(rnd, keys.masked_fill(vals <= 0, torch.inf), idx, vals, n_random)
        neg = _reservoir(neg, keys.masked_fill(vals > 0, torch.inf), idx, vals, n_random)
        base += len(vals)
    top_i = torch.where(torch.isinf(top_v), torch.full_like(top_i, -1), top_i)
    return Mined(top_v, top_i, rnd[2], rnd[1], fired, neg[1], mass)


def _reservoir(state, keys, idx, vals, n):
    k, i, v = (torch.cat([a, b]) for a, b in zip(state, (keys, idx, vals)))
    o = k.argsort(dim=0, stable=True)[:n]
    k, i, v = k.gather(0, o), i.gather(0, o), v.gather(0, o)
    return k, torch.where(torch.isinf(k), torch.full_like(i, -1), i), v


def quantiles(store, sae=None, qs=(0.5, 0.9, 0.99, 0.999), block=256, population="lora"):
    """Exact per-feature quantiles over every token (numpy's linear interpolation), computed a block
    of features at a time so memory stays at tokens x block."""
    F = len(feature_names(population_sites(store, population), sae, population))
    out = np.zeros((F, len(qs)))
    for f0 in range(0, F, block):
        cols = []
        for s in range(len(store.index["shards"])):
            vals = feature_values(raw_shard(store, s, population, check=False), sae)
            cols.append(vals[:, f0:f0 + block].numpy())
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


def example(store, tok, lookup, token_index, value, feature_col, sae, context, population="lora"):
    starts, docs = lookup
    j = int(np.searchsorted(starts, token_index, side="right") - 1)
    s, d = docs[j]
    pos = token_index - starts[j]
    lo, hi = max(0, pos - context), min(d["length"], pos + context + 1)
    ids = np.asarray(store.tokens(s)[d["start"] + lo:d["start"] + hi]).tolist()
    acts = raw_shard(store, s, population, check=False)[d["start"] + lo:d["start"] + hi]
    vals = feature_values(acts, sae)[:, feature_col].tolist()
    return dict(value=float(value), doc=d["doc"], source=d["source"], pos=int(pos),
                doc_length=d["length"], target=int(pos - lo),
                tokens=[tok.id_to_token_str(i) for i in ids], acts=[round(v, 5) for v in vals])


def cmd_mine(args):
    check_out(args.out, {"--acts": args.acts, "--sae": args.sae, "--tokenizer": args.tokenizer})
    out = os.path.join(args.out, "features.json")
    fresh_outputs([out], args.overwrite)
    store = ActivationStore(args.acts)
    sae = SAE.load(args.sae) if args.sae else None
    if sae is not None:
        check_sae(sae, args.sae, store)
    tok = Tokenizer(args.tokenizer)
    pop = args.population
    if pop == "mlp" and sae is not None:
        raise SystemExit("interpret.py mine: --sae applies to the lora population only")
    names = feature_names(population_sites(store, pop), sae, pop)
    device = pick_device(args.device)
    if sae is not None:
        sae = sae.to(device)
    m = mine(store, sae, args.k, args.dedup, args.per_doc, args.n_random, args.seed, pop, device)
    sae = sae.cpu() if sae is not None else None
    qs = quantiles(store, sae, population=pop)
    n_tok = store.index["shape"][0]
    lookup = locate(store)
    feats = []
    for f, name in enumerate(names):
        ex = lambda vs, ids: [example(store, tok, lookup, int(i), v, f, sae, args.context, pop)
                              for v, i in zip(vs[:, f].tolist(), ids[:, f].tolist()) if i >= 0]
        feats.append(dict(id=f, name=name, freq=m.fired[f].item() / max(1, n_tok),
                          mass=m.mass[f].item(),
                          quantiles=dict(zip(("q50", "q90", "q99", "q999"), qs[f].tolist())),
                          top=ex(m.top_v, m.top_i),
                          random=sorted(ex(m.random_v, m.random_i), key=lambda e: -e["value"]),
                          inactive=ex(torch.zeros_like(m.random_v), m.inactive_i)))
    os.makedirs(args.out, exist_ok=True)
    made_from = dict(store=store.identity(), sae=file_identity(os.path.join(args.sae, "cfg.json"))
                     if args.sae else None, tokenizer=file_identity(tok.path))
    write_atomic(out, json.dumps(dict(made_from=made_from, population=pop, k=args.k,
                                      dedup=args.dedup, per_doc=args.per_doc, context=args.context,
                                      tokens=n_tok, features=feats)))
    print(f"mine: {len(feats)} features over {n_tok:,} tokens -> {out}")


# -----------------------------------------------------------------------------
# autointerp

def cmd_autointerp(args):
    """Explanations and scores for every feature of features.json into OUT/autointerp.jsonl
    (what they were made from in OUT/autointerp.json). The LLM's replies are cached, so a rerun
    with the same settings resumes for free; features whose LLM calls failed are reported and the
    command fails, keeping everything else."""
    check_out(args.out, {"--features": args.features})
    data = read_json(args.features, ("features",), "features.json (`interpret.py mine`)")
    made_from = dict(features=file_identity(args.features), llm_url=args.llm_url,
                     llm_model=args.llm_model if args.llm_url else None, rubric=args.rubric,
                     rubric_mode=args.rubric_mode,
                     categorise=args.categorise, n_explain=args.n_explain, limit=args.limit)
    meta = os.path.join(args.out, "autointerp.json")
    if os.path.isfile(meta) and not args.overwrite:
        same_origin(read_json(meta), made_from, meta)
    llm = LLM(args.llm_url, args.llm_model, args.cache or os.path.join(args.out, "llm-cache"),
              concurrency=args.concurrency) if args.llm_url else None
    if args.categorise and llm is None:
        raise SystemExit("interpret.py autointerp: --categorise needs --llm-url")
    feats = data["features"][:args.limit or None]
    rows = autointerp(feats, llm, args.rubric, args.n_explain, args.rubric_mode)
    os.makedirs(args.out, exist_ok=True)
    write_json(meta, made_from)
    write_atomic(os.path.join(args.out, "autointerp.jsonl"),
                 "".join(json.dumps(r) + "\n" for r in rows))
    cats = []
    if args.categorise:  # the SAE latents' categories (docs/paper.md F4)
        cats = categorise([f for f in feats if f["name"].startswith("sae")], rows, llm)
        write_atomic(os.path.join(args.out, "categories.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in cats))
    scored = [r["detection_balanced_accuracy"] for r in rows
              if r.get("detection_balanced_accuracy") is not None]
    if scored:
        print(f"autointerp: {len(scored)} features, mean detection balanced accuracy "
              f"{sum(scored) / len(scored):.3f}")
    elif llm is None:
        print(f"autointerp: {len(rows)} explanation prompts written (no --llm-url given)")
    failed = [r["error"] for r in rows + cats if "error" in r]
    if failed:
        raise SystemExit(f"autointerp: {len(failed)} features failed (the others are in "
                         f"{args.out}/autointerp.jsonl; a rerun retries only these): {failed[0]}")
    return rows


def cmd_compare(args):
    check_out(args.out, {"--lora": args.lora, "--mlp": args.mlp})
    fresh_outputs([args.out], args.overwrite)
    table = compare_populations(read_rows(args.lora)[0], read_rows(args.mlp)[0],
                                which=args.populations)
    for k, r in table.items():
        print(f"{k}: lora {r['lora']:.3f} {r['lora_ci95']} (n={r['n_lora']}) | mlp {r['mlp']:.3f} "
              f"{r['mlp_ci95']} (n={r['n_mlp']}) | difference {r['diff']:+.3f} {r['diff_ci95']}")
    write_atomic(args.out, json.dumps(table, indent=1))
    return table


def parser():
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_mine(sub)
    st = sub.add_parser("steer", help="generate while adding to adapter scalars; measure it")
    add_steer_flags(st)
    st.set_defaults(func=cmd_steer)
    add_autointerp(sub)
    add_compare(sub)
    return p


def add_mine(sub):
    """`interpret.py mine` and its flags."""
    m = sub.add_parser("mine", help="exact top-k examples, random samples, statistics per feature")
    m.add_argument("--acts", required=True, help="a store written by collect.py")
    m.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    m.add_argument("--sae", help="SAE directory: mine its latents too")
    m.add_argument("--out", required=True, help="directory for features.json")
    m.add_argument("--k", type=number(int, "positive"), default=32,
                   help="top examples per feature and polarity")
    m.add_argument("--dedup", type=number(int, "nonnegative"), default=0,
                   help="hide picks within this many tokens of a better one")
    m.add_argument("--per-doc", type=number(int, "nonnegative"), default=0,
                   help="at most this many examples per document (0: k)")
    m.add_argument("--n-random", type=number(int, "nonnegative"), default=16,
                   help="random firing examples per feature (autointerp's weak ones)")
    m.add_argument("--context", type=number(int, "nonnegative"), default=24,
                   help="tokens shown on each side of an example")
    m.add_argument("--seed", type=number(int, "seed"), default=0,
                   help="seeds the random examples")
    add_device_flag(m, "where the features are computed")
    m.add_argument("--population", default="lora", choices=["lora", "mlp"],
                   help="lora: adapter scalars (+ SAE latents); mlp: the MLP-neuron baseline "
                   "(collect.py --mlp-neurons)")
    m.add_argument("--overwrite", action="store_true", help="replace features.json in --out")
    m.set_defaults(func=cmd_mine)


def add_autointerp(sub):
    """`interpret.py autointerp` and its flags."""
    a = sub.add_parser("autointerp", help="prompts; with --llm-url explanations and scores")
    a.add_argument("--features", required=True, help="features.json from `interpret.py mine`")
    a.add_argument("--out", required=True, help="directory for autointerp.jsonl (+ prompts)")
    a.add_argument("--llm-url", help="OpenAI-compatible base URL (key from RANK1_LLM_API_KEY)")
    a.add_argument("--llm-model", default="gpt-4o-mini", help="the model name sent to --llm-url")
    a.add_argument("--cache", help="response cache directory (default OUT/llm-cache)")
    a.add_argument("--concurrency", type=number(int, "positive"), default=8,
                   help="requests in flight at once")
    a.add_argument("--rubric", action="store_true",
                   help="also the paper's 0/1/2 monosemanticity rubric")
    a.add_argument("--rubric-mode", choices=("ours", "official"), default="ours",
                   help="ours: the explanation, then the rubric in a second call; official: "
                   "explanation and class in one call with the official prompt's content "
                   "(the rubric comes with it)")
    a.add_argument("--categorise", action="store_true",
                   help="also sort the SAE latents into the paper's 7 categories "
                   "(OUT/categories.jsonl)")
    a.add_argument("--n-explain", type=number(int, "positive"), default=10,
                   help="top examples in the explanation prompt")
    a.add_argument("--limit", type=number(int, "nonnegative"), default=0,
                   help="first N features (0: all)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace autointerp.jsonl made from other features")
    a.set_defaults(func=cmd_autointerp)


def add_compare(sub):
    """`interpret.py compare` and its flags."""
    c = sub.add_parser("compare", help="LoRA features vs MLP neurons from two autointerp.jsonl")
    c.add_argument("--lora", required=True, help="autointerp.jsonl of the LoRA features")
    c.add_argument("--mlp", required=True, help="autointerp.jsonl of the MLP neurons")
    c.add_argument("--out", required=True, help="the JSON file to write")
    c.add_argument("--populations", choices=["paper", "all"], default="paper",
                   help="paper: MLP-adapter features vs each neuron in its dominant polarity "
                   "(as report.py); all: every row of both files")
    c.add_argument("--overwrite", action="store_true", help="replace the --out file")
    c.set_defaults(func=cmd_compare)


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("interpret.py"):
        return args.func(args)


if __name__ == "__main__":
    main()
