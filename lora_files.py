"""
The adapter on disk: PEFT's file format (tensor names, adapter_config.json checked field by
field), save and load, a base model loaded with its adapter, and the merged export. lora.py holds
the method; this file, its files.

    from lora_files import save_adapter, load_adapter, load_model, export_merged
    save_adapter(model, "runs/rank1/adapter", provenance=record)  # PEFT-loadable, published whole
    load_adapter(model, "runs/rank1/adapter")                     # checked before model is touched
    model, identity = load_model("/models/Qwen2.5-32B-Instruct", adapter="runs/rank1/adapter")
    export_merged(model, "merged/")                 # an HF checkpoint, adapters merged (export.py)

A saved adapter is what PEFT writes (adapter_model.safetensors with base_model.model.<HF path>
.lora_A/B.weight, adapter_config.json) and, when trained here, rank1.json: what it was made from
(its base's identity, checked by load_model) and its training settings (checked against
adapter_config.json).
"""
import json
import os
import re

import torch

from checkpoint import (model_identity, read_safetensors, save_hf_checkpoint, tokenizer_files,
                        write_safetensors)
from common import DTYPES, differences, publish_dir, read_json, sha256_file
from lora import PARENT, SITE_ORDER, LoRALinear, adapters, apply_lora, hf_path, lora_config
from model import Qwen2

PEFT_PREFIX = "base_model.model."
# peft_name parsed: (layer, target, "A" or "B")
PEFT_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)"
                       r"\.lora_([AB])\.weight$")


def peft_name(layer, target, which):
    """The name of an adapter tensor in PEFT's adapter_model.safetensors (which: "A" or "B")."""
    return f"{PEFT_PREFIX}{hf_path(layer, target)}.lora_{which}.weight"


def adapter_tensors(adapter_dir):
    """{PEFT name: tensor} of an adapter directory's weights; PEFT writes ".lora_A.weight", some
    tools keep the adapter name (".lora_A.default.weight"), which is dropped."""
    return {k.replace(".default.weight", ".weight"): v for k, v in
            read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "rank1.json")


def save_adapter(model, out_dir, base_model_name_or_path=None, state_dict=None, provenance=None,
                 overwrite=False, command="lora.py"):
    """Write a PEFT-loadable adapter (adapter_model.safetensors + adapter_config.json) and, with
    provenance, rank1.json (what it was made from); published whole (common.publish_dir).

    state_dict: optional {name: tensor} of full adapter tensors (train.py passes the gathered ones).
    """
    cfg = lora_config(model)
    if state_dict is None:
        state_dict = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    tensors = {}
    for k, v in state_dict.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"save_adapter: {k} has non-finite values")
        tensors[PEFT_PREFIX + k + ".weight"] = v.detach().float().cpu().contiguous()
    all_layers = cfg["layers"] == list(range(model.cfg.num_hidden_layers))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["rank"], "lora_alpha": cfg["alpha"],
        "use_rslora": cfg["rslora"], "lora_dropout": cfg["dropout"],
        "target_modules": cfg["targets"],
        "layers_to_transform": None if all_layers else cfg["layers"],
        "layers_pattern": None if all_layers else "layers", "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }

    def write(tmp):
        write_safetensors(tensors, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if provenance is not None:
            with open(os.path.join(tmp, "rank1.json"), "w") as f:
                json.dump(provenance, f, indent=1)
    publish_dir(out_dir, write, lambda n: n in ADAPTER_FILES, overwrite, command=command)


def read_adapter_config(adapter_dir):
    """adapter_config.json, checked: what apply_lora needs, or an error naming the field."""
    cfg_file = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json")
    c = read_json(cfg_file)

    def bad(field, why):
        raise ValueError(f"{cfg_file}: {field}: {why}")
    if c.get("peft_type") != "LORA":
        bad("peft_type", f"{c.get('peft_type')!r}, expected 'LORA'")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False}
    for k, ok in unsupported.items():
        if c.get(k, ok) != ok:
            bad(k, f"{c[k]!r} is not supported (expected {ok})")
    if c.get("bias", "none") != "none":
        bad("bias", f"{c['bias']!r}: bias training is not supported (expected 'none')")
    for k in ("rank_pattern", "alpha_pattern"):
        if c.get(k):
            bad(k, "per-module ranks/alphas are not supported")
    if c.get("modules_to_save"):
        bad("modules_to_save", f"{c['modules_to_save']} is not supported")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or any(t not in PARENT for t in targets):
        bad("target_modules", f"{c.get('target_modules')!r}: expected names among "
            f"{list(SITE_ORDER)} (an adapter for another architecture?)")
    layers = c.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None and not all(isinstance(i, int) for i in layers):
        bad("layers_to_transform", f"{layers!r}: expected a list of layer indices")
    for k, kind in (("r", int), ("lora_alpha", (int, float))):
        if k not in c:
            bad(k, "missing")
        if not isinstance(c[k], kind) or isinstance(c[k], bool) or c[k] <= 0:
            bad(k, f"{c[k]!r}: expected a positive number")
    kw = dict(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
              rslora=bool(c.get("use_rslora", False)),
              targets=[t for t in SITE_ORDER if t in targets], layers=layers)
    check_trained_config(adapter_dir, cfg_file, kw)
    return c, kw


