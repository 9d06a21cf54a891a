"""
Activation collection: the rank-1 adapter scalars u = x . a of every token of a corpus (448 per
token for Qwen2.5-32B), stored for the SAE and for interpretation.

    # torchrun splits the shards across GPUs; a rerun skips finished shards
    torchrun --standalone --nproc_per_node=8 collect.py --model /models/Qwen2.5-32B-Instruct \\
        --adapter runs/rank1/adapter --data s1K-1.1.parquet --out acts/

Documents: s1K-1.1 rows in the training format (default), the official code's collection format
(--format paper, docs/paper.md section D), or eval.py generations (--format samples). Each
document runs in windows of --window tokens with a KV cache (Qwen2.forward_cached), so a
20,000-token trace fits in memory and gives what one full forward gives.

The store's format (shards, sidecars, index.json): store.py.
"""
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import model_identity
from common import (Parser, add_model_flags, check_out, cleanup_dist, file_identity, number,
                    read_json, setup_dist, start_run, user_errors, write_json)
from data import chat_prompt, data_identity, paper_collection_text, read_rows, s1_example
from lora import adapters, doc_scalars, sites
from lora_files import adapter_identity, load_model
from model import load_tokenizer
from store import STORE_FILE, save_shard, shard_finished

# -----------------------------------------------------------------------------
# collection


def documents(path, fmt, tok):
    """[(source, ids)]: s1 rows in the training format (s1) or the paper's collection format
    (paper), or eval.py generations (samples: prompt + generation)."""
    rows, where = read_rows(path)
    docs = []
    for r, w in zip(rows, where):
        if fmt == "s1":
            docs.append((w, s1_example(r, tok, w)[0]))
        elif fmt == "paper":
            docs.append((w, tok.encode(paper_collection_text(r))))
        elif fmt == "samples":
            if "generation" not in r or not r.get("question"):
                raise ValueError(f"{w}: samples need 'question' and 'generation' fields")
            prompt = chat_prompt(r["question"])
            docs.append((w, tok.encode(prompt + r["generation"])))
        else:
            raise ValueError(f"--format {fmt!r}: expected s1, paper or samples")
    return docs


def collect(args):
    """Set-up (outputs claimed, the model loaded), every shard this rank owns, then the index."""
    rank, world, dev = setup_dist()
    tok = load_tokenizer(args.model, args.tokenizer)
    check_out(args.out, {"--model": args.model, "--adapter": args.adapter, "--data": args.data,
                         "--tokenizer": args.tokenizer})
    docs = documents(args.data, args.format, tok)[:args.max_docs or None]
    settings = dict(model=model_identity(args.model), adapter=adapter_identity(args.adapter),
                    data=data_identity(args.data), format=args.format,
                    tokenizer=file_identity(tok.path), dtype=args.dtype,
                    store_dtype=args.store_dtype, window=args.window,
                    docs_per_shard=args.docs_per_shard, max_docs=args.max_docs,
                    mlp_neurons=args.mlp_neurons, mlp_baseline=args.mlp_baseline, seed=args.seed)
    if rank == 0:
        start_run(args.out, "collect.json", settings, STORE_FILE.fullmatch, args.overwrite,
                  "collect.py")
    torch.distributed.barrier()
    model, _ = load_model(args.model, args.adapter, args.dtype, device=dev,
                          other_base=args.other_base)
    neurons = mlp_neurons(model, args)
    n_shards = math.ceil(len(docs) / args.docs_per_shard)
    mine = [j for j in range(n_shards) if j % world == rank]
    shard_docs = lambda j: docs[j * args.docs_per_shard:(j + 1) * args.docs_per_shard]
    bar = tqdm(total=sum(len(ids) for j in mine for _, ids in shard_docs(j)), unit="tok",
               desc=f"collect rank {rank}", file=sys.stderr, disable=rank != 0)
    speed = dict(t0=time.time(), tokens=0)  # tokens collected by this run, for tok/s
    for j in mine:
        if shard_finished(args.out, j):  # earlier
            bar.update(sum(len(ids) for _, ids in shard_docs(j)))
            continue
        collect_shard(model, args, j, shard_docs(j), neurons, bar, speed)
    bar.close()
    torch.distributed.barrier()
    if rank == 0:
        write_index(args, model, settings, len(docs), n_shards, neurons)
    torch.distributed.barrier()
    cleanup_dist()


