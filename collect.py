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
(--format paper, docs/paper.md section D), or eval.py generations (--format samples). Each
document runs in windows of --window tokens with a KV cache (Qwen2.forward_cached), so a
20,000-token trace fits in memory and gives what one full forward gives.

Store layout: documents are grouped into shards of --docs-per-shard; shard j is written by rank
j % world as acts-XXXXX.npy (N_j, n_sites) + tokens-XXXXX.npy (N_j,) int32 and a shard-XXXXX.json
sidecar with their sha256, written last: a rerun keeps finished shards, provided collect.json
(model, adapter, data, settings) matches. index.json describes the whole store: shape, dtype, the
column layout (sites in lora.py's capture order: column 7 * layer + p, p in gate, up, down, q, k,
v, o), what it was collected from, and every document's shard and offsets. With --mlp-neurons N,
also N MLP neurons per layer as mlp-XXXXX.npy, the baseline: up_proj's first N output channels
(the paper's, docs/paper.md F1) or a seeded sample of down_proj's input (--mlp-baseline swiglu).
"""
import hashlib
import io
import math
import os
import re
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common import (Parser, check_out, cleanup_dist, file_identity, model_identity, number,
                    read_json, setup_dist, sha256_file, start_run, user_errors, write_atomic,
                    write_json)
from data import (Tokenizer, data_identity, paper_collection_text, read_rows, render_chat,
                  s1_example)
from lora import adapter_identity, adapters, capture, load_model, sites
from model import KVCache

# -----------------------------------------------------------------------------
# the activation store


class ActivationStore:
    """Reads a collected store (index.json + shards), checking sizes, layout and values; each
    file's checksum is verified the first time it is read (verify=False skips that)."""

    def __init__(self, path, verify=True):
        f = os.path.join(path, "index.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: no index.json (run `collect.py` first)")
        self.path, self.index, self.verify, self.verified = path, read_json(f), verify, set()
        idx = self.index
        for k in ("shape", "dtype", "sites", "shards"):
            if k not in idx:
                raise ValueError(f"{f}: missing field {k!r}")
        self.d = idx["shape"][1]
        if len(idx["sites"]) * idx.get("rank", 1) != self.d:
            raise ValueError(f"{f}: layout of {len(idx['sites'])} sites x rank "
                             f"{idx.get('rank', 1)} does not match the stored width {self.d}")

    def _load(self, i, key, shape):
        """One array file of shard i (memory-mapped), its size and checksum checked."""
        s = self.index["shards"][i]
        file = os.path.join(self.path, s[key])
        if self.verify and file not in self.verified:
            want = s.get("sha256", {}).get(key)
            if want is None or sha256_file(file) != want:
                raise ValueError(f"{file}: its checksum does not match shard-{i:05d}.json "
                                 "(changed or damaged since collection)")
            self.verified.add(file)
        try:
            arr = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as e:  # e.g. "mmap length is greater than file size"
            raise ValueError(f"{file}: not a readable .npy array, maybe truncated ({e})") from None
        if arr.shape != shape:
            raise ValueError(f"{file}: holds {arr.shape}, but index.json says {shape} (truncated "
                             "or from another layout)")
        return arr

    def shard(self, i, check=True):
        arr = self._load(i, "acts", (self.index["shards"][i]["tokens"], self.d))
        if check:
            finite = np.isfinite(np.asarray(arr, dtype=np.float32)).all(1)
            if not finite.all():
                raise ValueError(f"{os.path.join(self.path, self.index['shards'][i]['acts'])}: "
                                 f"row {int(np.argmin(finite))} holds NaN or Inf values")
        return arr

    def mlp(self, i):
        """The MLP-neuron baseline of shard i: (tokens, len(index['mlp_neurons']))."""
        if "mlp" not in self.index["shards"][i]:
            raise ValueError(f"{self.path}: no MLP neurons were collected (collect.py "
                             "--mlp-neurons N)")
        n = len(self.index["mlp_neurons"])
        return self._load(i, "mlp", (self.index["shards"][i]["tokens"], n))

    def tokens(self, i):
        return self._load(i, "ids", (self.index["shards"][i]["tokens"],))

    def load_all(self):
        return torch.cat([torch.from_numpy(np.array(self.shard(i), dtype=np.float32))
                          for i in range(len(self.index["shards"]))])

    def identity(self):
        """What the store holds: its shape, what it was collected from, and a digest of every
        file's checksum (the SAE and features.json record it; mine compares)."""
        sums = [v for s in self.index["shards"] for _, v in sorted(s.get("sha256", {}).items())]
        return dict(path=os.path.abspath(self.path), shape=self.index["shape"],
                    made_from=self.index.get("made_from"),
                    digest=hashlib.sha256("".join(sums).encode()).hexdigest())


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
def doc_scalars(model, ids, window, mlp_neurons=None, baseline="up_proj"):
    """Adapter scalars (T, n_sites * r) of one document, run in windows of `window` tokens with a
    KV cache. With mlp_neurons ([(layer, index)]) also the MLP-neuron baseline: those output
    channels of up_proj (baseline "up_proj", the paper's), or those entries of down_proj's input
    act(gate(x)) * up(x) ("swiglu"), read by hooks that are always removed."""
    dev = model.lm_head.weight.device
    T = len(ids)
    cache = KVCache(model.cfg, 1, T, model.lm_head.weight.dtype, dev)
    by_layer, got, hooks = {}, {}, []
    for l, i in mlp_neurons or []:
        by_layer.setdefault(l, []).append(i)
    for l, idx in by_layer.items():
        sel = torch.tensor(idx, device=dev)
        keep = lambda x, l=l, sel=sel: got.setdefault(l, []).append(x[0, :, sel].float())
        mlp = model.model.layers[l].mlp
        hooks.append(mlp.up_proj.register_forward_hook(lambda m, i, o, keep=keep: keep(o))
                     if baseline == "up_proj" else
                     mlp.down_proj.register_forward_pre_hook(lambda m, i, keep=keep: keep(i[0])))
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


STORE_FILE = re.compile(r"(acts|tokens|mlp)-\d{5}\.npy|shard-\d{5}\.json|index\.json|collect\.json"
                        r"|.*\.tmp")


def save_shard(out, j, arrays, sidecar):
    """The arrays of shard j, each written whole, then its sidecar with their checksums: a shard
    without its sidecar is unfinished, and a rerun redoes it."""
    sidecar["sha256"] = {}
    for key, arr in arrays.items():
        name = f"{dict(acts='acts', ids='tokens', mlp='mlp')[key]}-{j:05d}.npy"
        buf = io.BytesIO()
        np.save(buf, arr)
        write_atomic(os.path.join(out, name), buf.getvalue())
        sidecar[key] = name
        sidecar["sha256"][key] = hashlib.sha256(buf.getvalue()).hexdigest()
    write_json(os.path.join(out, f"shard-{j:05d}.json"), sidecar, indent=None)


def shard_finished(out, j):
    """Whether shard j was saved whole: its sidecar and every array file the sidecar names are
    there (a shard whose file was deleted since is collected again)."""
    f = os.path.join(out, f"shard-{j:05d}.json")
    if not os.path.isfile(f):
        return False
    sidecar = read_json(f)
    return all(os.path.isfile(os.path.join(out, sidecar[k])) for k in sidecar["sha256"])


def collect(args):
    rank, world, dev = setup_dist()
    tok = Tokenizer(args.tokenizer or args.model)
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
    layout = [list(s) for s in sites(model)]
    if not 0 <= args.mlp_neurons <= model.cfg.intermediate_size:
        raise ValueError(f"--mlp-neurons {args.mlp_neurons}: expected 0 to the MLP width "
                         f"{model.cfg.intermediate_size}")
    gen = torch.Generator().manual_seed(args.seed)
    pick = lambda: (range(args.mlp_neurons) if args.mlp_baseline == "up_proj" else
                    sorted(torch.randperm(model.cfg.intermediate_size,
                                          generator=gen)[:args.mlp_neurons].tolist()))
    neurons = [[l, int(i)] for l in range(model.cfg.num_hidden_layers) for i in pick()]
    rank_r = adapters(model)[0].rank
    store_dtype = {"float32": np.float32, "float16": np.float16}[args.store_dtype]
    n_shards = math.ceil(len(docs) / args.docs_per_shard)
    mine = [j for j in range(n_shards) if j % world == rank]
    shard_docs = lambda j: docs[j * args.docs_per_shard:(j + 1) * args.docs_per_shard]
    bar = tqdm(total=sum(len(ids) for j in mine for _, ids in shard_docs(j)), unit="tok",
               desc=f"collect rank {rank}", file=sys.stderr, disable=rank != 0)
    t0, n_tok = time.time(), 0
    for j in mine:
        part = shard_docs(j)
        if shard_finished(args.out, j):  # earlier
            bar.update(sum(len(ids) for _, ids in part))
            continue
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
            n_tok += len(ids)
            bar.update(len(ids))
            bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
        arrays = dict(acts=np.concatenate(acts), ids=np.concatenate(toks))
        if neurons:
            arrays["mlp"] = np.concatenate(mlps)
        save_shard(args.out, j, arrays, dict(tokens=off, docs=meta))
    bar.close()
    torch.distributed.barrier()
    if rank == 0:
        shards = [read_json(os.path.join(args.out, f"shard-{j:05d}.json")) for j in range(n_shards)]
        index = dict(shape=[sum(s["tokens"] for s in shards), len(layout) * rank_r],
                     dtype=args.store_dtype, sites=layout, rank=rank_r,
                     order="column = position of (layer, target) sorted by layer, then gate, up, "
                     "down, q, k, v, o (7 * layer + p with all 7 targets)",
                     made_from=settings, documents=len(docs), shards=shards, mlp_neurons=neurons,
                     mlp_baseline=args.mlp_baseline if neurons else None)
        write_json(os.path.join(args.out, "index.json"), index)
        print(f"collect: {index['shape'][0]:,} tokens x {index['shape'][1]} scalars in {n_shards} "
              f"shards -> {args.out}")
    torch.distributed.barrier()
    cleanup_dist()


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", required=True, help="HF model directory (the base)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--other-base", action="store_true",
                   help="use an adapter trained on another base than --model")
    p.add_argument("--data", required=True,
                   help="s1K-1.1 rows (.jsonl/.parquet) or eval.py samples.jsonl")
    p.add_argument("--format", default="s1", choices=["s1", "paper", "samples"],
                   help="s1: the chat template + s1 markers; paper: the official code's text; "
                   "samples: eval.py generations")
    p.add_argument("--out", required=True, help="store directory (index.json, shards)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
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
