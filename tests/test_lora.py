"""lora.py and lora_files.py against PEFT (the oracle), gradcheck, capture vs hooks, interventions,
files and their errors."""
import json
import os

import pytest
import torch

from helpers import hf_tiny, peft_model, peft_pair, save_hf
from lora import (SITE_ORDER, LoRAFunction, LoRALinear, ablate, adapters, apply_lora, capture,
                  disabled, hooked, lora_linear, merge, select_layers, sites, steer, unmerge)
from lora_files import export_merged, load_adapter, save_adapter
from model import QWEN2_5_32B, Qwen2, Qwen2Config

ALL7 = list(SITE_ORDER)


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def pair(tmp_path):
    """(PEFT model, our model) with the same base and the same random non-zero adapters."""
    return peft_pair(hf_tiny(), tmp_path / "base")


def test_logits_and_grads_match_peft(pair):
    """float32 (transformers computes RMSNorm and RoPE in float32 even for a float64 model, so
    float64 gains nothing): a gradient entry is a sum over tokens with cancellation, and its
    error is bounded against the tensor's largest entry (on one CPU kernel path the smallest
    entries of a lora_A gradient differed by 5e-4 relative, 4e-5 of the largest)."""
    pm, ours, _ = pair
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (2, 21), generator=g)
    tgt = torch.randint(0, 97, (2, 21), generator=g)
    a = pm(input_ids=idx).logits
    b = ours(idx)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.nn.functional.cross_entropy(a.flatten(0, 1), tgt.flatten()).backward()
    torch.nn.functional.cross_entropy(b.flatten(0, 1), tgt.flatten()).backward()
    pgrads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    assert len(pgrads) == 2 * len(adapters(ours)) == 2 * 7 * 3
    for m in adapters(ours):
        for which, p in (("A", m.lora_A), ("B", m.lora_B)):
            ref = pgrads[f"base_model.model.{m.name}.lora_{which}.weight"]
            torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_zero_init_equals_base_and_ablating_everything_equals_base(tiny_dir):
    _, path = tiny_dir
    base = Qwen2.from_pretrained(path)
    idx = torch.randint(0, 97, (2, 9))
    ref = base(idx).detach()
    m = apply_lora(Qwen2.from_pretrained(path))
    torch.testing.assert_close(m(idx), ref, atol=0, rtol=0)  # B = 0 at init
    bound = 1 / (48 ** 0.5)
    A = adapters(m)[0].lora_A
    # kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    randomize(m)
    assert not torch.allclose(m(idx), ref)
    with ablate(m):
        torch.testing.assert_close(m(idx), ref, atol=0, rtol=0)
    with disabled(m):
        torch.testing.assert_close(m(idx), ref, atol=0, rtol=0)
    assert not torch.allclose(m(idx), ref)  # restored on exit


def test_merged_equals_unmerged(tiny_dir):
    _, path = tiny_dir
    m = randomize(apply_lora(Qwen2.from_pretrained(path)))
    idx = torch.randint(0, 97, (2, 9))
    ref = m(idx).detach()
    w0 = adapters(m)[3].weight.detach().clone()
    merge(m)
    torch.testing.assert_close(m(idx), ref, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        adapters(m)[0].merge()
    unmerge(m)
    torch.testing.assert_close(adapters(m)[3].weight, w0, atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="not merged"):
        adapters(m)[0].unmerge()
    with pytest.raises(ValueError, match="non-finite"):
        with torch.no_grad():
            adapters(m)[0].lora_B.fill_(float("inf"))
        adapters(m)[0].merge()


@pytest.mark.parametrize("rank", [1, 2])
def test_gradcheck_reference_function(rank):
    """Values, and gradients through both outputs: u is a true output, so a loss through it
    reaches x and A (d(sum u)/dA = the sum of the x rows; the fused op had given 0)."""
    g = torch.Generator().manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 5, generator=g, **d).requires_grad_()
    W, b = torch.randn(4, 5, generator=g, **d), torch.randn(4, generator=g, **d)
    A = torch.randn(rank, 5, generator=g, **d).requires_grad_()
    B = torch.randn(4, rank, generator=g, **d).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, A, B: LoRAFunction.apply(x, W, b, A, B, 16.0),
                                    (x, A, B))
    y, u = LoRAFunction.apply(x, W, b, A, B, 16.0)
    torch.testing.assert_close(y, x @ W.t() + b + 16.0 * (x @ A.t()) @ B.t())
    torch.testing.assert_close(u, x @ A.t())
    (gA,) = torch.autograd.grad(u.sum(), A)
    torch.testing.assert_close(gA, x.detach().reshape(-1, 5).sum(0).expand(rank, 5))