def mlp_neurons(model, args):
    """The MLP neurons recorded beside the adapter (the baseline population): [layer, index] for
    --mlp-neurons per layer, the first ones (up_proj baseline) or drawn with --seed."""
    if not 0 <= args.mlp_neurons <= model.cfg.intermediate_size:
        raise ValueError(f"--mlp-neurons {args.mlp_neurons}: expected 0 to the MLP width "
                         f"{model.cfg.intermediate_size}")
    gen = torch.Generator().manual_seed(args.seed)
    pick = lambda: (range(args.mlp_neurons) if args.mlp_baseline == "up_proj" else
                    sorted(torch.randperm(model.cfg.intermediate_size,
                                          generator=gen)[:args.mlp_neurons].tolist()))
    return [[l, int(i)] for l in range(model.cfg.num_hidden_layers) for i in pick()]


def collect_shard(model, args, j, part, neurons, bar, speed):
    """Shard j: each document's scalars (and MLP neurons), checked finite, saved as one shard."""
    store_dtype = {"float32": np.float32, "float16": np.float16}[args.store_dtype]
    acts, toks, mlps, meta, off = [], [], [], [], 0
    for k, (src, ids) in enumerate(part):
        a, mlp = doc_scalars(model, ids, args.window, [tuple(n) for n in neurons],
                             args.mlp_baseline)
        a = a.float().cpu().numpy()
        mlps.append(mlp.cpu().numpy().astype(store_dtype))
        if not np.isfinite(a).all():
            raise ValueError(f"{src}: non-finite adapter scalars at token "
                             f"{int(np.argmin(np.isfinite(a).all(1)))}")
        acts.append(a.astype(store_dtype))
        toks.append(np.asarray(ids, dtype=np.int32))
        meta.append(dict(doc=j * args.docs_per_shard + k, source=src, start=off,
                         length=len(ids)))
        off += len(ids)
        bar.update(len(ids))
        speed["tokens"] += len(ids)
        bar.set_postfix(tok_s=f"{speed['tokens'] / (time.time() - speed['t0']):.0f}")
    arrays = dict(acts=np.concatenate(acts), ids=np.concatenate(toks))
    if neurons:
        arrays["mlp"] = np.concatenate(mlps)
    save_shard(args.out, j, arrays, dict(tokens=off, docs=meta))


def write_index(args, model, settings, n_docs, n_shards, neurons):
    """index.json, the store's table of contents, from the shards' own records (rank 0)."""
    layout = [list(s) for s in sites(model)]
    rank_r = adapters(model)[0].rank
    shards = [read_json(os.path.join(args.out, f"shard-{j:05d}.json")) for j in range(n_shards)]
    index = dict(shape=[sum(s["tokens"] for s in shards), len(layout) * rank_r],
                 dtype=args.store_dtype, sites=layout, rank=rank_r,
                 order="column = position of (layer, target) sorted by layer, then gate, up, "
                 "down, q, k, v, o (7 * layer + p with all 7 targets)",
                 made_from=settings, documents=n_docs, shards=shards, mlp_neurons=neurons,
                 mlp_baseline=args.mlp_baseline if neurons else None)
    write_json(os.path.join(args.out, "index.json"), index)
    print(f"collect: {index['shape'][0]:,} tokens x {index['shape'][1]} scalars in {n_shards} "
          f"shards -> {args.out}")


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    add_model_flags(p, adapter_required=True)
    p.add_argument("--data", required=True,
                   help="s1K-1.1 rows (.jsonl/.parquet) or eval.py samples.jsonl")
    p.add_argument("--format", default="s1", choices=["s1", "paper", "samples"],
                   help="s1: the chat template + s1 markers; paper: the official code's text; "
                   "samples: eval.py generations")
    p.add_argument("--out", required=True, help="store directory (index.json, shards)")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the stored scalars")
    p.add_argument("--docs-per-shard", type=number(int, "positive"), default=64,
                   help="documents per shard file (the unit a rerun resumes by)")
    p.add_argument("--window", type=number(int, "positive"), default=4096,
                   help="tokens per forward (KV-cached) for long documents")
    p.add_argument("--max-docs", type=number(int, "nonnegative"), default=0,
                   help="first N documents (0: all)")
    p.add_argument("--mlp-neurons", type=number(int, "nonnegative"), default=0,
                   help="also store this many MLP neurons per layer, the baseline (the paper: 6)")
    p.add_argument("--mlp-baseline", default="up_proj", choices=["up_proj", "swiglu"],
                   help="up_proj: its first N output channels (the paper's); swiglu: a seeded "
                   "sample of down_proj's input act(gate(x)) * up(x)")
    p.add_argument("--seed", type=number(int, "seed"), default=0,
                   help="seeds the sample of --mlp-baseline swiglu neurons")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a store collected otherwise")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("collect.py"):
        return collect(args)


if __name__ == "__main__":
    main()
