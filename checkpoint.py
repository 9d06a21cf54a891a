"""
Weights on disk: safetensors files (read with their errors naming the file; never a pickle) and HF
model directories (config.json + model.safetensors or an index of shards): read one shard at a
time, checked against the expected names and shapes and for non-finite values; written sharded and
published whole; and identified cheaply (config and index hashes, weight file sizes, sampled
bytes of the tensor data).
"""
import hashlib
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import publish_dir, read_json, sha256_file


def safetensors_keys(file):
    """The tensor names in a safetensors file's header (no data is read)."""
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError and OS errors from a truncated or corrupt file
        raise ValueError(f"{file}: not a readable safetensors file, maybe truncated or corrupt "
                         f"({e})") from None


def safetensors_metadata(file):
    """The string metadata of a safetensors file's header."""
    try:
        with safe_open(file, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_safetensors(file, keys=None, device="cpu", dtype=None):
    """Tensors (all, or the given names) of one safetensors file; errors name the file. Floating
    tensors are cast to `dtype` when one is given."""
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            have = set(f.keys())
            keys = sorted(have) if keys is None else keys
            absent = [k for k in keys if k not in have]
            if absent:
                raise ValueError(f"{file}: the index says it holds {absent[:5]}, but it does not")
            out = {}
            for k in keys:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            return out
    except ValueError:
        raise
    except Exception as e:  # SafetensorError and OS errors from a truncated or corrupt file
        raise ValueError(f"{file}: not a readable safetensors file, maybe truncated or corrupt "
                         f"({e})") from None


# what an HF model directory carries beside its weights so that transformers, vLLM and eval.py
# load it as a model with its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "generation_config.json", "special_tokens_map.json")


def tokenizer_files(d):
    """The paths of the tokenizer files (TOKENIZER_FILES) that directory d holds."""
    return [os.path.join(d, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(d, n))]


def write_safetensors(tensors, path, metadata=None):
    """safetensors' save_file, but a write that fails (a full disk, a file-size limit, a read-only
    filesystem) is the OSError it is, naming the file, not a SafetensorError's text."""
    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as e:  # SafetensorError: "... No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if not m:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def save_hf_checkpoint(out_dir, named_tensors, config, max_shard_bytes=5 * 2**30, copy_files=(),
                       extra=None, overwrite=False, *, command):
    """Write (name, tensor) pairs as an HF checkpoint: model-XXXXX-of-YYYYY.safetensors shards
    (each written as soon as it fills), model.safetensors.index.json and config.json, copies of
    `copy_files`, and rank1.json with `extra` (what it was made from); published whole (see
    publish_dir). Shards are renamed once their count is known."""
    copied = {os.path.basename(f) for f in copy_files}
    owned = lambda n: (n in copied or n in ("config.json", "model.safetensors.index.json",
                                             "rank1.json", "model.safetensors")
                       or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n) is not None)

    def write(tmp):
        files, cur, size, total, weight_map = [], {}, 0, 0, {}

        def flush():
            name = f"shard-{len(files):05d}.safetensors"
            write_safetensors(cur, os.path.join(tmp, name), metadata={"format": "pt"})
            files.append((name, list(cur)))
        for k, v in named_tensors:
            v = v.detach().cpu().contiguous()
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                flush()
                cur, size = {}, 0
            cur[k], size, total = v, size + nbytes, total + nbytes
        flush()
        for i, (name, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
            weight_map.update({k: final for k in keys})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        for src in copy_files:
            shutil.copy(src, tmp)
        if extra is not None:
            with open(os.path.join(tmp, "rank1.json"), "w") as f:
                json.dump(extra, f, indent=1)
    publish_dir(out_dir, write, owned, overwrite, command=command)


def checkpoint_files(path):
    """{shard file: [tensor names it must hold] or None (all)} for an HF model directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        d = read_json(index)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected JSON with a 'weight_map' object")
        files = {}
        for key, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(key)
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} names shard {os.path.basename(file)}, which is "
                                        f"missing from {path}")
        return files
    if os.path.isfile(single):
        return {single: None}
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json "
                            "found")


def checkpoint_tensors(path, expected, dtype=None, device="cpu"):
    """Yield the (name, tensor) pairs of an HF checkpoint one shard at a time, in `dtype`, after
    checking every name against expected ({name: shape}, e.g. Qwen2.checkpoint_shapes()) and
    before handing out each tensor its shape. A tied head's lm_head.weight is skipped."""
    files = checkpoint_files(path)
    files = {f: keys if keys is not None else safetensors_keys(f) for f, keys in files.items()}
    names = {k for keys in files.values() for k in keys}
    tied_head = "lm_head.weight" in names and "lm_head.weight" not in expected
    if tied_head:  # tied to the embedding: only a copy of it may stand there
        names.discard("lm_head.weight")
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} tensors, e.g. {missing[:5]}")
    if extra:
        raise ValueError(f"{path}: {len(extra)} unexpected tensors, e.g. {extra[:5]}")
    if tied_head:
        check_tied_head(files, path)
    for file, keys in files.items():
        for k, t in read_safetensors(file, [k for k in keys if k in names], device, dtype).items():
            if tuple(t.shape) != expected[k]:
                raise ValueError(f"{file}: tensor {k} has shape {tuple(t.shape)}, expected "
                                 f"{expected[k]}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{file}: tensor {k} holds non-finite values (NaN or inf)")
            yield k, t


