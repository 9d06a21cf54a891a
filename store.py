"""
The activation store: what collect.py writes and sae.py, interpret.py and demo.py read.

    from store import ActivationStore
    store = ActivationStore("acts/"); x = store.load_all()        # (N, 448) float32

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
import os
import re

import numpy as np
import torch

from common import read_json, sha256_file, write_atomic, write_json


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


STORE_FILE = re.compile(r"(acts|tokens|mlp)-\d{5}\.npy|shard-\d{5}\.json|index\.json|collect\.json"
                        r"|.*\.tmp")


def write_npy(path, arr):
    """One .npy file written whole (write_atomic); its sha256."""
    buf = io.BytesIO()
    np.save(buf, arr)
    write_atomic(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def save_shard(out, j, arrays, sidecar):
    """The arrays of shard j, each written whole, then its sidecar with their checksums: a shard
    without its sidecar is unfinished, and a rerun redoes it."""
    sidecar["sha256"] = {}
    for key, arr in arrays.items():
        name = f"{dict(acts='acts', ids='tokens', mlp='mlp')[key]}-{j:05d}.npy"
        sidecar[key] = name
        sidecar["sha256"][key] = write_npy(os.path.join(out, name), arr)
    write_json(os.path.join(out, f"shard-{j:05d}.json"), sidecar, indent=None)


def shard_finished(out, j):
    """Whether shard j was saved whole: its sidecar and every array file the sidecar names are
    there (a shard whose file was deleted since is collected again)."""
    f = os.path.join(out, f"shard-{j:05d}.json")
    if not os.path.isfile(f):
        return False
    sidecar = read_json(f)
    return all(os.path.isfile(os.path.join(out, sidecar[k])) for k in sidecar["sha256"])
