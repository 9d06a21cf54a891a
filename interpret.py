"""
What each adapter scalar and each SAE feature fires on: exact max-activating examples over a
collected activation store (sae.py collect), with random non-zero samples and per-feature statistics.

    python interpret.py mine --acts acts/ --tokenizer /models/Qwen2.5-32B-Instruct --out interp/ [--sae sae/]

    python interpret.py dashboard --features interp/features.json --out interp/dashboard.html \
        [--ablations results/ablate/ablations.json] [--sae sae/] [--model M --adapter A]
    python interpret.py steer --model M --adapter A --sae sae/ --feature 638 --strengths 0,10,30 \
        --bench math500=math500.jsonl --limit 20 --out interp/steer.json

    python interpret.py autointerp --features interp/features.json --out interp/ --llm-url https://host/v1

    # the MLP-neuron baseline: collect with `sae.py collect --mlp-neurons 6`, mine with
    # --population mlp, autointerp both, then
    python interpret.py compare --lora interp/autointerp.jsonl --mlp interp_mlp/autointerp.jsonl --out interp/compare.json

Features: every adapter scalar in both polarities (`L{layer}.{target}+` is u, `...-` is -u), and,
with --sae, every SAE latent (`sae{j}`); or (--population mlp) the sampled SwiGLU neurons of the
baseline, both polarities (`N{layer}.{index}+/-`). An example is a token where the feature is > 0.

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

from model import write_atomic
from sae import SAE, ActivationStore

# -----------------------------------------------------------------------------
# features


def feature_names(sites, sae=None, population="lora"):
    if population == "mlp":  # sites are (layer, neuron) pairs of the MLP-neuron baseline
        return [f"N{l}.{i}+" for l, i in sites] + [f"N{l}.{i}-" for l, i in sites]
    names = [f"L{l}.{t}+" for l, t in sites] + [f"L{l}.{t}-" for l, t in sites]
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
    if dedup == 0:  # no neighbours to hide: the greedy picks are the sorted values (stable: earliest first)
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


def mine(store, sae=None, k=32, dedup=0, per_doc=None, n_random=16, seed=0, population="lora", device="cpu"):
    """Top-k examples and a uniform random sample of non-zero activations for every feature.

    Returns (top_v, top_i, rnd_v, rnd_i, fired, neg_i): (k or n_random, F) values and global token
    indices (-inf / -1 where a feature has fewer), per-feature counts of tokens > 0, and the indices
    of a uniform sample of tokens where each feature is not active."""
    per_doc = per_doc or k
    F = len(feature_names(population_sites(store, population), sae, population))
    top_v, top_i = torch.full((0, F), -torch.inf), torch.zeros((0, F), dtype=torch.long)
    empty = (torch.zeros((0, F)), torch.zeros((0, F), dtype=torch.long), torch.zeros((0, F)))
    rnd, neg = empty, empty
    fired = torch.zeros(F, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    base = 0
    from tqdm import tqdm
    for s in tqdm(range(len(store.index["shards"])), desc="mine", file=sys.stderr):
        vals = feature_values(raw_shard(store, s, population).to(device), sae)
        fired += (vals > 0).sum(0).cpu()
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
    return top_v, top_i, rnd[2], rnd[1], fired, neg[1]


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
            cols.append(feature_values(raw_shard(store, s, population, check=False), sae)[:, f0:f0 + block].numpy())
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
    return dict(value=float(value), doc=d["doc"], source=d["source"], pos=int(pos), doc_length=d["length"],
                target=int(pos - lo), tokens=[tok.id_to_token_str(i) for i in ids], acts=[round(v, 5) for v in vals])


def cmd_mine(args):
    from data import Tokenizer
    store = ActivationStore(args.acts)
    sae = SAE.load(args.sae) if args.sae else None
    tok = Tokenizer(args.tokenizer)
    pop = args.population
    if pop == "mlp" and sae is not None:
        raise SystemExit("interpret.py mine: --sae applies to the lora population only")
    names = feature_names(population_sites(store, pop), sae, pop)
    if sae is not None:
        sae = sae.to(args.device)
    top_v, top_i, rnd_v, rnd_i, fired, neg_i = mine(store, sae, args.k, args.dedup, args.per_doc, args.n_random, args.seed,
                                                    pop, args.device)
    sae = sae.cpu() if sae is not None else None
    qs = quantiles(store, sae, population=pop)
    n_tok = store.index["shape"][0]
    lookup = locate(store)
    feats = []
    for f, name in enumerate(names):
        ex = lambda vs, ids: [example(store, tok, lookup, int(i), v, f, sae, args.context, pop)
                              for v, i in zip(vs[:, f].tolist(), ids[:, f].tolist()) if i >= 0]
        feats.append(dict(id=f, name=name, freq=fired[f].item() / max(1, n_tok),
                          quantiles=dict(zip(("q50", "q90", "q99", "q999"), qs[f].tolist())),
                          top=ex(top_v, top_i), random=sorted(ex(rnd_v, rnd_i), key=lambda e: -e["value"]),
                          inactive=ex(torch.zeros_like(rnd_v), neg_i)))
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "features.json")
    write_atomic(out, json.dumps(dict(acts=os.path.abspath(args.acts), population=pop, sae=args.sae, k=args.k, dedup=args.dedup,
                                      per_doc=args.per_doc, context=args.context, tokens=n_tok, features=feats)))
    print(f"mine: {len(feats)} features over {n_tok:,} tokens -> {out}")


# -----------------------------------------------------------------------------
# steering


def sae_offsets(sae, feature, strength, sites):
    """strength * the feature's decoder direction, as offsets of the raw adapter scalars."""
    delta = strength * sae.W_dec[feature].detach() * sae.scale  # normalised -> raw space
    return {tuple(s): float(delta[i]) for i, s in enumerate(sites)}


