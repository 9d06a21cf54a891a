"""
The paper's analyses recomputed from one run, beside the paper's values (docs/paper.md A,
F2-F7): one self-contained HTML page (figures drawn here as inline SVG, no network, every text
escaped) and report.json with every number on the page.

    python report.py --recovery recovery.json --ablations abl/ablations.json --adapter A \\
        --acts acts/ --sae sae/ --features interp/features.json \\
        --autointerp interp/autointerp.jsonl --mlp-autointerp interp_mlp/autointerp.jsonl \\
        --categories interp/categories.jsonl --steer interp/steer_residual.json --out report/

Every input is optional; a section whose input is missing shows the command that produces it.
Sections: the recovery table (eval.py compare); the ablation panel (Fig. 1: per-layer KL, the
layer x type heatmap, the greedy MLP ablation); adapter geometry (norms, F7's weight
interference); the activation state's shape and the SAE latents' co-activation (analyses.py),
two of the official code's further analyses; LoRA features against MLP
neurons (F2: the 0/1/2 rubric with bootstrap intervals, breakdowns, a chi-squared test); the SAE
features' categories by activation mass (F4's donut); measured steering (F6: any number of
`interpret.py steer` outputs, LoRA-A in the residual stream, adapter scalars or SAE features).

LoRA vs MLP populations (--populations paper, the default): the MLP-adapter features (gate, up,
down x layers x both polarities) against the MLP neurons in their dominant polarity (the one with
the larger top activation), as collect.py --mlp-neurons 6 stores them (up_proj's first 6 output
channels per layer). --populations all keeps every feature the autointerp files hold.
"""
import math
import os
from html import escape

import numpy as np

from autointerp import CLASSES, parse_name, populations
from batchtopk import SAE, check_sae
from analyses import MIN_FIRING, clusters, cofiring, frequent_only, jaccard, state_spectrum
from common import (Parser, add_device_flag, check_out, differences, file_identity, fresh_outputs,
                    number, percentile_ci, pick_device, read_json, user_errors, write_atomic,
                    write_json)
from data import read_rows
from figures import (UNCATEGORIZED, bar_chart, donut_chart, heatmap, line_chart, provenance_lines,
                     site_heatmap, table)
from lora import ATTN, MLP, SITE_ORDER, lora_scaling
from lora_files import PEFT_NAME, adapter_identity, adapter_tensors, read_adapter_config
from store import ActivationStore

# docs/paper.md section A (the rubric counts are the official CSV's; chi2 and p computed from them)
PAPER = dict(
    recovery="73-90% of the full finetune's gain; s1's reference scores (AIME24 / MATH500 / "
             "GPQA-D): base 26.7 / 84.0 / 49.0, s1.1-32B 56.7 / 95.4 / 63.6 with budget forcing",
    rubric=dict(lora=dict(n=367, counts=[59, 146, 162], mean=1.28, median=1),
                mlp=dict(n=376, counts=[49, 100, 227], mean=1.47, median=2), chi2=20.3, p=4e-5),
    ablation=("per-layer KL about 0.001 in layers 0-20, 0.004-0.005 in 28-40, peaks of "
              "0.008-0.009 near layers 43-47 and 62 (of 64); MLP adapters dominate, attention "
              "adapters near 0; gate_proj is the most important type, then up_proj, then "
              "down_proj"),
    sae="3,584 latents, k = 16; 7 categories by activation mass (the shares are not published)")
COMMANDS = dict(
    recovery="python eval.py compare results/base results/full results/lora --out recovery.json",
    ablations="python ablate.py --model M --adapter A --samples RUN/samples.jsonl --out abl/",
    adapter="pass --adapter (the adapter directory)",
    autointerp="python interpret.py autointerp --features interp/features.json --out interp/ "
               "--llm-url URL --rubric --categorise",
    mlp_autointerp="python collect.py ... --mlp-neurons 6 --out acts_mlp/; python interpret.py "
                   "mine --acts acts_mlp/ --population mlp --tokenizer M --out interp_mlp/; "
                   "python interpret.py autointerp --features interp_mlp/features.json "
                   "--out interp_mlp/ --llm-url URL --rubric",
    features="python interpret.py mine --acts acts/ --sae sae/ --tokenizer M --out interp/",
    acts="python collect.py --model M --adapter A --data s1K-1.1.parquet --out acts/",
    sae="python sae.py train --acts acts/ --out sae/",
    steer="python interpret.py steer --model M --adapter A --residual L40.up_proj --strengths "
          "0,1,2 --seeds 0,1,2 --bench math500=PATH --out steer_residual.json (or --sae/--site)")

# -----------------------------------------------------------------------------
# statistics