@pytest.mark.parametrize("shape,din,dout", [((0,), 5, 4), ((2, 0), 5, 4), ((3,), 0, 4),
                                             ((3,), 5, 0)])
def test_zero_tokens_and_zero_widths(shape, din, dout):
    """No tokens, no inputs or no outputs: the right shapes, zero rank-1 terms, zero gradients."""
    x = torch.randn(*shape, din, requires_grad=True)
    W, b = torch.randn(dout, din), torch.randn(dout)
    A, B = torch.randn(1, din, requires_grad=True), torch.randn(dout, 1, requires_grad=True)
    y, u = LoRAFunction.apply(x, W, b, A, B, 16.0)
    assert y.shape == (*shape, dout) and u.shape == (*shape, 1)
    torch.testing.assert_close(y, x @ W.t() + b + 16.0 * (x @ A.t()) @ B.t())
    (y.sum() + u.sum()).backward()
    assert x.grad.shape == x.shape and A.grad.shape == A.shape and B.grad.shape == B.shape
    if 0 in shape or din == 0:
        assert not A.grad.any() and not B.grad.any()
    with torch.no_grad():  # the plain inference path
        y2, u2 = lora_linear(x, W, b, A, B, 16.0)
    assert torch.equal(y2, y.detach()) and torch.equal(u2, u.detach())