def cmd_steer(args):
    """Generate under steering for each strength and seed and measure: thinking length, counts of
    chosen words, accuracy (with --bench)."""
    from contextlib import nullcontext

    import eval as ev
    from data import Tokenizer
    from lora import sites, steer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, identity = ev.load_model(args, device)
    tok = Tokenizer(args.tokenizer or args.model)
    if args.bench:
        name, _, path = args.bench.partition("=")
        items = [dict(it, bench=name) for it in ev.load_benchmark(name, path, args.zip_password)][:args.limit or None]
    else:
        items = [dict(id=str(i), question=q, gold=None, bench=None) for i, q in enumerate(args.prompt or [])]
    if not items:
        raise SystemExit("steer: give --bench NAME=PATH or --prompt TEXT")
    layout = sites(model)
    if args.sae:
        sae = SAE.load(args.sae)
        direction = lambda c: sae_offsets(sae, args.feature, c, layout)
    elif args.site:
        l, t = args.site.split(".")
        direction = lambda c: {(int(l[1:]) if l.startswith("L") else int(l), t): c}
    else:
        raise SystemExit("steer: give --sae DIR --feature F, or --site L12.gate_proj")
    words = [w for w in args.words.split(",") if w]
    results = []
    for c in [float(x) for x in args.strengths.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            g = torch.Generator(device=device).manual_seed(seed)
            outs = []
            with steer(model, direction(c)) if c != 0 else nullcontext():
                for i in range(0, len(items), args.batch_size):
                    batch = items[i:i + args.batch_size]
                    outs += ev.s1_generate(model, tok, [it["question"] for it in batch], args, generator=g)
            correct = [ev.grade(it["bench"], o["generation"], it["gold"]) for it, o in zip(items, outs) if it["bench"]]
            results.append(dict(
                strength=c, seed=seed, n=len(outs),
                mean_thinking_tokens=sum(o["thinking_tokens"] for o in outs) / len(outs),
                thinking_truncated=sum(o["thinking_truncated"] for o in outs),
                word_counts={w: sum(o["generation"].count(w) for o in outs) / len(outs) for w in words},
                accuracy=sum(correct) / len(correct) if correct else None,
                examples=[o["generation"][:2000] for o in outs[:2]]))
            r = results[-1]
            print(f"strength {c:g} seed {seed} | thinking {r['mean_thinking_tokens']:.1f} tokens | "
                  + " ".join(f"{w} {v:.2f}" for w, v in r["word_counts"].items())
                  + (f" | accuracy {r['accuracy']:.3f}" if r["accuracy"] is not None else ""))
    out = dict(identity=identity, sae=args.sae, feature=args.feature, site=args.site, results=results)
    write_atomic(args.out, json.dumps(out, indent=1))
    return out


# -----------------------------------------------------------------------------
# dashboard


def promoted_tokens(model, tok, n=8):
    """For adapters that write to the residual stream (down_proj, o_proj): the tokens whose logits
    s * u * b raises most (u > 0) and lowers most (through the final norm's weight and the head)."""
    from lora import adapters
    out = {}
    with torch.no_grad():
        W = model.lm_head.weight.float()
        g = model.model.norm.weight.float()
        for a in adapters(model):
            if a.target in ("down_proj", "o_proj"):
                logit = W @ (g * a.lora_B[:, 0].float())
                name = f"L{a.layer}.{a.target}"
                out[name + "+"] = [tok.id_to_token_str(i) for i in logit.topk(n).indices.tolist()]
                out[name + "-"] = [tok.id_to_token_str(i) for i in (-logit).topk(n).indices.tolist()]
    return out


def dashboard_html(data):
    """One self-contained page. The data sit in a JSON script element (with <, > and & escaped, so
    no dataset text can close it), and the page builds everything with textContent: dataset text is
    never parsed as HTML."""
    def safe(obj):
        return json.dumps(obj, ensure_ascii=False).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    # the page parses a small index at load; each feature's examples sit in their own element and
    # are parsed only when the feature is shown, so thousands of features stay responsive
    index = {**data, "features": [{k: f[k] for k in ("id", "name", "freq", "quantiles")} for f in data["features"]]}
    parts = [f'<script type="application/json" id="f{f["id"]}">{safe(f)}</script>' for f in data["features"]]
    return DASHBOARD.replace("__DATA__", safe(index)).replace("__FEATURES__", "\n".join(parts))


DASHBOARD = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>rank1 dashboard</title>
<style>
body{margin:0;font:13px system-ui,sans-serif;display:flex;height:100vh;color:#222}
#side{width:260px;border-right:1px solid #ccc;display:flex;flex-direction:column}
#q{margin:8px;padding:4px}#list{overflow:auto;flex:1}
.it{padding:2px 8px;cursor:pointer;white-space:nowrap}.it.sel{background:#dde8f7}
#main{flex:1;overflow:auto;padding:12px 18px}
.ex{font-family:ui-monospace,monospace;margin:3px 0;white-space:pre-wrap;line-height:1.7}
.tok{border-radius:2px}.tgt{outline:1px solid #000}.meta{color:#777;font-size:11px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px}
</style></head><body>
<div id="side"><input id="q" placeholder="search id or name  ( / )"><div id="list"></div></div>
<div id="main"><div id="overview"></div><div id="feature"></div></div>
<script type="application/json" id="data">__DATA__</script>
__FEATURES__
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const F = D.features;
let shown = [], cur = -1;
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const svgEl = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const k in attrs) e.setAttribute(k, attrs[k]); return e; };

function overview() {
  const o = document.getElementById("overview");
  o.appendChild(el("h1", "rank1 — " + F.length + " features over " + D.tokens + " tokens"));
  const ad = F.filter(f => f.name.startsWith("L") && f.name.endsWith("+"));
  if (ad.length) {
    const types = ["gate_proj","up_proj","down_proj","q_proj","k_proj","v_proj","o_proj"];
    const cell = {}; let layers = new Set(), vmax = 1e-12;
    for (const f of F) { if (!f.name.startsWith("L")) continue;
      const m = f.name.match(/^L(\d+)\.(\w+)[+-]$/); const l = +m[1], t = m[2];
      const v = Math.max(Math.abs(f.quantiles.q99), cell[l + "." + t] || 0);
      cell[l + "." + t] = v; layers.add(l); vmax = Math.max(vmax, v); }
    layers = [...layers].sort((a, b) => a - b);
    const tt = types.filter(t => layers.some(l => (l + "." + t) in cell));
    const cw = Math.max(4, Math.min(24, Math.floor(760 / layers.length))), ch = 16;
    const s = svgEl("svg", {width: 90 + cw * layers.length, height: 10 + ch * tt.length});
    tt.forEach((t, j) => { const lab = svgEl("text", {x: 0, y: ch * j + 12}); lab.textContent = t; s.appendChild(lab);
      layers.forEach((l, i) => { const v = cell[l + "." + t]; if (v === undefined) return;
        const r = svgEl("rect", {x: 90 + cw * i, y: ch * j, width: cw - 1, height: ch - 1,
          fill: "rgba(220,90,30," + (v / vmax).toFixed(3) + ")"});
        const ti = svgEl("title", {}); ti.textContent = "layer " + l + " " + t + ": q99 |u| " + v.toPrecision(3);
        r.appendChild(ti); s.appendChild(r); }); });
    o.appendChild(el("h2", "Adapter scalar magnitude (99th percentile of |u|), layer × type"));
    o.appendChild(s);
  }
  const sf = F.filter(f => f.name.startsWith("sae"));
  if (sf.length) {
    const bins = new Array(12).fill(0);
    for (const f of sf) bins[Math.min(11, Math.max(0, Math.floor(-Math.log10(Math.max(f.freq, 1e-12)))))]++;
    const s = svgEl("svg", {width: 500, height: 130}); const m = Math.max(...bins, 1);
    bins.forEach((b, i) => { const h = 100 * b / m; const r = svgEl("rect", {x: 10 + 40 * i, y: 105 - h, width: 36, height: h, fill: "#4a78b5"});
      const ti = svgEl("title", {}); ti.textContent = b + " features with frequency ~1e-" + i; r.appendChild(ti); s.appendChild(r);
      const lab = svgEl("text", {x: 14 + 40 * i, y: 122}); lab.textContent = i === 11 ? "never" : "1e-" + i; s.appendChild(lab); });
    o.appendChild(el("h2", "SAE feature frequency (fraction of tokens > 0)")); o.appendChild(s);
  }
  if (D.sae_metrics) {
    const t = el("table"); for (const k of ["fvu", "fvu_raw", "l0", "dead_fraction", "tokens"]) if (k in D.sae_metrics) {
      const v = D.sae_metrics[k]; const r = el("tr"); r.appendChild(el("th", k));
      r.appendChild(el("td", Number.isInteger(v) ? String(v) : Number(v).toPrecision(4))); t.appendChild(r); }
    o.appendChild(el("h2", "SAE (held out)")); o.appendChild(t);
  }
  if (D.ablation_layers) {
    const a = D.ablation_layers, m = Math.max(...a.map(r => r.mean), 1e-12), W = 760, bw = W / a.length;
    const s = svgEl("svg", {width: W + 10, height: 120});
    a.forEach((r, i) => { const h = 100 * r.mean / m; const b = svgEl("rect", {x: i * bw, y: 105 - h, width: Math.max(bw - 1, 1), height: h, fill: "#6a9f58"});
      const ti = svgEl("title", {}); ti.textContent = r.label + ": KL " + r.mean.toPrecision(3); b.appendChild(ti); s.appendChild(b); });
    o.appendChild(el("h2", "Leave-one-layer-out ablation: KL(full ‖ ablated)")); o.appendChild(s);
  }
}

function strip(ex, maxabs) {
  const d = el("div", undefined, "ex");
  const meta = el("span", "doc " + ex.doc + " · token " + ex.pos + "/" + ex.doc_length + " · " + ex.value.toPrecision(4) + "  ", "meta");
  d.appendChild(meta);
  ex.tokens.forEach((t, i) => { const v = ex.acts[i]; const s = el("span", t, "tok" + (i === ex.target ? " tgt" : ""));
    const a = Math.min(1, Math.abs(v) / maxabs);
    s.style.background = v >= 0 ? "rgba(230,120,20," + a.toFixed(3) + ")" : "rgba(40,110,220," + a.toFixed(3) + ")";
    s.title = v.toPrecision(4); d.appendChild(s); });
  return d;
}

const cache = {};
function feature(i) { if (!(i in cache)) cache[i] = JSON.parse(document.getElementById("f" + i).textContent); return cache[i]; }

function show(i) {
  if (i < 0 || i >= F.length) return;
  cur = i; const f = feature(i); const box = document.getElementById("feature"); box.replaceChildren();
  box.appendChild(el("h2", "#" + f.id + "  " + f.name));
  box.appendChild(el("div", "frequency " + f.freq.toPrecision(3) + " · q50 " + f.quantiles.q50.toPrecision(3) + " · q90 " +
    f.quantiles.q90.toPrecision(3) + " · q99 " + f.quantiles.q99.toPrecision(3) + " · q99.9 " + f.quantiles.q999.toPrecision(3), "meta"));
  if (f.promotes) box.appendChild(el("p", "promotes through the unembedding: " + f.promotes.join("  ")));
  const maxabs = Math.max(1e-12, ...f.top.map(e => Math.max(...e.acts.map(Math.abs))));
  box.appendChild(el("h3", "Top " + f.top.length + " examples")); f.top.forEach(e => box.appendChild(strip(e, maxabs)));
  box.appendChild(el("h3", "Random non-zero examples (" + f.random.length + ")")); f.random.forEach(e => box.appendChild(strip(e, maxabs)));
  document.querySelectorAll(".it").forEach(n => n.classList.toggle("sel", +n.dataset.id === i));
  if (location.hash !== "#f=" + i) history.replaceState(null, "", "#f=" + i);
}

function search(q) {
  q = q.trim().toLowerCase(); const list = document.getElementById("list"); list.replaceChildren();
  shown = F.filter(f => !q || String(f.id) === q || f.name.toLowerCase().includes(q));
  for (const f of shown.slice(0, 300)) { const n = el("div", "#" + f.id + " " + f.name, "it"); n.dataset.id = f.id;
    n.onclick = () => show(f.id); list.appendChild(n); }
  if (shown.length > 300) list.appendChild(el("div", "… " + (shown.length - 300) + " more: refine the search", "meta"));
  if (shown.length && !shown.some(f => f.id === cur)) show(shown[0].id);
}

function step(d) { const j = shown.findIndex(f => f.id === cur); const n = shown[Math.max(0, Math.min(shown.length - 1, j + d))]; if (n) show(n.id); }
document.addEventListener("keydown", e => {
  if (e.target.id === "q") { if (e.key === "Escape") e.target.blur(); return; }
  if (e.key === "j" || e.key === "ArrowDown") step(1); else if (e.key === "k" || e.key === "ArrowUp") step(-1);
  else if (e.key === "/") { e.preventDefault(); document.getElementById("q").focus(); } });
document.getElementById("q").addEventListener("input", e => search(e.target.value));
overview();
const h = new URLSearchParams(location.hash.slice(1));
if (h.has("q")) document.getElementById("q").value = h.get("q");
search(document.getElementById("q").value);
if (h.has("f")) show(+h.get("f"));
</script></body></html>
"""


def cmd_dashboard(args):
    data = json.load(open(args.features))
    if args.ablations:
        ab = json.load(open(args.ablations))
        data["ablation_layers"] = [dict(label=r["label"], mean=r["kl_full_abl_assistant_mean"])
                                   for r in ab["results"].get("layer", [])]
    if args.sae and os.path.isfile(os.path.join(args.sae, "cfg.json")):
        data["sae_metrics"] = {k: v for k, v in (json.load(open(os.path.join(args.sae, "cfg.json"))).get("final") or {}).items()
                               if not isinstance(v, dict)}
    if args.model and args.adapter:
        import eval as ev
        from data import Tokenizer
        model, _ = ev.load_model(argparse.Namespace(model=args.model, adapter=args.adapter, dtype=None, merge=False), "cpu")
        prom = promoted_tokens(model, Tokenizer(args.tokenizer or args.model))
        for f in data["features"]:
            if f["name"] in prom:
                f["promotes"] = prom[f["name"]]
    html = dashboard_html(data)
    write_atomic(args.out, html)
    print(f"dashboard: {len(data['features'])} features -> {args.out}")


# -----------------------------------------------------------------------------
# autointerp

EXPLAIN_SYSTEM = ("You study a feature of a language model that reads reasoning traces. You are shown text snippets "
                  "where it fires, strongest first; the token it fires on is marked <<like this>> with its activation. "
                  "Answer with one short sentence: what the feature responds to.")
DETECT_SYSTEM = ("You are given an explanation of a feature and numbered text snippets. The feature fires on the token "
                 "marked <<like this>> in some of them. Answer with a JSON list of the numbers of the snippets where "
                 "you think it fires, and nothing else.")
RUBRIC_SYSTEM = ("Rate how monosemantic this feature is from its top examples: 0 = one specific meaning, 1 = broad but "
                 "consistent, 2 = polysemantic. Answer with the digit only.")


def snippet(e, window=12):
    lo, t = max(0, e["target"] - window), e["target"]
    return "".join(e["tokens"][lo:t]) + "<<" + e["tokens"][t] + ">>" + "".join(e["tokens"][t + 1:t + 1 + window])


def explain_messages(f, n=10):
    """The explanation prompt: the top examples sorted by activation (the official code forgot to
    sort, PAPER.md G2), then a few random non-zero ones."""
    top = sorted(f["top"], key=lambda e: -e["value"])[:n]
    lines = [f"{i + 1}. ({e['value']:.3g}) {snippet(e)}" for i, e in enumerate(top)]
    lines += [f"r{i + 1}. ({e['value']:.3g}) {snippet(e)}" for i, e in enumerate(f["random"][:3])]
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def detection_set(f, n_explain=10, n=6, seed=0):
    """Held-out positives (top examples not shown to the explainer, then random non-zero ones) and
    as many inactive snippets, shuffled with a seed: [(snippet, fires)]."""
    import random
    pos = sorted(f["top"], key=lambda e: -e["value"])[n_explain:] + f["random"]
    pos, neg = pos[:n], f.get("inactive", [])[:n]
    items = [(snippet(e), True) for e in pos] + [(snippet(e), False) for e in neg]
    random.Random(seed + f["id"]).shuffle(items)
    return items


def detect_messages(explanation, items):
    body = "\n".join(f"{i + 1}. {s}" for i, (s, _) in enumerate(items))
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"}]


def balanced_accuracy(items, chosen):
    pos = [i for i, (_, y) in enumerate(items) if y]
    neg = [i for i, (_, y) in enumerate(items) if not y]
    tpr = sum(i in chosen for i in pos) / len(pos) if pos else 0.0
    tnr = sum(i not in chosen for i in neg) / len(neg) if neg else 0.0
    return (tpr + tnr) / 2 if pos and neg else (tpr if pos else tnr)


class LLM:
    """An OpenAI-compatible chat-completions client: key from the environment only, retries with
    backoff on 429 and 5xx, a concurrency limit, and an on-disk cache keyed by the request."""

    def __init__(self, url, model, cache_dir, key_env="RANK1_LLM_API_KEY", retries=5, concurrency=8, backoff=1.0):
        self.url, self.model, self.cache_dir = url.rstrip("/"), model, cache_dir
        self.key = os.environ.get(key_env, "")
        self.retries, self.concurrency, self.backoff = retries, concurrency, backoff
        self.calls = 0
        os.makedirs(cache_dir, exist_ok=True)

    def __call__(self, messages, max_tokens=256):
        import hashlib
        import time
        import urllib.error
        import urllib.request
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        f = os.path.join(self.cache_dir, hashlib.sha256(body.encode()).hexdigest() + ".json")
        if os.path.isfile(f):
            return json.load(open(f))["content"]
        req = urllib.request.Request(self.url + "/chat/completions", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        for attempt in range(self.retries + 1):
            try:
                self.calls += 1
                with urllib.request.urlopen(req, timeout=120) as r:
                    content = json.load(r)["choices"][0]["message"]["content"]
                break
            except urllib.error.HTTPError as e:
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                raise RuntimeError(f"{self.url}: HTTP {e.code} after {attempt + 1} attempts") from None
        write_atomic(f, json.dumps({"content": content}))
        return content

    def map(self, fn, items):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(fn, items))


def autointerp(features, llm=None, rubric=False, n_explain=10):
    """Explanation prompts for every feature with examples; with an LLM: explanations, detection
    balanced accuracy on held-out positives and inactive snippets, and optionally the 0/1/2 rubric."""
    feats = [f for f in features if f["top"]]
    rows = [dict(id=f["id"], name=f["name"], messages=explain_messages(f, n_explain)) for f in feats]
    if llm is None:
        return rows

    def one(pair):
        f, row = pair
        row["explanation"] = llm(row["messages"]).strip()
        items = detection_set(f, n_explain)
        answer = llm(detect_messages(row["explanation"], items))
        try:
            chosen = {int(i) - 1 for i in json.loads(answer[answer.index("["):answer.rindex("]") + 1])}
        except ValueError:
            chosen = set()
        row["detection_balanced_accuracy"] = balanced_accuracy(items, chosen)
        row["detection_items"] = len(items)
        if rubric:
            d = "".join(c for c in llm([{"role": "system", "content": RUBRIC_SYSTEM}] + row["messages"][1:]) if c.isdigit())
            row["rubric"] = int(d[0]) if d and d[0] in "012" else None
        return row
    return llm.map(one, list(zip(feats, rows)))


def cmd_autointerp(args):
    data = json.load(open(args.features))
    llm = LLM(args.llm_url, args.llm_model, args.cache or os.path.join(args.out, "llm-cache"),
              concurrency=args.concurrency) if args.llm_url else None
    rows = autointerp(data["features"][:args.limit or None], llm, args.rubric, args.n_explain)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "autointerp.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    scored = [r["detection_balanced_accuracy"] for r in rows if "detection_balanced_accuracy" in r]
    if scored:
        print(f"autointerp: {len(scored)} features, mean detection balanced accuracy {sum(scored) / len(scored):.3f}")
    else:
        print(f"autointerp: {len(rows)} explanation prompts written (no --llm-url given)")
    return rows


def compare_populations(lora_rows, mlp_rows, n=1000, seed=0):
    """LoRA features vs MLP neurons: mean detection balanced accuracy and (when rated) the 0/1/2
    rubric shares, each with a bootstrap 95% interval, and the difference of the means."""
    import random
    rng = random.Random(seed)

    def boot(xs):
        if not xs:
            return None, [None, None]
        ms = sorted(sum(rng.choice(xs) for _ in xs) / len(xs) for _ in range(n))
        return sum(xs) / len(xs), [ms[int(0.025 * n)], ms[int(0.975 * n) - 1]]
    table = {}
    for key in ("detection_balanced_accuracy", "rubric"):
        a = [r[key] for r in lora_rows if r.get(key) is not None]
        b = [r[key] for r in mlp_rows if r.get(key) is not None]
        if not a or not b:
            continue
        diffs = sorted(sum(rng.choice(a) for _ in a) / len(a) - sum(rng.choice(b) for _ in b) / len(b) for _ in range(n))
        (ma, ca), (mb, cb) = boot(a), boot(b)
        row = dict(lora=ma, lora_ci95=ca, mlp=mb, mlp_ci95=cb, n_lora=len(a), n_mlp=len(b), diff=ma - mb,
                   diff_ci95=[diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]])
        if key == "rubric":
            row["shares"] = {p: {c: sum(x == c for x in xs) / len(xs) for c in (0, 1, 2)} for p, xs in (("lora", a), ("mlp", b))}
        table[key] = row
    return table


def cmd_compare(args):
    load = lambda f: [json.loads(l) for l in open(f) if l.strip()]
    table = compare_populations(load(args.lora), load(args.mlp))
    for k, r in table.items():
        print(f"{k}: lora {r['lora']:.3f} {r['lora_ci95']} (n={r['n_lora']}) | mlp {r['mlp']:.3f} {r['mlp_ci95']} "
              f"(n={r['n_mlp']}) | difference {r['diff']:+.3f} {r['diff_ci95']}")
    write_atomic(args.out, json.dumps(table, indent=1))
    return table


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
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the features are computed")
    m.add_argument("--population", default="lora", choices=["lora", "mlp"],
                   help="lora: adapter scalars (+ SAE latents); mlp: the MLP-neuron baseline collected with --mlp-neurons")
    m.set_defaults(func=cmd_mine)
    d = sub.add_parser("dashboard", help="one self-contained HTML page")
    d.add_argument("--features", required=True, help="features.json from `interpret.py mine`")
    d.add_argument("--out", required=True)
    d.add_argument("--ablations", help="ablations.json from `eval.py ablate`")
    d.add_argument("--sae", help="SAE directory (for its metrics)")
    d.add_argument("--model")
    d.add_argument("--adapter", help="with --model: tokens promoted by down_proj / o_proj adapters")
    d.add_argument("--tokenizer")
    d.set_defaults(func=cmd_dashboard)
    st = sub.add_parser("steer", help="generate while adding to adapter scalars; measure the effect")
    st.add_argument("--model", required=True)
    st.add_argument("--adapter", required=True)
    st.add_argument("--tokenizer")
    st.add_argument("--dtype")
    st.add_argument("--sae")
    st.add_argument("--feature", type=int, default=0)
    st.add_argument("--site", help="steer one adapter scalar instead, e.g. L12.gate_proj")
    st.add_argument("--strengths", default="0,10,30")
    st.add_argument("--seeds", default="0")
    st.add_argument("--bench", help="NAME=PATH: measure accuracy on these problems")
    st.add_argument("--zip-password")
    st.add_argument("--limit", type=int, default=20)
    st.add_argument("--prompt", action="append")
    st.add_argument("--words", default="Wait,Hmm,But")
    st.add_argument("--out", required=True)
    st.add_argument("--batch-size", type=int, default=8)
    st.add_argument("--max-context", type=int, default=4096)
    st.add_argument("--max-answer-tokens", type=int, default=256)
    st.add_argument("--thinking-budget", type=int, default=0)
    st.add_argument("--wait", type=int, default=0)
    st.add_argument("--temperature", type=float, default=0.7)
    st.add_argument("--top-p", type=float, default=1.0)
    st.set_defaults(func=cmd_steer, merge=False)
    a = sub.add_parser("autointerp", help="explanation prompts; with --llm-url explanations and detection scores")
    a.add_argument("--features", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--llm-url", help="OpenAI-compatible base URL (key from RANK1_LLM_API_KEY)")
    a.add_argument("--llm-model", default="gpt-4o-mini")
    a.add_argument("--cache", help="response cache directory (default OUT/llm-cache)")
    a.add_argument("--concurrency", type=int, default=8)
    a.add_argument("--rubric", action="store_true", help="also the paper's 0/1/2 monosemanticity rubric")
    a.add_argument("--n-explain", type=int, default=10)
    a.add_argument("--limit", type=int, default=0)
    a.set_defaults(func=cmd_autointerp)
    c = sub.add_parser("compare", help="LoRA features vs MLP neurons from two autointerp.jsonl files")
    c.add_argument("--lora", required=True)
    c.add_argument("--mlp", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_compare)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"interpret.py: {e}") from None


if __name__ == "__main__":
    main()
