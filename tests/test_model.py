"""model.py against HF transformers' Qwen2 (the oracle), plus loss, generation and loading
errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, hf_tiny, save_hf
from model import QWEN2_5_32B, Qwen2, Qwen2Config

CONFIGS = {
    "gqa2-untied": dict(),
    "gqa4-tied": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                      tie_word_embeddings=True),
    "mha-odd": dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=6,
                    intermediate_size=53, vocab_size=61),
}


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_fp32(tmp_path, name, shard):
    hf = hf_tiny(**CONFIGS[name])
    path = save_hf(hf, tmp_path / "m", shard)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == (shard is not None)
    m = Qwen2.from_pretrained(path)
    assert m.cfg.tie_word_embeddings == CONFIGS[name].get("tie_word_embeddings", False)
    if m.cfg.tie_word_embeddings:
        assert m.lm_head.weight is m.model.embed_tokens.weight
    idx = torch.randint(0, m.cfg.vocab_size, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_logits_match_hf_bf16(tiny_dir):
    hf, path = tiny_dir
    m = Qwen2.from_pretrained(path, dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    hf16 = hf.to(torch.bfloat16)
    idx = torch.randint(0, m.cfg.vocab_size, (2, 19))
    with torch.no_grad():
        a, b = m(idx).float(), hf16(idx).logits.float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_dtype_none_keeps_checkpoint_dtype(tmp_path):
    hf = hf_tiny().to(torch.bfloat16)
    m = Qwen2.from_pretrained(save_hf(hf, tmp_path / "m"))
    assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["gqa2-untied", "gqa4-tied"])
def test_greedy_generate_matches_hf_batched(tmp_path, name):
    hf = hf_tiny(**CONFIGS[name])
    m = Qwen2.from_pretrained(save_hf(hf, tmp_path / "m"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, m.cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 3, 12)]
    ours = m.generate(prompts, max_new_tokens=32)
    P = max(map(len, prompts))
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(idx, attention_mask=am, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[:, P:]
    assert ours == ref.tolist()
    # prompts run in chunks of 5 or 2 tokens (a 32k-token prompt's prefill) decode the same
    for chunk in (5, 2):
        assert m.generate(prompts, max_new_tokens=32, prefill_chunk=chunk) == ours
    # and each row alone gives the same tokens (left padding changes nothing)
    for p, row in zip(prompts, ours):
        assert m.generate([p], max_new_tokens=32) == [row]


def test_chunked_prefill_equals_one_forward_fp64(tmp_path):
    """The cache a chunked prefill leaves, and the logits after it, are one forward's (fp64)."""
    from model import KVCache
    m = Qwen2.from_pretrained(save_hf(hf_tiny(), tmp_path / "m"), dtype=torch.float64)
    idx = torch.randint(0, m.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    whole = m(idx)
    cache = KVCache(m.cfg, 2, 11, torch.float64, "cpu")
    for s in range(0, 11, 4):
        h = m.forward_cached(idx[:, s:s + 4], torch.arange(s, min(s + 4, 11))[None], cache)
    torch.testing.assert_close(m.lm_head(h[:, -1]), whole[:, -1], rtol=1e-12, atol=1e-12)


def test_generate_stops_per_row_and_samples_reproducibly(tiny_dir):
    _, path = tiny_dir
    m = Qwen2.from_pretrained(path)
    prompts = [[1, 2, 3], [4, 5]]
    full = m.generate(prompts, 20)
    stop = full[0][4]  # the 5th token of row 0 becomes a stop id
    out = m.generate(prompts, 20, stop_ids=[stop])
    first = full[0].index(stop)
    assert out[0] == full[0][:first + 1]
    assert out[1] == (full[1][:full[1].index(stop) + 1] if stop in full[1] else full[1])
    s1 = m.generate(prompts, 10, temperature=1.0, top_p=0.9,
                    generator=torch.Generator().manual_seed(3))
    s2 = m.generate(prompts, 10, temperature=1.0, top_p=0.9,
                    generator=torch.Generator().manual_seed(3))
    assert s1 == s2 and all(len(r) == 10 for r in s1)


def test_top_p_keeps_only_the_nucleus():
    from model import _sample
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {_sample(logits, 1.0, 0.7, g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_loss_with_ignore_index_and_chunked_loss(tiny_dir):
    _, path = tiny_dir
    m = Qwen2.from_pretrained(path)
    idx = torch.randint(0, 97, (2, 15))
    tgt = torch.randint(0, 97, (2, 15))
    tgt[0, :5] = -100
    tgt[1, 9:] = -100
    logits, loss = m(idx, tgt)
    keep = tgt != -100
    manual = -torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[...,
                                                                                    0][keep].mean()
    torch.testing.assert_close(loss, manual)
    # the chunked sum (training path) equals the plain sum, in value and in gradient
    s = m(idx, tgt, chunk_size=7)
    torch.testing.assert_close(s, loss * keep.sum())
    ws = [m.model.layers[1].mlp.up_proj.weight, m.lm_head.weight]
    g1 = torch.autograd.grad(s * 0.5, ws)
    g2 = torch.autograd.grad(F.cross_entropy(m(idx).flatten(0, 1), tgt.flatten(),
                                             reduction="sum") * 0.5, ws)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_param_count_32b_on_meta():
    with torch.device("meta"):
        m = Qwen2(Qwen2Config(**QWEN2_5_32B))
    assert m.num_params() == 32_763_876_352  # docs/paper.md section H
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    assert layer == 487_605_248


def test_config_reads_old_and_new_hf_keys():
    old = Qwen2Config.from_dict({**TINY, "torch_dtype": "bfloat16", "rope_theta": 5.0})
    new = Qwen2Config.from_dict({**{k: v for k, v in TINY.items() if k != "rope_theta"},
                                 "dtype": "bfloat16",
                                 "rope_parameters": {"rope_type": "default",
                                                     "rope_theta": 5.0}, "extra": 1})
    assert old == new and old.rope_theta == 5.0 and old.torch_dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------
# bad input: each error names the problem


def test_error_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen2.from_pretrained(str(tmp_path))


def test_error_wrong_model_type(tiny_dir):
    _, path = tiny_dir
    f = os.path.join(path, "config.json")
    d = json.load(open(f))
    d["model_type"] = "llama"
    json.dump(d, open(f, "w"))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama', expected 'qwen2'"):
        Qwen2.from_pretrained(path)


def test_error_bad_config_values():
    with pytest.raises(ValueError,
                       match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        Qwen2Config.from_dict({**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"missing required keys \['hidden_size'\]"):
        Qwen2Config.from_dict({k: v for k, v in TINY.items() if k != "hidden_size"})


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_error_missing_tensor(tiny_dir):
    _, path = tiny_dir
    _rewrite(path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensors.*model.layers.1.mlp.up_proj.weight"):
        Qwen2.from_pretrained(path)


def test_error_extra_tensor(tiny_dir):
    _, path = tiny_dir
    _rewrite(path, lambda sd: sd.update({"model.layers.9.foo": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"1 unexpected tensors.*model.layers.9.foo"):
        Qwen2.from_pretrained(path)


def test_error_wrong_shape(tiny_dir):
    _, path = tiny_dir
    _rewrite(path, lambda sd: sd.update({"model.norm.weight": torch.ones(5)}))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(5,\), expected \(48,\)"):
        Qwen2.from_pretrained(path)


def test_error_truncated_safetensors(tiny_dir):
    _, path = tiny_dir
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        Qwen2.from_pretrained(path)
    open(f, "wb").write(b"garbage")
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        Qwen2.from_pretrained(path)


def test_error_index_names_missing_shard(tmp_path):
    path = save_hf(hf_tiny(), tmp_path / "m", "20KB")
    idx = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = idx["weight_map"]["model.norm.weight"]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=f"names shard {shard}, which is missing"):
        Qwen2.from_pretrained(path)


def test_error_no_weights(tmp_path):
    Qwen2Config(**TINY)  # valid
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "qwen2"}))
    with pytest.raises(FileNotFoundError,
                       match="neither model.safetensors nor model.safetensors.index.json"):
        Qwen2.from_pretrained(str(tmp_path))