def test_autocast_runs_the_frozen_matmul_low_and_the_adapter_in_fp32():
    """Under autocast with fp32 weights: y is what the bf16 frozen linear plus the fp32 adapter
    give, u is exact fp32, gradients reach the fp32 parameters."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    m = LoRALinear(base, layer=0, target="q_proj")
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(3, 16, requires_grad=True)
    got = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        with hooked([m], lambda mod: lambda u: got.append(u.detach()) or u):
            m(x)
    bf = torch.bfloat16
    ref = (torch.nn.functional.linear(x.to(bf), base.weight.to(bf), base.bias.to(bf)).float()
           + 16 * (x.to(bf).float() @ m.lora_A.t()) @ m.lora_B.t()).to(bf)
    assert y.dtype == bf
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    torch.testing.assert_close(got[0], x.detach().to(bf).float() @ m.lora_A.detach().t(),
                               atol=0, rtol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.lora_A.grad is not None


def test_bf16_base_keeps_lora_math_in_fp32():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    m = LoRALinear(base, layer=0, target="q_proj")
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(3, 16).to(torch.bfloat16).requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    ref = (base(x).float() + 16 * (x.float() @ m.lora_A.t()) @ m.lora_B.t()).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and m.lora_A.grad.dtype == torch.float32


def test_capture_equals_hooks_in_paper_order(tiny_dir):
    _, path = tiny_dir
    m = randomize(apply_lora(Qwen2.from_pretrained(path)))
    assert sites(m)[:8] == [(0, t) for t in SITE_ORDER] + [(1, "gate_proj")]
    inputs = {}
    hooks = [a.register_forward_hook(lambda mod, args, out: inputs.__setitem__((mod.layer,
                                                                                mod.target),
                                                                                args[0]))
             for a in adapters(m)]
    idx = torch.randint(0, 97, (2, 11))
    with capture(m) as cap:
        m(idx)
    for h in hooks:
        h.remove()
    acts = cap.acts
    assert acts.shape == (2, 11, 3 * 7) and acts.dtype == torch.float32
    for l in range(3):
        for p, t in enumerate(SITE_ORDER):
            a = adapters(m)[7 * l + p]
            torch.testing.assert_close(acts[..., 7 * l + p], (inputs[(l,
                                                                      t)] @ a.lora_A[0]).detach())
    # down_proj's input is the LoRA-modified SwiGLU product; o_proj's the concatenated heads
    assert all(a.u_hooks == [] for a in adapters(m))  # nothing recorded outside the context


def test_capture_layer_subset_and_generation(tiny_dir):
    _, path = tiny_dir
    m = randomize(apply_lora(Qwen2.from_pretrained(path), targets=["o_proj", "up_proj"],
                             layers=[0, 2]))
    assert sites(m) == [(0, "up_proj"), (0, "o_proj"), (2, "up_proj"), (2, "o_proj")]
    with capture(m) as cap:
        out = m.generate([[1, 2, 3, 4]], max_new_tokens=5)
    assert cap.acts.shape == (1, 4 + 5 - 1, 4)  # prompt + every fed-back token
    with capture(m) as cap2:
        m(torch.tensor([[1, 2, 3, 4] + out[0][:-1]]))
    torch.testing.assert_close(cap.acts, cap2.acts, atol=1e-5, rtol=1e-5)


def test_doc_scalars_in_windows_equal_one_forward_and_keep_no_graph(tiny_dir):
    """collect.py's per-document collection: KV-cached windows give the scalars of one full
    forward, and no autograd graph is kept (the adapters are trainable)."""
    from lora import doc_scalars
    _, path = tiny_dir
    m = randomize(apply_lora(Qwen2.from_pretrained(path)))
    ids = torch.randint(0, 97, (23,)).tolist()
    with capture(m) as cap:
        m(torch.tensor([ids]))
    grad_on, forward = [], m.forward_cached
    m.forward_cached = lambda *a, **k: grad_on.append(torch.is_grad_enabled()) or forward(*a, **k)
    got = doc_scalars(m, ids, window=5)
    assert grad_on == [False] * 5 and not got.requires_grad
    torch.testing.assert_close(got, cap.acts[0].detach(), atol=1e-5, rtol=1e-5)


def test_ablate_single_adapter_and_types(tiny_dir):
    _, path = tiny_dir
    m = randomize(apply_lora(Qwen2.from_pretrained(path)))
    idx = torch.randint(0, 97, (1, 7))
    full = m(idx).detach()
    with ablate(m, sites=[(1, "gate_proj")]) as chosen:
        assert [(c.layer, c.target) for c in chosen] == [(1, "gate_proj")]
        one = m(idx).detach()
        with capture(m) as cap:
            m(idx)
        assert (cap.acts[..., 7 * 1 + 0] == 0).all() and (cap.acts[..., 7 * 1 + 1] != 0).all()
    assert not torch.allclose(one, full)
    with ablate(m, types=["q_proj", "k_proj", "v_proj", "o_proj"]) as chosen:
        assert len(chosen) == 12
    with ablate(m, layers=[2]) as chosen:
        assert {c.layer for c in chosen} == {2} and len(chosen) == 7
    torch.testing.assert_close(m(idx), full)


def test_steer_changes_scalars_exactly(tiny_dir):
    _, path = tiny_dir
    m = randomize(apply_lora(Qwen2.from_pretrained(path)))
    idx = torch.randint(0, 97, (2, 6))
    with torch.no_grad(), capture(m) as cap:
        m(idx)
        base = cap.acts.clone()
        with steer(m, {(0, "q_proj"): 0.0}):
            cap.clear()
            m(idx)
            torch.testing.assert_close(cap.acts, base, atol=0, rtol=0)
        with steer(m, {(0, "q_proj"): 2.5}, positions=[1, 4]):
            cap.clear()
            m(idx)
        d = cap.acts - base
        col = 3  # layer 0, q_proj
        assert torch.allclose(d[:, [1, 4], col], torch.full((2, 2), 2.5))
        d[:, [1, 4], col] = 0
        assert d[..., [col + 1,
                       col + 2]].abs().max() == 0  # k, v read the same input as q: unchanged
        others = [t for t in range(6) if t not in (1, 4)]
        assert d[:, others, :7].abs().max() == 0  # layer 0 elsewhere: q only feeds its own position
        assert d[:, [1, 4], :3].abs().max() > 0  # layer 0's MLP (after attention) sees the change
    with steer(m, {(0, "gate_proj"): 1.0}):
        torch.testing.assert_close(m.generate([[1, 2]], 4),
                                   m.generate([[1, 2]], 4))  # reversible, deterministic
    assert all(a.u_hooks == [] for a in adapters(m))


def test_trainable_count_32b_on_meta():
    with torch.device("meta"):
        m = Qwen2(Qwen2Config(**QWEN2_5_32B))
    apply_lora(m, rank=1, alpha=16)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 8_388_608
    assert len(adapters(m)) == 448


def test_select_layers():
    assert select_layers(64, last_third=True) == list(range(43, 64))
    assert select_layers(10, start=2, end=8, stride=3) == [2, 5]
    assert select_layers(10, indices=[3, 1, 3]) == [1, 3]
    with pytest.raises(ValueError, match="not within 0..9"):
        select_layers(10, indices=[12])


# ---------------------------------------------------------------------------------------------
# round trips with PEFT and transformers


def test_our_adapter_loads_in_peft(pair, tmp_path):
    pm, ours, base_dir = pair
    peft = pytest.importorskip("peft")
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=base_dir)
    hf2 = hf_tiny()
    loaded = peft.PeftModel.from_pretrained(hf2, str(tmp_path / "ad"))
    idx = torch.randint(0, 97, (1, 13))
    torch.testing.assert_close(loaded(input_ids=idx).logits, ours(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [None, [0, 2]], ids=["all-layers", "subset"])
def test_peft_adapter_loads_in_rank1(tmp_path, layers):
    hf = hf_tiny()
    base_dir = save_hf(hf, tmp_path / "base")
    pm = peft_model(hf, layers=layers)
    pm.save_pretrained(str(tmp_path / "ad"))
    ours = Qwen2.from_pretrained(base_dir)
    load_adapter(ours, str(tmp_path / "ad"))
    assert sorted({l for l, _ in sites(ours)}) == (layers or [0, 1, 2])
    idx = torch.randint(0, 97, (1, 13))
    torch.testing.assert_close(ours(idx), pm(input_ids=idx).logits, atol=1e-5, rtol=1e-5)
    # and back out again: ours -> PEFT keeps the subset
    save_adapter(ours, tmp_path / "ad2")
    c = json.load(open(tmp_path / "ad2" / "adapter_config.json"))
    assert c["layers_to_transform"] == layers and c["r"] == 1 and c["use_rslora"] is True
    ours2 = load_adapter(Qwen2.from_pretrained(base_dir), str(tmp_path / "ad2"))
    assert ours2["target_modules"] == ALL7


def test_merged_export_loads_in_transformers(pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    pm, ours, _ = pair
    export_merged(ours, tmp_path / "merged", max_shard_bytes=20_000)
    files = os.listdir(tmp_path / "merged")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors")
                                                           for f in files) > 1
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "merged"))
    idx = torch.randint(0, 97, (1, 13))
    torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)
    assert not any(a.merged for a in adapters(ours))


# ---------------------------------------------------------------------------------------------
# bad adapters: the error names the key or field


@pytest.fixture
def saved(pair, tmp_path):
    pm, ours, base_dir = pair
    save_adapter(ours, tmp_path / "ad")
    return str(tmp_path / "ad"), base_dir


def _edit_config(ad, **kw):
    f = os.path.join(ad, "adapter_config.json")
    c = json.load(open(f))
    c.update(kw)
    json.dump(c, open(f, "w"))


@pytest.mark.parametrize("field,value,msg", [
    ("use_dora", True, "use_dora: True is not supported"),
    ("bias", "all", "bias: 'all': bias training is not supported"),
    ("fan_in_fan_out", True, "fan_in_fan_out: True is not supported"),
    ("target_modules", ["c_attn", "c_proj"], "target_modules: .*another architecture"),
    ("peft_type", "IA3", "peft_type: 'IA3', expected 'LORA'"),
])
def test_error_unsupported_config(saved, field, value, msg):
    ad, base_dir = saved
    _edit_config(ad, **{field: value})
    with pytest.raises(ValueError, match=msg):
        load_adapter(Qwen2.from_pretrained(base_dir), ad)


def _edit_weights(ad, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(ad, "adapter_model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_error_missing_key(saved):
    ad, base_dir = saved
    _edit_weights(ad,
                  lambda sd: sd.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"))
    with pytest.raises(ValueError, match=r"missing 1 adapter tensors.*layers.1.mlp.up_proj.lora_B"):
        load_adapter(Qwen2.from_pretrained(base_dir), ad)


def test_error_unexpected_key(saved):
    ad, base_dir = saved
    k = "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight"
    _edit_weights(ad, lambda sd: sd.update({k: torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"1 unexpected tensors.*layers.7.mlp.up_proj"):
        load_adapter(Qwen2.from_pretrained(base_dir), ad)


def test_error_wrong_shape_other_hidden_size(saved):
    ad, base_dir = saved
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(ad, lambda sd: sd.update({k: torch.zeros(1, 64)}))
    msg = r"q_proj.lora_A.weight has shape \(1, 64\), expected \(1, 48\).*another size"
    with pytest.raises(ValueError, match=msg):
        load_adapter(Qwen2.from_pretrained(base_dir), ad)


def test_error_non_finite(saved):
    ad, base_dir = saved
    k = "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"
    _edit_weights(ad, lambda sd: sd[k].fill_(float("nan")))
    with pytest.raises(ValueError,
                       match=r"layers.2.mlp.down_proj.lora_B.weight has non-finite values"):
        load_adapter(Qwen2.from_pretrained(base_dir), ad)


def test_error_no_config(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(Qwen2.from_pretrained(tiny_dir[1]), str(tmp_path))


def test_site_labels_round_trip_and_bad_labels_are_named():
    from lora import parse_site_label, site_label
    for l, t in [(0, "gate_proj"), (63, "o_proj"), (12, "down_proj")]:
        assert parse_site_label(site_label(l, t)) == (l, t)
    for bad in ("12.down_proj", "L12", "Lx.q_proj", "L3.mlp", "L3.q_proj.x"):
        with pytest.raises(ValueError, match="expected an adapter like"):
            parse_site_label(bad)
