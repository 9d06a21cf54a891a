"""The per-rollout analyses of the official code (issue 24), each against an outside oracle: the
attention KL against HF's output_attentions with PEFT, the attribution against finite differences
of the linearised model, the feature interaction against lora.steer, the norms by hand."""
import json
import os
import re
from contextlib import ExitStack

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analyses import (attention_kl, attribute, causal_kl, head_patterns, latent_effects,
                      layer_norms, linearised, pattern_hooks, source_latents, top_heads)
from batchtopk import SAE
from helpers import CHROMIUM, chromium_dom, hf_tiny, peft_pair, run_script, tiny_env
from lora import adapters, capture, hooked, steer
from model import RMSNorm
from steering import sae_offsets
from store import ActivationStore
from rollout import main as rollout_main


@pytest.fixture
def pair(tmp_path):
    return peft_pair(hf_tiny(attn_implementation="eager"), tmp_path / "base")


def test_explicit_attention_and_norm_scale_hooks_change_nothing(pair):
    _, ours, _ = pair
    idx = torch.randint(0, 97, (2, 11))
    ref = ours(idx)
    with pattern_hooks(ours, lambda i, p: p):
        for m in ours.modules():
            if isinstance(m, RMSNorm):
                m.scale_hook = lambda r: r
        got = ours(idx)
        for m in ours.modules():
            if isinstance(m, RMSNorm):
                m.scale_hook = None
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def kl_by_hand(p, q, eps=1e-10):
    """The official loop: each row sliced to the visible keys, smoothed, renormalised."""
    T = p.shape[-1]
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-2]):
        for t in range(T):
            a, b = p[idx][t, :t + 1] + eps, q[idx][t, :t + 1] + eps
            a, b = a / a.sum(), b / b.sum()
            out[idx][t] = (a * (np.log(a) - np.log(b))).sum()
    return out


def test_attention_kl_equals_hf_output_attentions_with_peft(pair):
    pm, ours, _ = pair
    ids = torch.randint(0, 97, (17,)).tolist()
    x = torch.tensor([ids])
    with torch.no_grad():
        adapted = [a[0].double().numpy() for a in pm(input_ids=x, output_attentions=True)
                   .attentions]
        with pm.disable_adapter():
            base = [a[0].double().numpy() for a in pm(input_ids=x, output_attentions=True)
                    .attentions]
    want = np.stack([kl_by_hand(b, a) for b, a in zip(base, adapted)])
    got = attention_kl(ours, ids)
    assert got.shape == (3, 4, 17) and want.max() > 1e-3  # the adapter moves attention
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert got[:, :, 0].max() == 0  # position 0 sees one key
    pats = head_patterns(ours, ids, [(2, 1), (0, 3)])
    np.testing.assert_allclose(pats[2, 1][0], base[2][1], atol=1e-5)
    np.testing.assert_allclose(pats[2, 1][1], adapted[2][1], atol=1e-5)
    np.testing.assert_allclose(pats[0, 3][1], adapted[0][3], atol=1e-5)
    mean = want.mean(-1)
    ranked = top_heads(got, 12)
    assert [(l, h) for l, h, _ in ranked] == [
        tuple(map(int, np.unravel_index(i, mean.shape))) for i in np.argsort(-mean, axis=None)]
    assert ranked[0][2] == pytest.approx(mean.max(), rel=1e-4)


def test_causal_kl_of_a_pattern_with_itself_is_zero_and_smoothing_keeps_it_finite():
    p = torch.tensor([[1.0, 0, 0], [0.0, 1, 0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.2, 0.3, 0.5]])
    kl = causal_kl(p, q)
    assert kl[0] == 0 and kl[2] == pytest.approx(0, abs=1e-12)
    assert 20 < kl[1] < 25  # log(1 / 1e-10) = 23.0: smoothed, not infinite


# -----------------------------------------------------------------------------
# attribution


