"""
Qwen2 (the architecture of Qwen2.5-*-Instruct), written directly in PyTorch.

    from model import Qwen2
    model = Qwen2.from_pretrained("/models/Qwen2.5-32B-Instruct", torch.bfloat16, "cuda")
    logits = model(idx)                                   # (B, T, vocab_size)
    new = model.generate([[151644, 872, 198]], max_new_tokens=32, stop_ids=[151645])

Notable choices:
- Parameter names are exactly the HF names (model.layers.N.self_attn.q_proj, ...): HF checkpoints
  load strictly with no key map, and adapters export to PEFT by adding a prefix.
- RMSNorm in fp32, cast back before the weight multiply; RoPE in HF's half-split layout with cos and
  sin in the activation dtype: what makes the logits match transformers' to 1e-5 in fp32.
- RoPE tables are recomputed from the positions on every forward, not buffers: nothing to
  re-initialise after building on the meta device, and to(bfloat16) cannot round the frequencies.
- The training forward has no cache. forward_cached() runs tokens after those a preallocated KV
  cache holds (gpt-fast style): generate() for left-padded batches, collect.py for long documents.
- Two optional hooks serve the analyses and cost nothing unset: Attention.pattern_hook (the
  attention written out, its pattern passed through the hook: analyses.py's attention KL and
  attribution) and RMSNorm.scale_hook (the norm's scale passed through it: attribution's
  detached norms).
"""
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import checkpoint_tensors
from common import DTYPES, read_json
from data import Tokenizer

# -----------------------------------------------------------------------------
# config


@dataclass
class Qwen2Config:
    """Fields are HF config.json keys; unknown keys in a config.json are ignored."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0  # HF's default; every real Qwen2.5 config.json sets 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    torch_dtype: str | None = None
    model_type: str = "qwen2"
    use_sliding_window: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Qwen2Config.{name} must be a positive integer, got {v!r}")
        if self.model_type != "qwen2":
            raise ValueError(f"model_type must be 'qwen2', got {self.model_type!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=true is not supported (Qwen2.5 ships with false)")
        if self.torch_dtype is not None and self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d, source="config"):
        """Build from a config.json dict; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "qwen2") != "qwen2":
            raise ValueError(f"{source}: model_type is {d['model_type']!r}, expected 'qwen2'")
        arch = d.get("architectures") or ["Qwen2ForCausalLM"]
        if "Qwen2ForCausalLM" not in arch:  # e.g. a Mistral config that omits model_type
            raise ValueError(f"{source}: architectures is {arch}, expected Qwen2ForCausalLM")
        # transformers >= 5 writes `dtype` and `rope_parameters`, not `torch_dtype`/`rope_theta`
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError(f"{source}: RoPE scaling {rope or d.get('rope_scaling')} is not "
                             "supported")
        if "rope_theta" in rope and "rope_theta" not in d:
            d["rope_theta"] = rope["rope_theta"]
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path):
        f = os.path.join(path, "config.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model "
                                    "directory)")
        return cls.from_dict(read_json(f), source=f)

    def to_hf_dict(self):
        """config.json content that transformers (4.x and 5.x) and vLLM load as Qwen2ForCausalLM."""
        d = asdict(self)
        d.update(architectures=["Qwen2ForCausalLM"], sliding_window=None,
                 max_window_layers=self.num_hidden_layers, attention_dropout=0.0,
                 initializer_range=0.02, use_cache=True)
        return d


# Qwen2.5-32B-Instruct's config.json (docs/paper.md section H), for dry runs and parameter counts.
QWEN2_5_32B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                   num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                   torch_dtype="bfloat16")

