"""
The SAE and its features in the formats the field's tools read (`python sae.py export`):

- SAELens (`sae_lens.SAE.load_from_disk(DIR)`): cfg.json (architecture "jumprelu") and
  sae_weights.safetensors with W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec and a
  per-latent threshold. A BatchTopK SAE at inference is a JumpReLU SAE: relu(pre) * (pre > theta)
  with its learned threshold theta for every latent (batchtopk.SAE.encode). Our input
  normalisation is folded into the weights (SAE.folded), so the folder takes the raw adapter
  scalars; its metadata names the base model, the adapter, the store and the input layout.
  batchtopk.SAE.load reads such a folder back (an SAE trained elsewhere on a rank1 store too).
- Neuronpedia's export layout: gzipped jsonl in features/ (a row per latent: index, max
  activation, density, a histogram of its non-zero activations, its decoder vector),
  activations/ (a row per top example: tokens as text, values, the max and its position) and
  explanations/ (a row per autointerp explanation and its explainer model), from the SAE,
  `interpret.py mine`'s features.json and `interpret.py autointerp`'s autointerp.jsonl.
"""
import gzip
import json
import os

import numpy as np
from safetensors.torch import save

from common import publish_dir, read_json

SAELENS_WEIGHTS = "sae_weights.safetensors"


def saelens_tensors(sae):
    """{name: tensor} of SAELens's JumpReLU layout for our SAE, in raw-scalar space."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().float().cpu().contiguous() for t in sae.folded())
    threshold = sae.threshold.detach().float().cpu().expand(sae.n_latents).contiguous()
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)


def layout(sites):
    """The metadata's words on the input: what scalar j is."""
    return (f"{len(sites)} rank-1 adapter scalars u = x·a per token: column j is the adapter at "
            f"sites[j] ([layer, projection], 7 * layer + p, p in gate_proj, up_proj, down_proj, "
            f"q_proj, k_proj, v_proj, o_proj), as collected by rank1's collect.py")


def export_saelens(sae, sae_dir, out, overwrite=False):
    """Write the SAELens folder `out` for the SAE in sae_dir; returns out."""
    made = sae.made_from or {}
    store = made.get("store") or {}
    collected = store.get("made_from") or {}
    sites = collected.get("sites") or []
    cfg = dict(d_in=sae.d_in, d_sae=sae.n_latents, dtype="float32", device="cpu",
               apply_b_dec_to_input=True, normalize_activations="none",
               reshape_activations="none", architecture="jumprelu",
               metadata=dict(model_name=(collected.get("model") or {}).get("path"),
                             hook_name="rank1.lora_scalars", hook_head_index=None,
                             prepend_bos=False, context_size=None,
                             dataset_path=(collected.get("data") or {}).get("path"),
                             rank1=dict(kind="rank1 BatchTopK SAE over LoRA scalars",
                                        k=sae.k, sae=os.path.abspath(sae_dir),
                                        model=collected.get("model"),
                                        adapter=collected.get("adapter"), store=store,
                                        layout=layout(sites), sites=sites)))
    def write(tmp):
        with open(os.path.join(tmp, SAELENS_WEIGHTS), "wb") as f:
            f.write(save(saelens_tensors(sae)))
        with open(os.path.join(tmp, "cfg.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    publish_dir(out, write, ("cfg.json", SAELENS_WEIGHTS).__contains__, overwrite,
                command="sae.py export")
    return out


def read_saelens_cfg(path):
    """A SAELens folder's cfg.json, checked: a JumpReLU SAE with its sizes."""
    f = os.path.join(path, "cfg.json")
    c = read_json(f, ("d_in", "d_sae"), "an SAELens cfg.json")
    arch = c.get("architecture", "standard")
    if arch != "jumprelu":
        raise ValueError(f"{f}: architecture {arch!r}; rank1 reads SAELens's 'jumprelu' SAEs "
                         "(a BatchTopK SAE exported with its threshold is one)")
    if c.get("normalize_activations", "none") != "none" or not c.get("apply_b_dec_to_input",
                                                                       True):
        raise ValueError(f"{f}: expected normalize_activations 'none' and apply_b_dec_to_input "
                         "true (raw inputs minus b_dec, as rank1 encodes)")
    return c


# -----------------------------------------------------------------------------
# Neuronpedia


def write_gz_jsonl(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_gz_jsonl(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def neuronpedia_rows(sae, features, explanations, explainer, model_id, source):
    """(features, activations, explanations) rows of Neuronpedia's export for the SAE latents of
    features.json (named sae{j}: index j); explanations: autointerp.jsonl's rows, written by the
    LLM `explainer`."""
    W_dec = saelens_tensors(sae)["W_dec"]
    latent = {f["id"]: int(f["name"][3:]) for f in features}  # features.json's "sae{j}"
    feats, acts, expl = [], [], []
    for f in features:
        i = latent[f["id"]]
        head = dict(modelId=model_id, layer=source, index=i)
        nonzero = [e["value"] for e in f.get("random", []) if e["value"] > 0]
        heights, edges = np.histogram(nonzero, bins=20) if nonzero else ([], [])
        top = f.get("top", [])
        feats.append(dict(head, maxActApprox=top[0]["value"] if top else 0.0,
                          frac_nonzero=f["freq"], act_hist_bar_heights=list(map(int, heights)),
                          act_hist_bar_values=[float((a + b) / 2) for a, b in
                                               zip(edges[:-1], edges[1:])],
                          decoder_weights=W_dec[i].tolist(), name=f["name"]))
        for e in top:
            vals = e["acts"]
            j = int(np.argmax(vals)) if vals else 0
            acts.append(dict(head, tokens=e["tokens"], values=vals, maxValue=e["value"],
                             maxValueTokenIndex=j, doc=e["doc"], pos=e["pos"]))
    for r in explanations:
        if r.get("explanation") and r["id"] in latent:
            expl.append(dict(modelId=model_id, layer=source, index=latent[r["id"]],
                             description=r["explanation"],
                             explanationModelName=explainer or "unknown",
                             typeName="rank1-autointerp",
                             score=r.get("detection_balanced_accuracy")))
    return feats, acts, expl


NEURONPEDIA_DIRS = ("features", "activations", "explanations")


def export_neuronpedia(sae, features, explanations, explainer, out, model_id, source,
                       overwrite=False):
    """features/, activations/, explanations/ (batch-0.jsonl.gz each) in `out`; their row
    counts."""
    rows = neuronpedia_rows(sae, features, explanations, explainer, model_id, source)

    def write(tmp):
        for name, r in zip(NEURONPEDIA_DIRS, rows):
            os.makedirs(os.path.join(tmp, name))
            write_gz_jsonl(os.path.join(tmp, name, "batch-0.jsonl.gz"), r)
    publish_dir(out, write, NEURONPEDIA_DIRS.__contains__, overwrite, command="sae.py export")
    return [len(r) for r in rows]