def target_with(model, ids, site, pos, target, eps, frozen=True):
    """The target logit with scalar `site` at `pos` scaled by (1 + eps); frozen: attention
    patterns and RMSNorm scales held at their clean values (the function attribution
    differentiates)."""
    x = torch.tensor([ids])
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    pats, scales = {}, {m: [] for m in norms}

    def scaled(m):
        def hook(u):
            u = u.clone()
            u[0, pos] *= 1 + eps
            return u
        return hook
    with ExitStack() as st:
        st.callback(lambda: [setattr(m, "scale_hook", None) for m in norms])
        if frozen:  # a clean run records; then every pattern and scale is replaced by its record
            with pattern_hooks(model, lambda i, p: pats.setdefault(i, p)):
                for m in norms:
                    m.scale_hook = lambda r, m=m: scales[m].append(r) or r
                model(x)
            for m in norms:
                m.scale_hook = lambda r, it=iter(scales[m]): next(it)
            st.enter_context(pattern_hooks(model, lambda i, p: pats[i]))
        st.enter_context(hooked([adapters(model)[site]], scaled))
        return float(model(x)[0, target[0], target[1]])


def test_attribution_equals_finite_differences_of_the_linearised_model(pair):
    _, ours, _ = pair
    ours.double()
    ids = torch.randint(0, 97, (9,)).tolist()
    a = attribute(ours, ids, positions=[8, 5])
    assert a["attr"].shape == (2, 9, 21) and a["acts"].shape == (9, 21)
    rng, eps, full = np.random.default_rng(0), 1e-5, []
    with torch.no_grad():
        assert a["tokens"][0] == int(ours(torch.tensor([ids]))[0, 8].argmax())
        for _ in range(8):  # sources at or before the target, on sites that write values
            i, j = rng.integers(2), rng.choice([j for j in range(21) if j % 7 not in (3, 4)])
            tgt = (a["positions"][i], a["tokens"][i])
            s = rng.integers(tgt[0] + 1)
            fd = (target_with(ours, ids, j, s, tgt, eps)
                  - target_with(ours, ids, j, s, tgt, -eps)) / (2 * eps)
            assert float(a["attr"][i, s, j]) == pytest.approx(fd, rel=1e-4, abs=1e-9)
            full.append((target_with(ours, ids, j, s, tgt, eps, frozen=False)
                         - target_with(ours, ids, j, s, tgt, -eps, frozen=False)) / (2 * eps)
                        - fd)
    assert max(map(abs, full)) > 1e-3  # without the linearisation the derivative differs
    assert float(a["attr"][1, 6:].abs().max()) == 0  # later sources cannot move position 5
    qk = [j for j in range(21) if j % 7 in (3, 4)]  # q, k act only through the frozen patterns
    assert float(a["attr"][:, :, qk].abs().max()) == 0 and a["attr"].abs().max() > 1e-3
    diff = attribute(ours, ids, positions=[8], contrast=(5, 7))
    assert diff["tokens"] == [5] and diff["attr"].abs().max() > 0


def test_linearised_detaches_only_inside_the_context(pair):
    _, ours, _ = pair
    with linearised(ours):
        assert ours.model.layers[0].self_attn.pattern_hook is not None
    assert all(m.scale_hook is None for m in ours.modules() if isinstance(m, RMSNorm))
    assert ours.model.layers[0].self_attn.pattern_hook is None


# -----------------------------------------------------------------------------
# feature interaction


def tiny_sae(d, F_=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(d, F_, k=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, F_, generator=g))
        sae.W_dec.copy_(torch.randn(F_, d, generator=g))
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.b_enc.fill_(-0.5)
        sae.scale.copy_(torch.rand(d, generator=g) + 0.5)
    return sae


