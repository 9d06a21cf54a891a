"""
The feature dashboard: one self-contained HTML page (no network) of the mined features, their
examples, quantiles, promoted tokens and what they were made from.

    python dashboard.py --features interp/features.json --out interp/dashboard.html \\
        [--ablations results/ablate/ablations.json] [--sae sae/] [--model M --adapter A]

Safety: dataset text reaches a page only as escaped SVG/HTML text or inside JSON script elements
(with <, > and & escaped, so no text can close them) that the page reads with textContent.
"""
import os
from html import escape

import torch

from checkpoint import read_checkpoint_tensors
from common import (Parser, check_out, differences, fresh_outputs, read_json, user_errors,
                    write_atomic)
from data import Tokenizer
from figures import provenance_lines, safe_json
from lora import site_label
from lora_files import PEFT_NAME, adapter_identity, adapter_tensors, check_base
from model import Qwen2Config

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "dashboard.html")

# -----------------------------------------------------------------------------
# the dashboard


def promoted_tokens(model_dir, adapter_dir, tok, n=8):
    """For adapters that write to the residual stream (down_proj, o_proj): the tokens whose logits
    s * u * b raises most (u > 0) and lowers most (through the final norm's weight and the head).
    Reads the head, the final norm and the adapter's b vectors alone, not the model."""
    cfg = Qwen2Config.from_pretrained(model_dir)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    t = read_checkpoint_tensors(model_dir, [head, "model.norm.weight"], torch.float32)
    W, g = t[head], t["model.norm.weight"]
    out = {}
    with torch.no_grad():
        for k, b in sorted(adapter_tensors(adapter_dir).items()):
            m = PEFT_NAME.match(k)
            if m and m.group(2) in ("down_proj", "o_proj") and m.group(3) == "B":
                logit = W @ (g * b[:, 0].float())
                name = site_label(int(m.group(1)), m.group(2))
                for sign, v in (("+", logit), ("-", -logit)):
                    out[name + sign] = [tok.id_to_token_str(i) for i in v.topk(n).indices.tolist()]
    return out


def dashboard_html(data):
    """One self-contained page. The data sit in JSON script elements and the page builds everything
    with textContent: dataset text is never parsed as HTML. The page parses a small index at load;
    each feature's examples sit in their own element, parsed when the feature is shown, so
    thousands of features stay responsive."""
    for i, f in enumerate(data["features"]):  # ids name elements: integers only
        if not isinstance(f.get("id"), int) or isinstance(f["id"], bool):
            raise ValueError(f"features[{i}]: 'id' must be an integer, got {f.get('id')!r}")
    index = {**data, "features": [{k: f[k] for k in ("id", "name", "freq", "quantiles")}
                                  for f in data["features"]]}
    parts = [f'<script type="application/json" id="f{escape(str(f["id"]))}">{safe_json(f)}'
             '</script>' for f in data["features"]]
    with open(TEMPLATE, encoding="utf-8") as f:
        page = f.read()
    # filled in one pass: a placeholder's name inside the data is never substituted
    head, rest = page.split("__DATA__")
    mid, tail = rest.split("__FEATURES__")
    return head + safe_json(index) + mid + "\n".join(parts) + tail


def parser():
    p = Parser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--features", required=True, help="features.json from `interpret.py mine`")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--ablations", help="ablations.json from `ablate.py`")
    p.add_argument("--sae", help="SAE directory (for its metrics)")
    p.add_argument("--model", help="HF model directory (the base), for the token views")
    p.add_argument("--adapter", help="with --model: tokens promoted by down_proj / o_proj adapters")
    p.add_argument("--other-base", action="store_true",
                   help="use an adapter trained on another base than --model")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --model)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("dashboard.py"):
        build(args)


def build(args):
    """Gather the page's data; every extra input must describe the store the features were mined
    from (same adapter), or the page would label one adapter's features with another's."""
    check_out(args.out, {"--features": args.features, "--sae": args.sae,
                         "--ablations": args.ablations})
    fresh_outputs([args.out], args.overwrite)
    data = read_json(args.features, ("features",), "features.json (`interpret.py mine`)")
    store = (data.get("made_from") or {}).get("store") or {}
    adapter = (store.get("made_from") or {}).get("adapter")

    def same_adapter(other, what):
        diff = differences(adapter, other) if adapter and other else []
        if diff:
            raise ValueError(f"{what}: made with another adapter than the features "
                             f"({'; '.join(diff[:2])})")
    if args.ablations:
        ab = read_json(args.ablations, ("results", "sites"), "ablations.json (`ablate.py`)")
        same_adapter((ab.get("identity") or {}).get("adapter"), args.ablations)
        data["ablation_layers"] = [dict(label=r["label"], mean=r["kl_full_abl_assistant_mean"])
                                   for r in ab["results"].get("layer", [])]
    if args.sae:
        cfg = read_json(os.path.join(args.sae, "cfg.json"), ("d_in", "n_latents"),
                        "an SAE's cfg.json (`sae.py train`)")
        trained_on = (cfg.get("made_from") or {}).get("store")
        diff = differences(trained_on, store) if trained_on and store else []
        if diff:
            raise ValueError(f"{args.sae}: trained on another store than the features were mined "
                             f"from ({'; '.join(diff[:2])})")
        data["sae_metrics"] = {k: v for k, v in (cfg.get("final") or {}).items()
                               if not isinstance(v, dict)}
    if args.model and args.adapter:
        same_adapter(adapter_identity(args.adapter), args.adapter)
        check_base(args.model, args.adapter, args.other_base)
        prom = promoted_tokens(args.model, args.adapter, Tokenizer(args.tokenizer or args.model))
        for f in data["features"]:
            if f["name"] in prom:
                f["promotes"] = prom[f["name"]]
    data["provenance"] = provenance_lines(data.get("made_from") or {})
    write_atomic(args.out, dashboard_html(data))
    print(f"dashboard: {len(data['features'])} features -> {args.out}")


if __name__ == "__main__":
    main()