def check_trained_config(adapter_dir, cfg_file, kw):
    """An adapter trained here records its training settings (rank1.json): an adapter_config.json
    edited since (another lora_alpha scales every update) is one line naming both files."""
    record = os.path.join(adapter_dir, "rank1.json")
    if not os.path.isfile(record):
        return
    trained = read_json(record).get("config") or {}
    now = dict(rank=kw["rank"], alpha=kw["alpha"], rslora=kw["rslora"],
               targets=",".join(kw["targets"]))
    was = {k: trained[k] for k in now if k in trained}
    if "targets" in was:
        was["targets"] = ",".join(t for t in SITE_ORDER if t in was["targets"].split(","))
    diff = [f"{k}: {was[k]!r} at training vs {now[k]!r} now" for k in was if was[k] != now[k]]
    if diff:
        raise ValueError(f"{cfg_file} no longer matches the training recorded in {record} "
                         f"({'; '.join(diff)}); restore it, or use an adapter directory "
                         "without rank1.json")


def load_adapter(model, adapter_dir, verbose=True):
    """Apply the adapters adapter_config.json describes to `model` and load their weights strictly.
    Everything is checked before the model is touched: on any error the model is unchanged."""
    c, kw = read_adapter_config(adapter_dir)
    weights_file = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors "
                                "adapters are read)")
    n = model.cfg.num_hidden_layers
    layers = range(n) if kw["layers"] is None else kw["layers"]
    if any(not 0 <= l < n for l in layers):
        raise ValueError(f"{adapter_dir}/adapter_config.json: layers_to_transform {kw['layers']} "
                         f"is not within 0..{n - 1} (an adapter for another model?)")
    expected = {}  # PEFT name -> shape, from the base layers the adapters will wrap
    for l in layers:
        for t in kw["targets"]:
            base = model.get_submodule(hf_path(l, t))
            if isinstance(base, LoRALinear):
                raise ValueError(f"{hf_path(l, t)} already has a LoRA adapter")
            r = kw["rank"]
            expected[peft_name(l, t, "A")] = (r, base.in_features)
            expected[peft_name(l, t, "B")] = (base.out_features, r)
    sd = adapter_tensors(adapter_dir)
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing:
        raise ValueError(f"{weights_file}: missing {len(missing)} adapter tensors, e.g. "
                         f"{missing[:3]}")
    if extra:
        raise ValueError(f"{weights_file}: {len(extra)} unexpected tensors, e.g. {extra[:3]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{weights_file}: {k} has shape {tuple(sd[k].shape)}, expected "
                             f"{shape} (an adapter for a model of another size?)")
        if not torch.isfinite(sd[k]).all():
            raise ValueError(f"{weights_file}: {k} has non-finite values")
    apply_lora(model, **kw, verbose=verbose)
    with torch.no_grad():
        for m in adapters(model):
            m.lora_A.copy_(sd[peft_name(m.layer, m.target, "A")])
            m.lora_B.copy_(sd[peft_name(m.layer, m.target, "B")])
    return c


def adapter_identity(adapter_dir):
    """What an adapter is: the hashes of its two files."""
    return dict(path=os.path.abspath(adapter_dir),
                config_sha256=sha256_file(os.path.join(adapter_dir, "adapter_config.json")),
                weights_sha256=sha256_file(os.path.join(adapter_dir, "adapter_model.safetensors")))


def check_base(path, adapter, other_base=False):
    """An adapter trained here records its base (rank1.json): another base is an error unless
    other_base (--other-base) says it is meant. The base's path may differ; its config and weight
    files may not."""
    f = os.path.join(adapter, "rank1.json")
    if other_base or not os.path.isfile(f):
        return
    with open(f) as fh:
        was = (json.load(fh).get("made_from") or {}).get("model")
    diff = was and differences(was, model_identity(path))
    if diff:
        raise ValueError(f"{adapter} was trained on {was.get('path')}, whose config or weights "
                         f"differ from {path}'s ({diff[0].split(':')[0]}); pass --other-base to "
                         "use it anyway")


def load_model(path, adapter=None, dtype=None, merge=False, device="cpu", other_base=False):
    """An HF model directory, optionally with a PEFT adapter (merged into the weights with merge;
    its recorded base checked, see check_base): (model in eval mode, identity), identity being
    what results record about the weights."""
    if adapter:
        check_base(path, adapter, other_base)
    model = Qwen2.from_pretrained(path, dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype,
                                  device=device)
    identity = dict(model=model_identity(path), adapter=None, merged=False,
                    dtype=str(model.lm_head.weight.dtype).replace("torch.", ""))
    if adapter:
        load_adapter(model, adapter, verbose=False)
        identity.update(adapter=adapter_identity(adapter), merged=bool(merge),
                        adapter_sites=len(adapters(model)))
        for m in adapters(model) if merge else ():
            m.merge()
    return model.eval(), identity


def export_merged(model, out_dir, tokenizer_dir=None, dtype=None, max_shard_bytes=5 * 2**30,
                  provenance=None, overwrite=False, command="export.py"):
    """Write an HF checkpoint with the adapters merged (W + s B A) that transformers and vLLM load:
    sharded safetensors + index + config.json (+ tokenizer files, + rank1.json with provenance).
    `model` is not modified."""
    dtype = dtype or model.lm_head.weight.dtype
    deltas = {m.name + ".weight": m for m in adapters(model)}

    def tensors():
        for k, v in model.hf_tensors():
            if k in deltas and not deltas[k].merged:
                v = v.float() + deltas[k].delta_weight().detach()
            v = v.to(dtype) if v.is_floating_point() else v
            if not torch.isfinite(v).all():
                raise ValueError(f"export_merged: {k} is non-finite after merging")
            yield k, v
    cfg = {**model.cfg.to_hf_dict(), "torch_dtype": str(dtype).replace("torch.", "")}
    files = tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    save_hf_checkpoint(out_dir, tensors(), cfg, max_shard_bytes, files, provenance, overwrite,
                       command=command)