def test_latent_effects_equal_lora_steer(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 97, (10,)).tolist()
    x = torch.tensor([ids])
    layout = [(m.layer, m.target) for m in adapters(ours)]
    sae = tiny_sae(len(layout))
    with torch.no_grad(), capture(ours) as cap:
        ours(x)
        z = sae.encode(cap.acts[0])
    src = source_latents(z, 3)
    assert len(src) == 3 and z[:, src[0]].mean() == z.mean(0).max()
    # steer: lora.steer's offsets, the edit taken back off what capture() saw
    e = latent_effects(ours, sae, ids, src[:1], strength=2.0)
    off = sae_offsets(sae, src[0], 2.0, layout)
    with torch.no_grad(), steer(ours, off), capture(ours) as cap:
        ours(x)
    own = cap.acts[0] - torch.tensor([off[s] for s in layout])
    want = sae.encode(own).mean(0) - z.mean(0)
    torch.testing.assert_close(e["effect"][0], want, rtol=1e-5, atol=1e-6)
    # remove: one steer per position, each taking off that token's f_i(t) d_i
    i = src[1]
    e = latent_effects(ours, sae, ids, [i])
    offs = [sae_offsets(sae, i, -float(z[t, i]), layout) for t in range(len(ids))]
    with torch.no_grad(), ExitStack() as st:
        for t, o in enumerate(offs):
            st.enter_context(steer(ours, o, positions=[t]))
        cap = st.enter_context(capture(ours))
        ours(x)
    edits = torch.tensor([[o[s] for s in layout] for o in offs])
    want = sae.encode(cap.acts[0] - edits).mean(0) - z.mean(0)
    unedited = sae.encode(cap.acts[0]).mean(0) - z.mean(0)
    assert e["mode"] == "remove" and (want - unedited).abs().max() > 1e-4  # the edit is taken off
    torch.testing.assert_close(e["effect"][0], want, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norms_equal_the_official_hooks_on_peft(tmp_path, dtype, monkeypatch):
    """The official analyze_lora_projection_norms.py on transformers + PEFT: |MLP output|, and
    the output of post_attention_layernorm, its norm and its projection onto down_proj's unit
    lora_B, per layer and token. float64: transformers' RMSNorm computes in float32 whatever the
    model's dtype (which alone left differences of 3e-5 relative, amplified through the MLP), so
    here it computes in float64 as ours does, and the two agree to 1e-10 (measured: 1e-12).
    float32: to 1e-4, the two forwards' float32 rounding (measured: up to 5.5e-5). SDPA
    attention: transformers' eager attention takes its softmax in float32 too."""
    pm, ours, _ = peft_pair(hf_tiny(), tmp_path / "base")
    pm, ours = pm.to(dtype), ours.to(dtype)
    for m in pm.modules() if dtype == torch.float64 else ():
        if type(m).__name__ == "Qwen2RMSNorm":
            monkeypatch.setattr(m, "forward", lambda h, m=m: m.weight * (
                h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)))
    ids = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    want = {k: [] for k in ("mlp_out", "residual", "b_projection")}
    hooks = []
    def normed(m, i, o, b):  # what the official hook computes (returns None: output unchanged)
        want["residual"].append(o[0].norm(dim=-1))
        want["b_projection"].append(o[0] @ (b / b.norm()))
    for layer in pm.base_model.model.model.layers:
        b = layer.mlp.down_proj.lora_B["default"].weight.squeeze()
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, i, o: want["mlp_out"].append(o[0].norm(dim=-1)) and None))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, i, o, b=b: normed(m, i, o, b)))
    with torch.no_grad():
        pm(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    got = layer_norms(ours, ids)
    for k, v in want.items():
        assert got[k].dtype == (np.float64 if dtype == torch.float64 else np.float32)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        np.testing.assert_allclose(got[k], torch.stack(v).numpy(), rtol=tol, atol=tol / 10)


def test_layer_norms_by_hand(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 97, (7,)).tolist()
    got = layer_norms(ours, ids)
    with torch.no_grad():
        x = ours.model.embed_tokens(torch.tensor([ids]))
        from model import rope_cos_sin
        cos, sin = rope_cos_sin(torch.arange(7), ours.cfg.head_dim, ours.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(ours.model.layers):
            h = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
            xn = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            down = mlp.down_proj
            act = F.silu(mlp.gate_proj(xn)) * mlp.up_proj(xn)
            u = (act @ down.lora_A.t())[0, :, 0].numpy()
            b = down.lora_B[:, 0].numpy()
            hn = xn[0].numpy()  # the MLP's input, as the official script reads it
            np.testing.assert_allclose(got["residual"][i], np.linalg.norm(hn, axis=1), rtol=1e-5)
            np.testing.assert_allclose(got["b_projection"][i], hn @ b / np.linalg.norm(b),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got["lora_write"][i],
                                       down.scaling * np.abs(u) * np.linalg.norm(b), rtol=1e-5)
            out = mlp(xn)
            np.testing.assert_allclose(got["mlp_out"][i], np.linalg.norm(out[0].numpy(), axis=1),
                                       rtol=1e-5)
            x = h + out
    assert got["layer_means"]["mlp_out"][1] == pytest.approx(got["mlp_out"][1].mean())


# -----------------------------------------------------------------------------
# rollout.py: the command and its page


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A tiny model with two adapters, a store collected with the first, an SAE on it, and
    rollout.py's outputs for document 3."""
    d = tiny_env(tmp_path_factory.mktemp("trace"), adapters=(("adapter", 0), ("other", 1)))
    rows = [dict(question=f"What is {i}*3?", deepseek_thinking_trajectory=f"{i} times 3 is "
                 f"{3 * i}. " * (2 + i % 3), deepseek_attempt=str(3 * i)) for i in range(5)]
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_script("collect.py", ["--model", d / "model", "--adapter", d / "adapter", "--data",
                              d / "rows.jsonl", "--out", d / "acts", "--docs-per-shard", 2])
    store = ActivationStore(str(d / "acts"))
    sae = tiny_sae(store.d, 16)
    sae.save(str(d / "sae"), made_from=dict(store=store.identity()))
    args = ["--model", d / "model", "--adapter", d / "adapter", "--acts", d / "acts",
            "--doc", 3, "--sae", d / "sae", "--latents", 3]
    rollout_main([str(a) for a in args + ["--out", d / "rollout"]])
    return d, args


def test_rollout_draws_the_store_and_writes_every_analysis(traced):
    d, _ = traced
    t = json.loads((d / "rollout" / "rollout.json").read_text())
    store = ActivationStore(str(d / "acts"))
    doc = [x for s in store.index["shards"] for x in s["docs"] if x["doc"] == 3][0]
    s = [i for i, sh in enumerate(store.index["shards"]) if doc in sh["docs"]][0]
    rows = np.asarray(store.shard(s)[doc["start"]:doc["start"] + doc["length"]])
    assert np.array_equal(np.array(t["state"], dtype=np.float32), rows)  # exactly the store's
    T = doc["length"]
    kl = np.load(d / "rollout" / "attention_kl.npy")
    attr = np.load(d / "rollout" / "attribution.npy")
    assert kl.shape == (3, 4, T) and attr.shape == (T, T, 21)
    assert [h[:2] for h in t["kl"]["heads"]] == [list(map(int, np.unravel_index(i, (3, 4))))
                                                 for i in np.argsort(-kl.mean(-1),
                                                                     axis=None)[:8]]
    np.testing.assert_allclose(t["attribution"]["by_source"][T - 1], attr[T - 1].sum(-1),
                               rtol=1e-5, atol=1e-7)
    assert len(t["interaction"]["rows"]) == 3 and t["interaction"]["mode"] == "remove"
    assert len(t["norms"]["mlp_out"]) == 3 and t["made_from"]["doc"] == 3


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium is not installed (.ci/run installs it)")
def test_rollout_page_shows_state_in_both_polarities_and_the_top_heads(traced):
    d, _ = traced
    page = d / "rollout" / "rollout.html"
    t = json.loads((d / "rollout" / "rollout.json").read_text())
    html = page.read_text()
    assert "<|im_start|>" not in html  # token text only as escaped JSON
    row = np.array(t["state"][5])
    for pol, keep in (("both", row), ("pos", np.maximum(row, 0)), ("neg", np.minimum(row, 0))):
        dom, log = chromium_dom(page.as_uri() + f"#view=state&tok=5&pol={pol}")
        assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
        shown = [float(v) for v in re.findall(r'<td data-v="([-0-9.e]+)"', dom)]
        want = sorted((v for v in keep if v != 0), key=abs, reverse=True)[:12]
        np.testing.assert_allclose(shown, want, rtol=1e-6)  # the readout draws the store's values
        assert 'id="heat"' in dom and "&lt;|im_start|&gt;" in dom  # heatmap; tokens as text
        assert re.search(r'<span class="tok cur" data-i="5"', dom)  # the chosen token is marked
    top = t["kl"]["heads"][0]
    dom, log = chromium_dom(page.as_uri() + f"#view=attention&tok={len(row) - 1}"
                            f"&head={top[0]}.{top[1]}")
    assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
    assert dom.index(f"L{top[0]}.H{top[1]}") < dom.index(f"L{t['kl']['heads'][1][0]}.H")
    assert 'class="it sel"' in dom and "its keys (base, adapted)" in dom
    for view, text in (("attribution", "the prediction at token"), ("interaction", "moved"),
                       ("norms", "lora_write")):
        dom, log = chromium_dom(page.as_uri() + f"#view={view}")
        assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
        assert text in dom, view


def test_rollout_refuses_another_adapters_store_and_existing_outputs(traced):
    d, args = traced
    other = [str(a) for a in args]
    other[other.index("--adapter") + 1] = str(d / "other")
    with pytest.raises(SystemExit, match="--acts .*collected with another --adapter"):
        rollout_main(other + ["--out", str(d / "t2")])
    with pytest.raises(SystemExit, match="rollout.html: exists; pass --overwrite"):
        rollout_main([str(a) for a in args] + ["--out", str(d / "rollout")])
    with pytest.raises(SystemExit, match="no document 99"):
        rollout_main([str(a) for a in args] + ["--doc", "99", "--out", str(d / "t3")])


def test_rollout_keeps_the_analyses_done_before_an_error(traced, monkeypatch):
    """Each analysis is saved when it finishes: an error in the norms (the third) keeps the
    attention and attribution passes, which the rerun reads back instead of running again, and
    the rerun's outputs are an untroubled run's. Attribution that cannot fit is refused before
    any analysis runs, naming the flag."""
    import rollout
    d, args = traced
    argv = [str(a) for a in args] + ["--out", str(d / "t4")]

    def broken(*a):
        raise ValueError("the norms failed")
    monkeypatch.setattr(rollout, "layer_norms", broken)
    with pytest.raises(SystemExit, match="the norms failed"):
        rollout_main(argv)
    parts = sorted(os.listdir(d / "t4" / "rollout.parts"))
    assert parts == ["attention.json", "attention.npy", "attribution.json", "attribution.npy"]
    monkeypatch.undo()
    monkeypatch.setattr(rollout, "attention_kl", broken)  # must not run again
    monkeypatch.setattr(rollout, "attribute", broken)
    rollout_main(argv)
    assert not (d / "t4" / "rollout.parts").exists()
    for f in ("rollout.json", "attention_kl.npy", "attribution.npy"):
        assert (d / "t4" / f).read_bytes() == (d / "rollout" / f).read_bytes(), f
    monkeypatch.setattr(rollout, "free_memory", lambda device: rollout.RESERVE + 1)
    monkeypatch.setattr(rollout, "attention_kl", broken)
    with pytest.raises(SystemExit, match=r"--attribution-tokens 0: attribution keeps .* at most "
                       r"\d+ tokens fit here"):
        rollout_main([str(a) for a in args] + ["--out", str(d / "t5")])