# -----------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """`scale_hook`, when set, maps the fp32 (fp64 for an fp64 model) scale rsqrt(mean(x^2) + eps)
    (..., 1) to the one used: analyses.attribute detaches it (a linearised norm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.scale_hook = None

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32, cast back, then scaled in the input dtype (HF's order)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 for an fp64 model
        if self.scale_hook is None:
            return self.weight * F.rms_norm(xf, (x.shape[-1],), eps=self.eps).to(x.dtype)
        r = self.scale_hook(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.weight * (xf * r).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions (..., T) int -> cos, sin (..., T, head_dim) in `dtype`, HF half-split layout."""
    even = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (theta ** (even / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); cos/sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """`pattern_hook`, when set, makes the attention explicit: softmax(q k^T / sqrt(hd)) in fp32
    (fp64 for an fp64 model),
    (B, n_head, T_query, T_key), is passed through it and the result weights the values
    (analyses.py: attention_kl records the patterns, attribute detaches them). Unset: SDPA."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, D, bias=False)
        self.pattern_hook = None

    def forward(self, x, cos, sin, mask=None, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # without a mask: causal when the queries start at position 0; a decode step sees all keys
        causal = mask is None and (cache is None or cache.len == 0)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, nkv, L, hd): everything cached so far
        if self.pattern_hook is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_kv != self.n_head)
        else:
            y = self.explicit(q, k, v, mask, causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


    def explicit(self, q, k, v, mask, causal):
        """SDPA's result written out, with the pattern passed through pattern_hook."""
        rep = self.n_head // self.n_kv  # query head h reads kv head h // rep (SDPA's enable_gqa)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        up = torch.promote_types(q.dtype, torch.float32)
        s = (q.to(up) @ k.to(up).transpose(-2, -1)) / math.sqrt(self.hd)
        Tq, Tk = s.shape[-2:]
        if causal:
            s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool, device=s.device)
                              .triu(Tk - Tq + 1), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = self.pattern_hook(s.softmax(-1))
        return p.to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpoint = False  # activation checkpointing (train.py): recompute in backward

    def forward(self, x, cos, sin, mask=None, cache=None, layer_idx=0):
        # checkpointing inside forward keeps FSDP's hooks on this module out of the recomputation
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, cache,
                                                     layer_idx, use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache, layer_idx)

    def _forward(self, x, cos, sin, mask, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """The decoder stack: HF's `model.` submodule."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, idx, positions=None, mask=None, cache=None, rope=None):
        """idx (B, T) -> final hidden states (B, T, D). positions (B, T) or None for 0..T-1; rope:
        optional (cos, sin) tables indexed by position (generate() computes them once)."""
        x = self.embed_tokens(idx)
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
        if rope is None:
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        else:
            cos, sin = rope[0][positions], rope[1][positions]
        if cos.dim() == 3:  # per-row positions: (B, T, hd) -> (B, 1, T, hd) to broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)


PREFILL_CHUNK = 2048  # prompt tokens per forward in generate()


def prefill_bytes(cfg, tokens, cache_len, dtype):
    """An estimate of the activations one row's no-grad forward of `tokens` tokens holds at its
    peak: one layer's hidden states, q/k/v and the MLP's three intermediate tensors, the attention
    mask against a cache of cache_len positions and the fp32 logits of the last position.
    Attention scores are not counted: on a GPU, SDPA's fused kernels never hold them."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    return tokens * (4 * D + 3 * I) * dtype.itemsize + tokens * cache_len + cfg.vocab_size * 4 * 2


class KVCache:
    """Preallocated keys/values for all layers: (n_layers, B, n_kv, max_len, hd) each."""

    @staticmethod
    def row_bytes(cfg, max_len, dtype):
        """The bytes one row of the cache takes (keys and values of every layer): 8.6 GB for
        Qwen2.5-32B at 32,768 positions in bf16."""
        return (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * max_len
                * dtype.itemsize)

    def __init__(self, cfg, batch_size, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.len = 0  # positions filled; advanced by the caller after all layers ran

    def update(self, layer, k, v):
        s, T = self.len, k.shape[2]
        self.k[layer, :, :, s:s + T] = k
        self.v[layer, :, :, s:s + T] = v
        return self.k[layer, :, :, :s + T], self.v[layer, :, :, :s + T]


# -----------------------------------------------------------------------------
# the causal LM


class Qwen2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std=0.02, generator=None):
        """From-scratch init (HF's): linear and embedding weights N(0, std), biases 0, norms 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, idx, targets=None, ignore_index=-100, chunk_size=None):
        """idx (B, T) -> logits (B, T, V); with targets (B, T): (logits, mean CE over targets !=
        ignore_index); with targets and chunk_size (training): only the summed CE, so the (T, V)
        fp32 logits never exist at once (12 GB at T = 20,000 and V = 152,064)."""
        h = self.model(idx)
        if targets is not None and chunk_size:
            return LinearCrossEntropy.apply(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                            ignore_index, chunk_size)
        logits = self.lm_head(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=ignore_index)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # -------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Load an HF model directory (config.json + model.safetensors or index + shards), built
        on the meta device and assigned the loaded tensors, so a checkpoint is never materialised
        twice. dtype=None keeps the checkpoint's torch_dtype."""
        cfg = Qwen2Config.from_pretrained(path)
        if dtype is None and cfg.torch_dtype is not None:
            dtype = DTYPES[cfg.torch_dtype]
        with torch.device("meta"):
            model = cls(cfg)
        sd = dict(checkpoint_tensors(path, model.checkpoint_shapes(), dtype, device))
        if cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def hf_tensors(self):
        """The (name, tensor) pairs an HF checkpoint of this model holds: the state dict, less
        adapter tensors (lora_*, saved apart) and lm_head.weight when it is tied to the embedding
        (HF does not save it then)."""
        for k, v in self.state_dict().items():
            if ".lora_" not in k and not (self.cfg.tie_word_embeddings and k == "lm_head.weight"):
                yield k, v

    def checkpoint_shapes(self):
        return {k: tuple(v.shape) for k, v in self.hf_tensors()}

    # -------------------------------------------------------------------------
    # generation

    def forward_cached(self, idx, positions, cache, valid=None, rope=None):
        """idx (B, T): the next T tokens after the cache.len positions `cache` holds -> final hidden
        states (B, T, D); appends their keys and values and advances cache.len. positions (B, T)
        or (1, T): RoPE positions; valid (B, L) bool: the key positions that are real tokens (rows
        left-padded), None when all are; rope: optional (cos, sin) tables indexed by position."""
        start, T = cache.len, idx.shape[1]
        mask = None  # SDPA's causal path for a first window, a decode step sees every cached key
        if valid is not None or (start > 0 and T > 1):
            mask = _attn_mask(valid, start, T, idx.device)
        h = self.model(idx, positions, mask, cache, rope)
        cache.len += T
        return h

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(),
                 generator=None, prefill_chunk=PREFILL_CHUNK):
        """Batched generation with a KV cache: each row's new tokens, as lists. prompts: token-id
        lists of any lengths (left-padded here) or a (B, T) tensor. Greedy at temperature 0, else
        temperature + top_p sampling from `generator`. A row stops after (and with) a stop id.
        Prompts run prefill_chunk tokens at a time, so that a 32k-token prompt (s1's answer
        phase re-reads prompt and thinking) needs the activations of a chunk, not of all of it."""
        if torch.is_tensor(prompts):
            prompts = prompts.tolist()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        L = P + max_new_tokens
        idx = torch.zeros(B, P, dtype=torch.long, device=device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=device)  # key positions of real tokens
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, device=device)
            valid[b, P - len(p):] = True
        lens = valid[:, :P].sum(1)  # (B,)
        positions = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)
        dtype = self.lm_head.weight.dtype
        cache = KVCache(self.cfg, B, L, dtype, device)
        rope = rope_cos_sin(torch.arange(L, device=device), self.cfg.head_dim, self.cfg.rope_theta,
                            dtype)
        padded = None if valid[:, :P].all() else valid
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for s in range(0, P - prefill_chunk, prefill_chunk):  # all of the prompt but its last chunk
            self.forward_cached(idx[:, s:s + prefill_chunk], positions[:, s:s + prefill_chunk],
                                cache, padded, rope)
        idx, positions = idx[:, cache.len:], positions[:, cache.len:]
        for step in range(max_new_tokens):
            h = self.forward_cached(idx, positions, cache, padded, rope)
            logits = self.lm_head(h[:, -1]).float()  # (B, V)
            if not torch.isfinite(logits).all():  # NaN would sample token 0 without a word
                raise ValueError(f"generate: non-finite logits at new token {step + 1} (NaN or "
                                 "inf in the weights or activations; try --dtype float32)")
            nxt = _sample(logits, temperature, top_p, generator)
            out.append(nxt)
            done |= torch.isin(nxt, stop)
            if done.all():
                break
            idx, positions = nxt[:, None], (lens + step)[:, None]
        toks = torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]
        stops = set(stop.tolist())
        return [_cut_at_stop(row, stops) for row in toks]


class LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of logits = h W^T against targets, chunk_size rows at a time. Each chunk's
    gradient (softmax - onehot) becomes dh (and dW when the head trains) while its logits are at
    hand: the logits are computed once, as in a plain forward, and never held beyond a chunk."""

    @staticmethod
    def forward(ctx, h, W, targets, ignore_index, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_w else None
        for s in range(0, h.shape[0], chunk_size):
            hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
            logits = (hc @ W.t()).float()  # (C, V)
            valid = tc != ignore_index
            tsafe = tc.masked_fill(~valid, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, tsafe[:, None])[:, 0]) * valid).sum()
            if need_h or need_w:
                g = torch.softmax(logits, dim=-1)  # d(loss)/d(logits): softmax - onehot, valid rows
                g[torch.arange(len(tc), device=g.device), tsafe] -= 1.0
                g *= valid[:, None]
                if need_h:
                    dh[s:s + chunk_size] = (g.to(W.dtype) @ W).to(h.dtype)
                if need_w:
                    dW += g.t() @ hc.float()
        ctx.save_for_backward(dh, dW)
        ctx.w_dtype = W.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dW = ctx.saved_tensors
        return (dh * grad.to(dh.dtype) if dh is not None else None,
                (dW * grad).to(ctx.w_dtype) if dW is not None else None, None, None, None)


def _attn_mask(valid, start, T, device):
    """(B or 1, 1, T, start+T) bool for queries at start..start+T-1: causal, padding keys hidden
    (valid None: none), and every query sees itself (so the rows of padding stay finite)."""
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    if valid is None:
        return (k <= q)[None, None]
    return ((k <= q) & (valid[:, None, :start + T] | (k == q))).unsqueeze(1)


def _sample(logits, temperature, top_p, generator):
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _cut_at_stop(row, stops):
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row


def load_tokenizer(model_dir, tokenizer_dir=None):
    """The tokenizer of a model directory (or of tokenizer_dir), checked to make only ids that the
    model's embedding has rows for."""
    tok = Tokenizer(tokenizer_dir or model_dir)
    return tok.check_fits(Qwen2Config.from_pretrained(model_dir).vocab_size, model_dir)