def chi2_sf(x, dof):
    """P(X >= x) for X ~ chi-squared(dof), integer dof: the closed forms of the regularised upper
    incomplete gamma function at half-integer and integer order."""
    h = x / 2
    if dof % 2 == 0:
        return math.exp(-h) * sum(h ** i / math.factorial(i) for i in range(dof // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * sum(
        h ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, (dof + 1) // 2))


def chi2_test(table):
    """Pearson's chi-squared test of independence on a contingency table (rows x columns of
    counts), no continuity correction; columns with no counts are dropped. -> (chi2, dof, p)."""
    t = np.asarray(table, dtype=float)
    t = t[:, t.sum(0) > 0]
    expected = np.outer(t.sum(1), t.sum(0)) / t.sum()
    chi2 = float(((t - expected) ** 2 / expected).sum())
    dof = (t.shape[0] - 1) * (t.shape[1] - 1)
    return chi2, dof, chi2_sf(chi2, dof)


def bootstrap_shares(labels, classes=CLASSES, n=10000, seed=42):
    """Each class's share of labels with a 95% percentile bootstrap interval (n resamples, the
    paper's 10,000 and seed 42; all classes from the same resamples, drawn at once)."""
    y = np.asarray(labels)
    idx = np.random.default_rng(seed).integers(0, len(y), (n, len(y)))
    out = {}
    for c in classes:
        boot = np.sort((y[idx] == c).mean(1))
        out[c] = dict(share=float((y == c).mean()), ci95=[float(v) for v in percentile_ci(boot)])
    return out


def rubric_summary(rows):
    """n, counts, shares with intervals, mean and median of the rubric classes in rows."""
    y = [r["rubric"] for r in rows]
    if not y:
        return dict(n=0)
    return dict(n=len(y), counts=[y.count(c) for c in CLASSES], shares=bootstrap_shares(y),
                mean=float(np.mean(y)), median=float(np.median(y)))


def lora_vs_mlp(lora_rows, mlp_rows, which="paper"):
    """F2's analysis: rubric shares with bootstrap intervals per population, by 8-layer bin, by
    adapter type and polarity (MLP neurons: by their index within the layer), and the
    chi-squared test of population x class."""
    lora, mlp = populations(lora_rows, mlp_rows, which)
    out = dict(populations=which, lora=rubric_summary(lora), mlp=rubric_summary(mlp))
    if lora and mlp:
        out["chi2"], out["dof"], out["p"] = chi2_test([out["lora"]["counts"],
                                                       out["mlp"]["counts"]])
    groups = {}
    for pop, rows in (("lora", lora), ("mlp", mlp)):
        for r in rows:
            if parse_name(r["name"]) is None:  # an SAE latent (--populations all)
                groups.setdefault(pop, {}).setdefault("SAE latents", []).append(r)
                continue
            layer, kind, pol = parse_name(r["name"])
            keys = [f"layers {8 * (layer // 8)}-{8 * (layer // 8) + 7}", f"polarity {pol}"]
            keys += ([f"type {kind}", f"type {kind} {pol}"] if pop == "lora" else
                     [f"neuron index {kind}"])  # 2.6_analyze_mlp_interpretability.py's breakdown
            for k in keys:
                groups.setdefault(pop, {}).setdefault(k, []).append(r)
    out["by_group"] = {pop: {k: rubric_summary(v) for k, v in sorted(g.items())}
                       for pop, g in groups.items()}
    det = lambda rows: [r["detection_balanced_accuracy"] for r in rows
                        if r.get("detection_balanced_accuracy") is not None]
    out["detection"] = {p: (dict(n=len(det(r)), mean=float(np.mean(det(r)))) if det(r) else None)
                        for p, r in (("lora", lora), ("mlp", mlp))}
    return out


def category_shares(mass, categories):
    """F4's activation-mass shares: mass {latent id: activation summed over the corpus};
    categories [{id, category, subcategory}]. A row whose categorisation failed keeps its mass in
    an "uncategorized" slice, as the official donut does, so the shares are of all the mass.
    -> (category shares summing to 1, largest first and uncategorized last,
        {category: subcategory shares within it})."""
    cat_mass, sub_mass = {}, {}
    for r in categories:
        cat, sub = ((r["category"], r["subcategory"]) if r.get("category") is not None
                    else (UNCATEGORIZED, UNCATEGORIZED))
        m = mass[r["id"]]
        cat_mass[cat] = cat_mass.get(cat, 0.0) + m
        sub_mass.setdefault(cat, {})
        sub_mass[cat][sub] = sub_mass[cat].get(sub, 0.0) + m
    total = sum(cat_mass.values())
    if total <= 0:
        return {}, {}
    order = sorted(cat_mass, key=lambda c: (c == UNCATEGORIZED, -cat_mass[c]))
    shares = {c: cat_mass[c] / total for c in order}
    subs = {c: {s: v / cat_mass[c] for s, v in sorted(sub_mass[c].items(), key=lambda kv: -kv[1])}
            for c in order if cat_mass[c] > 0}
    return shares, subs


# -----------------------------------------------------------------------------
# ablations and geometry


def type_means(single):
    """The official per-type statistics (1.1_visualize_ablation_results.py): from the types x
    layers matrix of single-adapter ablations, each type's mean over its layers, the most
    important type, and the MLP rows' mean over the attention rows' mean."""
    by = {}
    for r in single:
        by.setdefault(r["target"], []).append(r["kl"])
    out = dict(types={t: float(np.mean(v)) for t, v in by.items()})
    if out["types"]:
        out["most_important_type"] = max(out["types"], key=out["types"].get)
    mlp = [v for t, vs in by.items() if t in MLP for v in vs]
    attn = [v for t, vs in by.items() if t in ATTN for v in vs]
    if mlp and attn and np.mean(attn) > 0:
        out["mlp_over_attn"] = float(np.mean(mlp) / np.mean(attn))
    return out


def ablation_summary(ab):
    """Per-layer and per-type KL, the MLP / attention ratio, and the greedy ablation's curve with
    the number of MLP adapters that carry 90% of the effect of switching all of them off."""
    key = "kl_full_abl_assistant_mean"
    res = ab["results"]
    out = dict(adapter=(ab.get("identity") or {}).get("adapter"),
               model=(ab.get("identity") or {}).get("model"), sequences=len(ab["sequences"]),
               tokens=ab["tokens"], greedy_metric=(ab.get("made_from") or {}).get("greedy_metric"),
               greedy_order=(ab.get("made_from") or {}).get("greedy_order", "fixed"))
    out["layers"] = [dict(label=r["label"], mean=r[key], std=r["kl_full_abl_assistant_std"],
                          all_positions=r.get("kl_full_abl_all_mean"))
                     for r in res.get("layer", [])]
    layers = sorted({l for l, _ in ab.get("sites", [])})  # the layer rows' order (eval.py)
    if out["layers"] and len(layers) == len(out["layers"]):
        i = max(range(len(layers)), key=lambda i: out["layers"][i]["mean"])
        out["peak_layer"] = out["layers"][i]["label"]
        out["peak_depth"] = layers[i] / max(1, layers[-1])
    by_layer = {r["label"]: r[key] for r in res.get("layer", [])}
    out["blocks"] = []  # each block of layers off at once against the mean of its layers alone
    for r in res.get("block", []):
        a, b = map(int, r["label"][1:].split("-"))  # "L8-15": layers 8..15 (ablate.py)
        alone = [by_layer[f"L{l}"] for l in layers if a <= l <= b and f"L{l}" in by_layer]
        if alone:
            mean = sum(alone) / len(alone)
            out["blocks"].append(dict(label=r["label"], kl=r[key], mean_of_layers=mean,
                                      ratio=r[key] / mean if mean else None))
    if "ce_assistant_mean" in (res.get("none") or [{}])[0]:
        out["ce"] = {e: [dict(label=r["label"], mean=r["ce_assistant_mean"],
                              max=r["ce_assistant_maxpos_max"]) for r in res[e]]
                     for e in ("none", "layer", "block", "type", "mlp_vs_attn") if res.get(e)}
    out["single"] = [dict(layer=l, target=t, kl=r[key])
                     for (l, t), r in zip(ab.get("sites", []), res.get("single", []))]
    out.update(type_means(out["single"]))
    # the joint ablations (one type off in every layer at once; all MLP vs all attention
    # adapters off): our extra rows, labelled as such
    out["types_joint"] = {r["label"]: r[key] for r in res.get("type", [])}
    both = {r["label"]: r[key] for r in res.get("mlp_vs_attn", [])}
    if both.get("attn"):
        out["mlp_over_attn_joint"] = both["mlp"] / both["attn"]
    if out["types_joint"]:
        out["most_important_type_joint"] = max(out["types_joint"], key=out["types_joint"].get)
    greedy = res.get("greedy") or []
    if greedy:
        out["greedy"] = [dict(n_ablated=r["n_ablated"], added=r["added"], kl=r[key])
                         for r in greedy]
        all_off = greedy[-1][key]
        ok = [r["n_ablated"] for r in greedy if r[key] <= 0.1 * all_off]
        out["greedy_carriers_90"] = len(greedy) - max(ok, default=0)
    return out


def adapter_vectors(adapter_dir):
    """{(layer, target): (a, b)} float64 vectors of a rank-1 adapter, and its scale s."""
    _, kw = read_adapter_config(adapter_dir)
    if kw["rank"] != 1:
        raise ValueError(f"{adapter_dir}: rank {kw['rank']}; the geometry figures are for rank 1")
    vec = {}
    for k, v in adapter_tensors(adapter_dir).items():
        m = PEFT_NAME.match(k)
        if m:
            vec.setdefault((int(m[1]), m[2]), {})[m[3]] = v.double().flatten().numpy()
    scale = lora_scaling(kw["alpha"], kw["rank"], kw["rslora"])
    return {s: (d["A"], d["B"]) for s, d in vec.items()}, scale


def interference(vec, seed=0):
    """F7: |cos| between the reading directions a of gate_proj and up_proj at layer i and the
    writing direction b of down_proj at each layer j <= i (the official causal mask keeps
    writing_layer <= reading_layer: same-layer pairs count), against as many pairs of random
    Gaussian vectors of the same width. -> {mean_abs_cos, random_mean_abs_cos, pairs, by_layers}"""
    layers = sorted({l for l, _ in vec})
    by, cos = {}, []
    for i in layers:
        for j in (j for j in layers if j <= i and (j, "down_proj") in vec):
            b = vec[(j, "down_proj")][1]
            for t in ("gate_proj", "up_proj"):
                if (i, t) in vec:
                    a = vec[(i, t)][0]
                    c = abs(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
                    cos.append(c)
                    by.setdefault((i, j), []).append(c)
    if not cos:
        return None
    d = len(b)  # the residual stream's width
    r = np.random.default_rng(seed).standard_normal((2, len(cos), d))
    rc = np.abs((r[0] * r[1]).sum(1) / np.linalg.norm(r[0], axis=1) / np.linalg.norm(r[1], axis=1))
    return dict(pairs=len(cos), mean_abs_cos=float(np.mean(cos)), max_abs_cos=float(max(cos)),
                random_mean_abs_cos=float(rc.mean()), random_max_abs_cos=float(rc.max()),
                by_layers=[dict(i=i, j=j, mean_abs_cos=float(np.mean(v)))
                           for (i, j), v in by.items()])


def geometry(adapter_dir):
    vec, scale = adapter_vectors(adapter_dir)
    norms = [dict(layer=l, target=t, a=float(np.linalg.norm(a)), b=float(np.linalg.norm(b)),
                  s_ab=float(scale * np.linalg.norm(a) * np.linalg.norm(b)))
             for (l, t), (a, b) in sorted(vec.items())]
    return dict(scale=scale, norms=norms, interference=interference(vec))


# -----------------------------------------------------------------------------
# the page


def pct(s):
    return f"{100 * s['share']:.1f}% [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"


def section_recovery(r):
    pc = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    rows = [[b, t["problems"], pc(t["base"]), pc(t["full"]), pc(t["lora"]),
             f"{pc(t['recovery'])} [{pc(t['recovery_ci95'][0])}, {pc(t['recovery_ci95'][1])}]"]
            for b, t in r["table"].items()]
    prot = r.get("protocols") or {}
    return ("<h2>Recovery of the full finetune's gain</h2>"
            f"<p class=in>Runs: base {escape(str(r['base']))} ({escape(str(prot.get('base')))}), "
            f"full {escape(str(r['full']))} ({escape(str(prot.get('full')))}), rank-1 "
            f"{escape(str(r['lora']))} ({escape(str(prot.get('lora')))}); recovery = (rank-1 - "
            "base) / (full - base), paired bootstrap 95% interval.</p>"
            f"<p class=paper>Paper: {escape(PAPER['recovery'])}.</p>"
            + ("" if prot.get("base") == "plain" else "<p class=missing>The base was not run with "
               "--protocol plain, as s1 evaluated its base: the recovery is not the paper's.</p>")
            + table(["benchmark", "problems", "base", "full", "rank-1", "recovery"], rows))


def section_ablation(a):
    h = ["<h2>Adapter ablations (Fig. 1)</h2>",
         f"<p class=in>Inputs: ablations of {escape(str((a['adapter'] or {}).get('path')))}, "
         f"{a['sequences']} sequences, {a['tokens']} tokens; KL(full adapter || ablated), mean "
         "over assistant tokens.</p>", f"<p class=paper>Paper: {escape(PAPER['ablation'])}.</p>"]
    if a["layers"]:
        h.append("<h3>Leave one layer out (mean and std over sequences)</h3>"
                 + bar_chart([(r["label"], r["mean"], r["std"]) for r in a["layers"]]))
    if "peak_layer" in a:
        h.append(f"<p>Peak: {escape(a['peak_layer'])}, at depth {a['peak_depth']:.2f} of the "
                 "adapted layers (paper: 0.68-0.75 and 0.98).</p>")
    if any(r.get("all_positions") is not None for r in a["layers"]):  # the official positions
        h.append("<h3>Leave one layer out: assistant positions (ours) beside all positions (the "
                 "official script's)</h3>" + table(
                     ["layer", "KL, assistant positions", "KL, all positions"],
                     [[r["label"], f"{r['mean']:.4g}", f"{r['all_positions']:.4g}"]
                      for r in a["layers"] if r.get("all_positions") is not None]))
    if a["single"]:
        h.append(site_heatmap({(r["layer"], r["target"]): r["kl"] for r in a["single"]},
                              "Single adapters", SITE_ORDER))
    for suffix, how in (("", "mean over layers of the single-adapter ablations (the paper's "
                              "statistic)"),
                        ("_joint", "joint ablations: one type off in every layer at once (ours)")):
        types = a.get("types" + suffix)
        if types:
            ratio = a.get("mlp_over_attn" + suffix)
            h.append(f"<h3>By type: {escape(how)}</h3>"
                     + table(["type"] + list(types), [["KL"] + [f"{v:.4g}" for v in
                                                               types.values()]])
                     + f"<p>Most important type: {escape(a['most_important_type' + suffix])}; "
                     f"MLP / attention KL ratio: {'n/a' if ratio is None else f'{ratio:.3g}'}"
                     ".</p>")
    if a.get("greedy"):
        n = len(a["greedy"])
        how = ("every remaining adapter re-scored at each step" if a["greedy_order"] == "rescore"
               else "one order from the single scores (--greedy fixed)")
        h.append(f"<h3>Greedy MLP ablation (F5), least important first: {escape(how)}</h3>"
                 + line_chart([(0, 0.0)] + [(r["n_ablated"], r["kl"]) for r in a["greedy"]],
                              "MLP adapters switched off", "KL(full || ablated)",
                              ref=0.1 * a["greedy"][-1]["kl"])
                 + f"<p>Scored by {escape(str(a['greedy_metric']))}. {a['greedy_carriers_90']} "
                 f"of {n} MLP adapters carry 90% of the KL of switching all {n} off (the dashed "
                 "line: 10% of it).</p>")
    if a.get("blocks"):
        h.append("<h3>Blocks of layers off at once against the mean of their layers alone</h3>"
                 + table(["block", "KL (block off)", "mean KL of its layers", "ratio"],
                         [[r["label"], f"{r['kl']:.4g}", f"{r['mean_of_layers']:.4g}",
                           "n/a" if r["ratio"] is None else f"{r['ratio']:.3g}"]
                          for r in a["blocks"]]))
    if a.get("ce"):
        h.append("<h3>Cross-entropy of the ablated model on the sequences' own tokens (assistant "
                 "positions: the mean over sequences, and the worst position of any)</h3>"
                 + table(["experiment", "ablated", "CE", "worst position"],
                         [[e, r["label"], f"{r['mean']:.4g}", f"{r['max']:.4g}"]
                          for e, rows in a["ce"].items() for r in rows]))
    return "".join(h)


def section_geometry(g):
    h = ["<h2>Adapter geometry</h2>", f"<p class=in>Scale s = {g['scale']:.4g}.</p>"]
    for key, what in (("a", "‖a‖ (reading direction)"), ("b", "‖b‖ (writing direction)"),
                      ("s_ab", "s·‖a‖·‖b‖ (the update's size per unit u)")):
        h.append(site_heatmap({(r["layer"], r["target"]): r[key] for r in g["norms"]}, what,
                              SITE_ORDER))
    i = g["interference"]
    if i:
        cells = {(r["i"], r["j"]): r["mean_abs_cos"] for r in i["by_layers"]}
        layers = sorted({c[0] for c in cells} | {c[1] for c in cells})
        h.append("<h3>Weight interference (F7): |cos(a of gate/up at layer i, b of down at layer "
                 "j ≤ i)|</h3>" + heatmap(cells, layers, layers,
                                             lambda r, c, v: f"i {r}, j {c}: {v:.3g}")
                 + f"<p>Mean |cos| {i['mean_abs_cos']:.4f} (max {i['max_abs_cos']:.3f}) over "
                 f"{i['pairs']} pairs; random vectors of the same width: "
                 f"{i['random_mean_abs_cos']:.4f} (max {i['random_max_abs_cos']:.3f}).</p>")
    return "".join(h)


def section_state(s):
    cum = [(i + 1, c) for i, c in enumerate(s["cumulative"])]
    which = ("the MLP adapters', as the official analysis" if s.get("scalars") == "mlp"
             else "every adapter's; the official analysis reads the MLP adapters' only")
    return ("<h2>The activation state's shape (SVD of the centred scalars)</h2>"
            + line_chart(cum, "principal directions", "share of the variance", ref=0.9)
            + f"<p>{s['dims']} scalars ({which}) over {s['tokens']:,} tokens: "
            + ", ".join(f"{float(k):.0%} of the variance in {v} directions"
                        for k, v in s["components_for"].items())
            + f"; effective rank {s['effective_rank']:.1f} (exp entropy), participation ratio "
            f"{s['participation_ratio']:.1f}.</p>")


def section_coactivation(c):
    rows = [(i + 1, len(g), " ".join(f"sae{j}" for j in g[:30]) + (" ..." if len(g) > 30 else ""))
            for i, g in enumerate(c["clusters"][:20])]
    pairs = [(f"sae{i}", f"sae{j}", f"{v:.3f}") for i, j, v in c["top_pairs"]]
    return ("<h2>Co-activation of the SAE latents</h2>"
            f"<p>{c['firing']} of {c['latents']} latents fire on {c['tokens']:,} tokens, "
            f"{c['frequent']} on at least {c['min_firing']}; among those, {len(c['clusters'])} "
            f"clusters of latents linked by a Jaccard index of at least {c['threshold']} "
            "(connected components).</p>"
            + table(["cluster", "latents", "members"], rows)
            + "<h3>The pairs that fire together most</h3>"
            + table(["latent", "latent", "Jaccard"], pairs))


def section_lora_vs_mlp(c, official=False):
    p = PAPER["rubric"]
    paper_share = lambda pop, k: f"{100 * p[pop]['counts'][k] / p[pop]['n']:.1f}%"
    rows = []
    for pop in ("lora", "mlp"):
        s = c[pop]
        if s["n"]:
            rows.append([pop, s["n"]] + [pct(s["shares"][k]) for k in CLASSES]
                        + [f"{s['mean']:.2f}", s["median"]])
        rows.append([f"{pop} (paper)", p[pop]["n"]] + [paper_share(pop, k) for k in CLASSES]
                    + [p[pop]["mean"], p[pop]["median"]])
    how = ("the official single call: explanation and class from one reply, the official "
           "prompt's content" if official else "ours: the explanation, then the rubric in a "
           "second call")
    h = [f"<h2>LoRA features vs MLP neurons (F2){', the official way' if official else ''}</h2>",
         f"<p class=in>Populations: {escape(c['populations'])}; 0/1/2 rubric ({how}), shares "
         "with 95% bootstrap intervals (10,000 resamples).</p>",
         table(["population", "n", "0 monosemantic", "1 broad", "2 polysemantic", "mean",
                "median"], rows)]
    if "chi2" in c:
        h.append(f"<p>χ² = {c['chi2']:.2f} (dof {c['dof']}), p = {c['p']:.2g}; paper's counts: "
                 f"χ² ≈ {p['chi2']}, p ≈ {p['p']:.0e}.</p>")
    det = c["detection"]
    if det["lora"] and det["mlp"]:
        h.append(f"<p>Detection balanced accuracy (ours, no paper value): LoRA "
                 f"{det['lora']['mean']:.3f} (n {det['lora']['n']}), MLP {det['mlp']['mean']:.3f}"
                 f" (n {det['mlp']['n']}).</p>")
    for pop, g in c["by_group"].items():
        h.append(f"<h3>{escape(pop)} by group</h3>" + table(
            ["group", "n", "0", "1", "2"],
            [[k, s["n"]] + [pct(s["shares"][j]) for j in CLASSES] for k, s in g.items()]))
    return "".join(h)


def section_categories(cat):
    h = ["<h2>SAE features by category (F4), share of activation mass</h2>",
         f"<p class=in>{cat['categorised']} latents categorised ({cat['errors']} failed), mass "
         "summed over the corpus.</p>", f"<p class=paper>Paper: {escape(PAPER['sae'])}.</p>"]
    if cat["shares"]:
        h.append(donut_chart(cat["shares"], cat["sub_shares"]))
    return "".join(h)


def section_steering(runs):
    h = ["<h2>Steering (F6), measured</h2>", "<p class=paper>Paper: qualitative only (text per "
         "layer or feature, no metric).</p>"]
    for r in runs:
        what = (f"residual stream after layer attention, along a of {r['residual']}"
                if r.get("residual") else f"adapter scalar {r['site']}" if r.get("site")
                else f"SAE feature {r['feature']}")
        words = sorted({w for x in r["results"] for w in x["word_counts"]})
        h.append(f"<h3>{escape(what)}</h3>" + table(
            ["strength", "seed", "n", "thinking tokens", *words, "accuracy"],
            [[x["strength"], x["seed"], x["n"], f"{x['mean_thinking_tokens']:.1f}",
              *[f"{x['word_counts'][w]:.2f}" for w in words],
              "n/a" if x["accuracy"] is None else f"{x['accuracy']:.3f}"]
             for x in r["results"]]))
    return "".join(h)


def missing(what):
    return (f"<p class=missing>Not computed: no --{what.replace('_', '-')}. It comes from: "
            f"<code>{escape(COMMANDS[what])}</code></p>")


def report_html(rep):
    parts = ["<!doctype html><meta charset=utf-8><title>rank1 report</title><style>"
             "body{font:14px sans-serif;margin:24px;max-width:1100px}svg{background:#fafafa}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
             "padding:2px 6px}.in{color:#555}.paper{color:#7a4b00}.missing{color:#a00}</style>",
             "<h1>rank1: the paper's analyses from this run</h1>",
             table(["input", "made from"], provenance_lines(rep["made_from"]))]
    names = (("recovery", section_recovery, "recovery"),
             ("ablation", section_ablation, "ablations"),
             ("geometry", section_geometry, "adapter"),
             ("state", section_state, "acts"),
             ("coactivation", section_coactivation, "sae"),
             ("lora_vs_mlp", section_lora_vs_mlp, "autointerp"),
             ("categories", section_categories, "autointerp"),
             ("steering", section_steering, "steer"))
    for key, draw, flag in names:
        if rep.get(key) is not None:
            parts.append(draw(rep[key]))
        else:
            parts.append(f"<h2>{escape(key)}</h2>" + missing(rep["missing"].get(key, flag)))
        if key == "lora_vs_mlp" and rep.get("lora_vs_mlp_official") is not None:  # side by side
            parts.append(section_lora_vs_mlp(rep["lora_vs_mlp_official"], official=True))
    return "\n".join(parts)


def rubric_rows(path, mode):
    """autointerp.jsonl's rows, checked to come from `mode` (rows of earlier versions: ours)."""
    rows = read_rows(path)[0]
    other = [r for r in rows if r.get("rubric_mode", "ours") != mode]
    if other:
        raise ValueError(f"{path}: rubric mode {other[0].get('rubric_mode', 'ours')!r}, expected "
                         f"{mode!r} (interpret.py autointerp --rubric-mode {mode})")
    return rows


def check_same_adapter(args, rep, feats):
    """Every input must describe one adapter on one base: the ablations', the features'
    (feats: features.json) store's, --acts' store's, --adapter's; categories.jsonl must come from
    --features (its autointerp.json says which file)."""
    store = ((feats.get("made_from") or {}).get("store") or {}).get("made_from") or {}
    acts = (rep["made_from"].get("acts") or {}).get("made_from") or {}
    found = [(w, a) for w, a in (("--ablations", (rep.get("ablation") or {}).get("adapter")),
                                 ("--features", store.get("adapter")),
                                 ("--acts", acts.get("adapter")),
                                 ("--adapter", rep["made_from"].get("adapter"))) if a]
    for (w1, a1), (w2, a2) in zip(found, found[1:]):
        diff = differences(a1, a2)
        if diff:
            raise ValueError(f"{w1} and {w2} describe different adapters ({diff[0]})")
    bases = [(w, m) for w, m in (("--ablations", (rep.get("ablation") or {}).get("model")),
                                 ("--features", store.get("model")),
                                 ("--acts", acts.get("model"))) if m]
    for (w1, m1), (w2, m2) in zip(bases, bases[1:]):
        diff = differences(m1, m2)
        if diff:
            raise ValueError(f"{w1} and {w2} were made on different base models ({diff[0]}); "
                             "a report describes one run")
    meta = os.path.join(os.path.dirname(os.path.abspath(args.categories or "")), "autointerp.json")
    if args.categories and args.features and os.path.isfile(meta):
        diff = differences(read_json(meta).get("features") or {}, file_identity(args.features))
        if diff:
            raise ValueError(f"{args.categories}: made from other features than --features "
                             f"{args.features} ({diff[0]})")


def coactivation_summary(store, sae, device="cpu", threshold=0.5, top=20):
    counts, both = cofiring(store, sae, device)
    J = frequent_only(jaccard(counts, both), counts)
    off = np.triu(J, k=1)
    order = np.argsort(off, axis=None)[::-1][:top]
    pairs = [(int(i), int(j), float(off[i, j])) for i, j in zip(*np.unravel_index(order, J.shape))
             if off[i, j] > 0]
    return dict(tokens=store.index["shape"][0], latents=len(counts),
                firing=int((counts > 0).sum()), frequent=int((counts >= MIN_FIRING).sum()),
                min_firing=MIN_FIRING, threshold=threshold,
                clusters=clusters(J, threshold), top_pairs=pairs)


def build(args):
    """report.json and report.html from whichever inputs are given: each section, or what it
    misses."""
    check_out(args.out, {"--recovery": args.recovery, "--ablations": args.ablations,
                         "--adapter": args.adapter, "--acts": args.acts, "--sae": args.sae,
                         "--features": args.features, "--autointerp": args.autointerp,
                         "--mlp-autointerp": args.mlp_autointerp,
                         "--official-autointerp": args.official_autointerp,
                         "--official-mlp-autointerp": args.official_mlp_autointerp,
                         "--categories": args.categories,
                         **{f"--steer {f}": f for f in args.steer or []}})
    outs = [os.path.join(args.out, f) for f in ("report.html", "report.json")]
    fresh_outputs(outs, args.overwrite)
    files = ("recovery", "ablations", "features", "autointerp", "mlp_autointerp", "categories",
             "official_autointerp", "official_mlp_autointerp")
    made_from = {k: file_identity(getattr(args, k)) for k in files if getattr(args, k)}
    made_from.update({f"steer {i + 1}": file_identity(f) for i, f in enumerate(args.steer or [])})
    made_from["populations"] = args.populations
    rep = dict(made_from=made_from, paper=PAPER, missing={})
    if args.recovery:
        rep["recovery"] = read_json(args.recovery, ("table", "protocols"),
                                    "a recovery table (`eval.py compare --out`)")
    if args.ablations:
        rep["ablation"] = ablation_summary(read_json(args.ablations, ("results", "sites"),
                                                     "ablations.json (`ablate.py`)"))
    if args.adapter:
        made_from["adapter"] = adapter_identity(args.adapter)
        rep["geometry"] = geometry(args.adapter)
    store_sections(args, rep)
    feats = read_json(args.features, ("features",), "features.json (`interpret.py mine`)") \
        if args.features else {}
    check_same_adapter(args, rep, feats)
    rubric_sections(args, rep)
    category_section(args, rep, feats)
    if args.steer:
        rep["steering"] = [dict(read_json(f, ("results", "feature"),
                                          "a steering result (`interpret.py steer --out`)"),
                                path=os.path.abspath(f)) for f in args.steer]
    os.makedirs(args.out, exist_ok=True)
    write_json(outs[1], rep)
    write_atomic(outs[0], report_html(rep))
    done = [k for k in ("recovery", "ablation", "geometry", "state", "coactivation", "lora_vs_mlp",
                        "categories", "steering") if rep.get(k)]
    print(f"report: {', '.join(done) or 'no section'} -> {outs[0]}")
    return rep


def store_sections(args, rep):
    """The activation state's spectrum (--acts) and the SAE latents' co-activation (--sae)."""
    made_from = rep["made_from"]
    if args.acts:
        store = ActivationStore(args.acts)
        made_from["acts"] = store.identity()
        rep["state"] = state_spectrum(store, args.state_scalars, args.state_tokens)
        if args.sae:
            sae = SAE.load(args.sae)
            check_sae(sae, args.sae, store)
            made_from["sae"] = file_identity(os.path.join(args.sae, "cfg.json"))
            rep["coactivation"] = coactivation_summary(store, sae, pick_device(args.device))
    elif args.sae:
        raise ValueError("--sae needs --acts (the store the SAE was trained on)")
    if "coactivation" not in rep:
        rep["missing"]["coactivation"] = "sae" if args.acts else "acts"


def rubric_sections(args, rep):
    """LoRA features vs MLP neurons on the 0/1/2 rubric: ours, and the official single call's
    where both of its files are given."""
    for key, lora, mlp, mode in (("lora_vs_mlp", "autointerp", "mlp_autointerp", "ours"),
                                 ("lora_vs_mlp_official", "official_autointerp",
                                  "official_mlp_autointerp", "official")):
        if getattr(args, lora) and getattr(args, mlp):
            rows = [rubric_rows(getattr(args, f), mode) for f in (lora, mlp)]
            rep[key] = lora_vs_mlp(*rows, args.populations)
        elif mode == "ours":
            rep["missing"][key] = "autointerp" if not args.autointerp else "mlp_autointerp"
        elif getattr(args, lora) or getattr(args, mlp):
            raise ValueError("--official-autointerp and --official-mlp-autointerp go together")


def category_section(args, rep, feats):
    """The SAE features' categories weighted by activation mass (F4's donut)."""
    if args.categories and args.features:
        mass = {f["id"]: f["mass"] for f in feats["features"] if "mass" in f}
        if not mass:
            raise ValueError(f"{args.features}: no activation masses (written by an older "
                             "version); rerun interpret.py mine")
        rows = read_rows(args.categories)[0]
        unknown = [r["id"] for r in rows if r.get("category") and r["id"] not in mass]
        if unknown:
            raise ValueError(f"{args.categories}: feature {unknown[0]} has no mass in "
                             f"{args.features} (categories of other features?)")
        shares, subs = category_shares(mass, rows)
        rep["categories"] = dict(shares=shares, sub_shares=subs,
                                 categorised=sum(1 for r in rows if r.get("category")),
                                 errors=sum(1 for r in rows if not r.get("category")))
    else:
        rep["missing"]["categories"] = "features" if not args.features else "autointerp"


def parser():
    p = Parser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--recovery", help="the JSON of `eval.py compare --out`")
    p.add_argument("--ablations", help="ablations.json from `ablate.py`")
    p.add_argument("--adapter", help="the adapter directory (geometry)")
    p.add_argument("--acts", help="the activation store from `collect.py` (the state's shape)")
    p.add_argument("--state-scalars", choices=("mlp", "all"), default="mlp",
                   help="the state's shape from the MLP adapters' scalars (the official "
                   "analysis's 192) or from all of them")
    p.add_argument("--state-tokens", type=number(int, "nonnegative"), default=100_000,
                   help="the state's shape over the store's first N tokens (the official 100,000; "
                   "0: all)")
    p.add_argument("--sae", help="the SAE trained on --acts (co-activation of its latents)")
    add_device_flag(p, "where --sae's co-activation counts run (at 32B: 1.3e14 multiply-adds "
                    "for 10M tokens x 3,584 latents)")
    p.add_argument("--features", help="features.json from `interpret.py mine --sae` (masses)")
    p.add_argument("--autointerp", help="autointerp.jsonl of the LoRA features, with --rubric")
    p.add_argument("--mlp-autointerp", help="autointerp.jsonl of the MLP neurons, with --rubric")
    p.add_argument("--official-autointerp", help="autointerp.jsonl of the LoRA features made with "
                   "--rubric-mode official: shown beside ours")
    p.add_argument("--official-mlp-autointerp", help="the same for the MLP neurons")
    p.add_argument("--categories", help="categories.jsonl from `interpret.py autointerp "
                   "--categorise`")
    p.add_argument("--steer", action="append", help="a JSON file of `interpret.py steer` "
                   "(repeatable)")
    p.add_argument("--populations", default="paper", choices=["paper", "all"],
                   help="paper: MLP-adapter features vs each neuron in its dominant polarity; "
                   "all: every row of both autointerp files")
    p.add_argument("--out", required=True, help="directory for report.html and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace report.* in --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("report.py"):
        return build(args)


if __name__ == "__main__":
    main()