def read_checkpoint_tensors(path, names, dtype=None):
    """{name: tensor} of some tensors of an HF model directory, reading only the shards that hold
    them (the head of a 32B model without its 65 GB); a name it lacks is an error naming it."""
    out = {}
    for file, keys in checkpoint_files(path).items():
        keys = safetensors_keys(file) if keys is None else keys
        want = [k for k in names if k in keys]
        if want:
            out.update(read_safetensors(file, want, dtype=dtype))
    missing = [k for k in names if k not in out]
    if missing:
        raise ValueError(f"{path}: the checkpoint holds no {missing[0]}")
    return out


def check_tied_head(files, path):
    """A checkpoint whose config ties the head to the embedding may still hold lm_head.weight: fine
    when it equals the embedding (some tools save both), an error when it does not."""
    where = {k: f for f, keys in files.items() for k in keys}
    head = read_safetensors(where["lm_head.weight"], ["lm_head.weight"])["lm_head.weight"]
    emb = read_safetensors(where["model.embed_tokens.weight"],
                           ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    if head.shape != emb.shape or not torch.equal(head, emb):
        raise ValueError(f"{path}: config.json sets tie_word_embeddings, but the checkpoint's "
                         "lm_head.weight differs from model.embed_tokens.weight (set "
                         "tie_word_embeddings to false to use it)")


def model_identity(path):
    """What an HF model directory is, cheaply: the hashes of config.json and of the shard index,
    every weight file's name and size, and a hash of SAMPLE_WINDOWS windows of each file's tensor
    data (weights_sample: two models of the same shapes differ there; hashing 65 GB of weights
    would take minutes)."""
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(checkpoint_files(path))
    return dict(path=os.path.abspath(path),
                config_sha256=sha256_file(os.path.join(path, "config.json")),
                index_sha256=sha256_file(index) if os.path.isfile(index) else None,
                weights={os.path.basename(f): os.path.getsize(f) for f in files},
                weights_sample=weights_sample(files))


SAMPLE_WINDOWS, SAMPLE_BYTES = 16, 4096


def weights_sample(files):
    """sha256 over SAMPLE_WINDOWS windows of SAMPLE_BYTES spread evenly over the tensor data of
    each safetensors file (after its header): 64 KB read per file."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
            size = os.fstat(fh.fileno()).st_size
            for i in range(SAMPLE_WINDOWS):
                fh.seek(start + (size - start) * i // SAMPLE_WINDOWS)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()
