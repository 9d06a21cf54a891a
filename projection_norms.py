"""
How large the adapter's writes are beside the layer's own (the official misc_experiments/
analyze_lora_projection_norms.py and plot_lora_mlp_norms.py): per layer, on one trace,

    from projection_norms import layer_norms
    n = layer_norms(model, ids)     # dict of (layers, T) arrays and their per-layer means

- mlp_out: |MLP output| (the adapted MLP, adapters included), L2 over the hidden size;
- lora_write: |s * B u| of the down_proj adapter, its part of that output;
- residual: |x| of the MLP's input x = post_attention_layernorm(h), h the residual stream after
  attention (the official script hooks that layernorm's output and calls it the residual);
- b_projection: x . b / |b|, that input's signed component along down_proj's write direction b
  (the official script's "LoRA projection"; rank 1).
All in float32, float64 for a float64 model.
Cost: one forward, (layers, T) floats kept per quantity.
"""
import numpy as np
import torch

from lora import adapters, capture


def up(t):
    """float32, or float64 for a float64 tensor."""
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def layer_norms(model, ids):
    dev = model.lm_head.weight.device
    layers = model.model.layers
    got = {k: [None] * len(layers) for k in ("mlp_out", "residual", "b_projection")}
    down = {a.layer: a for a in adapters(model) if a.target == "down_proj"}
    hooks = []
    for i, layer in enumerate(layers):
        def mlp_hook(mod, inp, out, i=i):
            got["mlp_out"][i] = out[0].to(up(out)).norm(dim=-1)

        def res_hook(mod, inp, out, i=i):
            x = out[0].to(up(out))
            got["residual"][i] = x.norm(dim=-1)
            if i in down:
                b = down[i].lora_B[:, 0].to(x.dtype)
                got["b_projection"][i] = x @ b / b.norm().clamp(min=1e-30)
        hooks += [layer.mlp.register_forward_hook(mlp_hook),
                  layer.post_attention_layernorm.register_forward_hook(res_hook)]
    try:
        with capture(model) as cap:
            model(torch.tensor([ids], device=dev))
    finally:
        for h in hooks:
            h.remove()
    T = len(ids)
    nan = torch.full((T,), float("nan"), dtype=up(model.lm_head.weight))
    out = {k: torch.stack([t.cpu() if t is not None else nan for t in v]).numpy()
           for k, v in got.items()}
    write = [nan] * len(layers)
    col = 0
    for a in adapters(model):  # capture's layout: a.rank columns per adapter, in this order
        u = cap.acts[0, :, col:col + a.rank]
        col += a.rank
        if a.target == "down_proj":
            write[a.layer] = (a.scaling * u.to(up(u)) @ a.lora_B.to(up(u)).t()).norm(dim=-1).cpu()
    out["lora_write"] = torch.stack(write).numpy()
    out["layer_means"] = {k: [float(r.mean()) if np.isfinite(r).all() else None for r in v]
                          for k, v in out.items()}  # None: a layer without a down_proj adapter
    return out
