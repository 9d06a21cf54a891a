"""
Activation collection: the rank-1 adapter scalars u = x . a of every token of a corpus (448 per
token for Qwen2.5-32B), stored for the SAE and for interpretation.

    # torchrun splits the shards across GPUs; a rerun skips finished shards
    torchrun --standalone --nproc_per_node=8 collect.py --model /models/Qwen2.5-32B-Instruct \\
        --adapter runs/rank1/adapter --data s1K-1.1.parquet --out acts/
    # library use
    from collect import ActivationStore
    store = ActivationStore("acts/"); x = store.load_all()        # (N, 448) float32

Documents: s1K-1.1 rows in the training format (default), the official code's collection format
(--format paper, PAPER.md section D), or eval.py generations (--format samples). Each document runs
in windows of --window tokens with a KV cache (Qwen2.forward_cached), so a 20,000-token trace fits
in memory and gives what one full forward gives.

Store layout: documents are grouped into shards of --docs-per-shard; shard j is written by rank
j % world as acts-XXXXX.npy (N_j, n_sites) + tokens-XXXXX.npy (N_j,) int32 and a shard-XXXXX.json
sidecar written last (atomically). index.json describes the whole store: shape, dtype, the column
layout (sites in lora.py's capture order: column 7 * layer + p, p in gate, up, down, q, k, v, o),
and every document's shard and offsets. With --mlp-neurons N, also N sampled SwiGLU neurons per
layer (down_proj's input) as mlp-XXXXX.npy: the MLP-neuron baseline.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common import cleanup_dist, read_json, setup_dist, user_errors, write_atomic
from data import Tokenizer, paper_collection_text, read_rows, render_chat, s1_example
from lora import adapters, capture, load_model, sites
from model import KVCache

# -----------------------------------------------------------------------------
# the activation store


class ActivationStore:
    """Reads a collected store (index.json + shards), checking sizes, layout and values."""

    def __init__(self, path):
        f = os.path.join(path, "index.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: no index.json (run `collect.py` first)")
        self.path, self.index = path, read_json(f)
        idx = self.index
        for k in ("shape", "dtype", "sites", "shards"):
            if k not in idx:
                raise ValueError(f"{f}: missing field {k!r}")
        self.d = idx["shape"][1]
        if len(idx["sites"]) * idx.get("rank", 1) != self.d:
            raise ValueError(f"{f}: layout of {len(idx['sites'])} sites x rank "
                             f"{idx.get('rank', 1)} does not match the stored width {self.d}")

    def shard(self, i, check=True):
        s = self.index["shards"][i]
        file = os.path.join(self.path, s["acts"])
        arr = np.load(file, mmap_mode="r")
        if arr.shape != (s["tokens"], self.d):
            raise ValueError(f"{file}: holds {arr.shape}, but index.json says ({s['tokens']}, "
                             f"{self.d}) "
                             "(truncated or from another layout)")
        if check:
            finite = np.isfinite(np.asarray(arr, dtype=np.float32)).all(1)
            if not finite.all():
                raise ValueError(f"{file}: row {int(np.argmin(finite))} holds NaN or Inf values")
        return arr

    def mlp(self, i):
        """The MLP-neuron baseline of shard i: (tokens, len(index['mlp_neurons']))."""
        s = self.index["shards"][i]
        if "mlp" not in s:
            raise ValueError(f"{self.path}: no MLP neurons were collected (collect.py "
                             f"--mlp-neurons N)")
        file = os.path.join(self.path, s["mlp"])
        arr = np.load(file, mmap_mode="r")
        n = len(self.index["mlp_neurons"])
        if arr.shape != (s["tokens"], n):
            raise ValueError(f"{file}: holds {arr.shape}, expected ({s['tokens']}, {n})")
        return arr

    def tokens(self, i):
        return np.load(os.path.join(self.path, self.index["shards"][i]["ids"]), mmap_mode="r")

    def load_all(self):
        return torch.cat([torch.from_numpy(np.array(self.shard(i), dtype=np.float32))
                          for i in range(len(self.index["shards"]))])


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
            prompt = render_chat([{"role": "user", "content": r["question"]}],
                                 add_generation_prompt=True)
            docs.append((w, tok.encode(prompt + r["generation"])))
        else:
            raise ValueError(f"--format {fmt!r}: expected s1, paper or samples")
    return docs


@torch.no_grad()
def doc_scalars(model, ids, window, mlp_neurons=None):
    """Adapter scalars (T, n_sites * r) of one document, run in windows of `window` tokens with a
    KV cache. With mlp_neurons ([(layer, index)]) also the MLP-neuron baseline: those entries of
    down_proj's input act(gate(x)) * up(x), read by forward pre-hooks that are always removed."""
    dev = model.lm_head.weight.device
    T = len(ids)
    cache = KVCache(model.cfg, 1, T, model.lm_head.weight.dtype, dev)
    by_layer, got, hooks = {}, {}, []
    for l, i in mlp_neurons or []:
        by_layer.setdefault(l, []).append(i)
    for l, idx in by_layer.items():
        sel = torch.tensor(idx, device=dev)
        hook = lambda mod, inp, l=l, sel=sel: got.setdefault(l, []).append(inp[0][0, :,
                                                                                  sel].float())
        hooks.append(model.model.layers[l].mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with capture(model) as cap:
            for s in range(0, T, window):
                x = torch.tensor([ids[s:s + window]], device=dev)
                model.forward_cached(x, torch.arange(s, s + x.shape[1], device=dev)[None], cache)
    finally:
        for h in hooks:
            h.remove()
    if mlp_neurons is None:
        return cap.acts[0]
    mlp = torch.cat([torch.cat(got[l]) for l in by_layer], dim=1) if by_layer else torch.zeros(T, 0)
    return cap.acts[0], mlp


def collect(args):
    rank, world, dev = setup_dist()
    tok = Tokenizer(args.tokenizer or args.model)
    docs = documents(args.data, args.format, tok)[:args.max_docs or None]
    model, _ = load_model(args.model, args.adapter, args.dtype, device=dev)
    layout = [list(s) for s in sites(model)]
    gen = torch.Generator().manual_seed(args.seed)
    neurons = [[l, int(i)] for l in range(model.cfg.num_hidden_layers)
               for i in sorted(torch.randperm(model.cfg.intermediate_size,
                                              generator=gen)[:args.mlp_neurons].tolist())]
    rank_r = adapters(model)[0].rank
    store_dtype = {"float32": np.float32, "float16": np.float16}[args.store_dtype]
    os.makedirs(args.out, exist_ok=True)
    n_shards = math.ceil(len(docs) / args.docs_per_shard)
    mine = [j for j in range(n_shards) if j % world == rank]
    shard_docs = lambda j: docs[j * args.docs_per_shard:(j + 1) * args.docs_per_shard]
    bar = tqdm(total=sum(len(ids) for j in mine for _, ids in shard_docs(j)), unit="tok",
               desc=f"collect rank {rank}", file=sys.stderr, disable=rank != 0)
    t0, n_tok = time.time(), 0
    for j in mine:
        side = os.path.join(args.out, f"shard-{j:05d}.json")
        part = shard_docs(j)
        if os.path.isfile(side):  # finished by an earlier run
            bar.update(sum(len(ids) for _, ids in part))
            continue
        acts, toks, mlps, meta, off = [], [], [], [], 0
        for k, (src, ids) in enumerate(part):
            a, mlp = doc_scalars(model, ids, args.window, [tuple(n) for n in neurons])
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
            n_tok += len(ids)
            bar.update(len(ids))
            bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
        arrays = [(f"acts-{j:05d}.npy", np.concatenate(acts)), (f"tokens-{j:05d}.npy",
                                                                np.concatenate(toks))]
        if neurons:
            arrays.append((f"mlp-{j:05d}.npy", np.concatenate(mlps)))
        for name, arr in arrays:
            with open(os.path.join(args.out, name + ".tmp"), "wb") as f:
                np.save(f, arr)
            os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
        sidecar = dict(acts=f"acts-{j:05d}.npy", ids=f"tokens-{j:05d}.npy", tokens=off, docs=meta)
        if neurons:
            sidecar["mlp"] = f"mlp-{j:05d}.npy"
        write_atomic(side, json.dumps(sidecar))
    bar.close()
    torch.distributed.barrier()
    if rank == 0:
        shards = [read_json(os.path.join(args.out, f"shard-{j:05d}.json")) for j in range(n_shards)]
        index = dict(shape=[sum(s["tokens"] for s in shards), len(layout) * rank_r],
                     dtype=args.store_dtype,
                     sites=layout, rank=rank_r, order="column = position of (layer, target) "
                     "sorted by layer, then gate, up, down, q, k, v, o (7 * layer + p with all 7 "
                     "targets)",
                     model=os.path.abspath(args.model), adapter=os.path.abspath(args.adapter),
                     format=args.format, data=os.path.abspath(args.data), documents=len(docs),
                     shards=shards, mlp_neurons=neurons)
        write_atomic(os.path.join(args.out, "index.json"), json.dumps(index, indent=1))
        print(f"collect: {index['shape'][0]:,} tokens x {index['shape'][1]} scalars in {n_shards} "
              f"shards -> {args.out}")
    torch.distributed.barrier()
    cleanup_dist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", required=True,
                   help="s1K-1.1 rows (.jsonl/.parquet) or eval.py samples.jsonl")
    p.add_argument("--format", default="s1", choices=["s1", "paper", "samples"])
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--docs-per-shard", type=int, default=64)
    p.add_argument("--window", type=int, default=4096,
                   help="tokens per forward (KV-cached) for long documents")
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--mlp-neurons", type=int, default=0,
                   help="also store this many SwiGLU neurons per layer (down_proj's input), a "
                   "seeded sample: the baseline")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with user_errors("collect.py"):
        return collect(args)


if __name__ == "__main__":
    main()
