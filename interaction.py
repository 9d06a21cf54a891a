"""
Feature interaction: how the SAE latents of one trace respond when one latent is removed or
steered. An analysis of our own: the official misc_experiments/lora_feature_interaction_analysis.py
takes gradients among the 192 MLP adapter scalars, with no SAE (docs/departures.md).

    from interaction import latent_effects
    e = latent_effects(model, sae, ids, sources=[3, 17])              # remove each source
    e = latent_effects(model, sae, ids, sources=[3], strength=10.0)   # steer it by +10
    e["effect"][0, j]    # latent j's mean activation over the trace, edited minus clean

Remove latent i: at every token, its share of the SAE's reconstruction, f_i(t) d_i, is taken off
the adapter scalars, so the model runs as if the latent had been silent (d_i: its decoder row in
raw units). Steer: strength * d_i is added at every token (interpret.py steer's edit). The state
read back is the model's own, before the edit at each site: the edit is not counted as a change,
so a latent moves only through what the edited scalars did to later layers: the intervention
itself, not a first-order estimate.

Cost: one forward per source latent on the trace (at 32B: ~0.3 s each for 1,024 tokens on one
H100), plus the SAE's encoding of (T, 448) per forward.
"""
import torch

from lora import adapters, capture, hooked


def source_latents(z, n):
    """The n latents with the largest mean activation over the trace's tokens (firing ones)."""
    mean = z.mean(0)
    top = mean.argsort(descending=True)[:n]
    return [int(i) for i in top if mean[i] > 0]


@torch.no_grad()
def latent_effects(model, sae, ids, sources, strength=None):
    """dict(effect (len(sources), F), clean (F,) mean activations, sources, mode)."""
    dev = model.lm_head.weight.device
    x = torch.tensor([ids], device=dev)
    mods = adapters(model)
    r = mods[0].rank
    with capture(model) as cap:
        model(x)
    clean = cap.acts[0]  # (T, sites)
    z = sae.encode(clean)
    dec = sae.W_dec * sae.scale  # (F, sites): decoder rows in raw units
    effect = []
    for i in sources:
        delta = (-z[:, i:i + 1] * dec[i] if strength is None  # (T, sites)
                 else (strength * dec[i]).expand_as(clean))
        before = [None] * len(mods)

        def edit(m):
            j = mods.index(m)

            def hook(u):
                before[j] = u[0]
                return u + delta[:, j * r:(j + 1) * r].to(u.dtype)
            return hook
        with hooked(mods, edit, first=True):
            model(x)
        effect.append(sae.encode(torch.cat(before, -1)).mean(0) - z.mean(0))
    return dict(effect=torch.stack(effect).cpu(), clean=z.mean(0).cpu(), sources=list(sources),
                mode="remove" if strength is None else f"steer {strength:g}")
