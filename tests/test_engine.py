"""engine.py against today's path (model.generate, checked against HF generate in test_model.py)
and against a full forward: tokens and logits in fp64, whatever the slots, their mates and refills;
s1's phases against an oracle that re-reads each phase's whole input; the compiled step without
graph breaks or recompiles; no host sync inside a block of steps; the sampler's distribution."""
import itertools
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
from data import ANSWER, FINAL_ANSWER, THINK, Tokenizer, s1_prompt
from engine import Engine, Turn, gumbel, pick
from helpers import hf_tiny, save_hf, tiny_env
from lora import adapters, apply_lora
from model import Qwen2
from protocols import GenConfig, s1_programs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Qwen2 in fp64 with a random rank-1 adapter, unmerged."""
    m = Qwen2.from_pretrained(save_hf(hf_tiny(), tmp_path_factory.mktemp("m") / "m"),
                              dtype=torch.float64)
    m = apply_lora(m, verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
    return m


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def run(model, programs, slots, **kw):
    out = {}
    for i, res in Engine(model, slots, kw.pop("max_len", 64), **kw).run(programs):
        out[i] = res
    return [out[i] for i in range(len(programs))]


def program(p, n, stops=()):
    return (yield Turn(p, n, tuple(stops)))


LENGTHS = (7, 3, 12, 5, 30, 1)


def test_tokens_equal_todays_path_whatever_the_slots(model):
    """Greedy tokens equal model.generate's (at batch 1 and left-padded together), for 1 to 6
    slots and any number of steps between checks: with fewer slots than prompts, slots are
    refilled, and a prompt's tokens do not depend on its slot, its mates or its turn in line."""
    prompts = prompts_of(LENGTHS)
    want = [model.generate([p], 24)[0] for p in prompts]
    assert model.generate(prompts, 24) == want
    for slots, n in itertools.product((1, 2, 6), (1, 5, 32)):
        assert run(model, [program(p, 24) for p in prompts], slots, check_every=n) == want
    order = [4, 0, 5, 2, 1, 3]
    got = run(model, [program(prompts[i], 24) for i in order], 2, check_every=3)
    assert got == [want[i] for i in order]
    stop = want[0][5]  # a token the first row makes: rows end after it, as model.generate's do
    stopped = model.generate(prompts, 24, stop_ids=[stop])
    assert stopped[0] == want[0][:want[0].index(stop) + 1]
    assert run(model, [program(p, 24, [stop]) for p in prompts], 4, check_every=4) == stopped


def test_logits_equal_a_full_forward_over_the_sequence(model):
    """Every logit the engine computed for a slot (prefill and decode, 2 slots refilled over 4
    prompts) equals the full causal forward's logit at that position: an fp64 model, its adapter's
    scalars in fp32 (as they are trained), so to fp32's rounding."""
    prompts = prompts_of((9, 2, 17, 4), seed=2)
    trace = []
    outs = run(model, [program(p, 10) for p in prompts], 2, check_every=3, trace=trace)
    seen = {i: [] for i in range(len(prompts))}
    for logits, owners in trace:
        for b, i in enumerate(owners):
            if i is not None and len(seen[i]) < len(outs[i]):
                seen[i].append(logits[b if logits.shape[0] > 1 else 0])
    assert max(sum(o is not None for o in owners) for _, owners in trace) == 2
    with torch.no_grad():
        for i, (p, o) in enumerate(zip(prompts, outs)):
            full = model(torch.tensor([p + o]))[0, len(p) - 1:-1].float()
            torch.testing.assert_close(torch.stack(seen[i]), full, atol=1e-5, rtol=0)


def test_a_turn_continues_the_cache_as_a_fresh_prefill_of_the_whole_sequence(model):
    """A program's second turn (its first turn's tokens but the last, then new ones fed) gives
    the tokens of one turn fed the whole sequence; budgets are exact and a stop ends early."""
    p = prompts_of((11,), seed=3)[0]

    def two_turns():
        a = yield Turn(p, 6)
        b = yield Turn(a[-1:] + [5, 6], 4)
        return a, b
    (a, b), = run(model, [two_turns()], 1, check_every=2)
    assert len(a) == 6 and len(b) == 4
    assert model.generate([p + a + [5, 6]], 4)[0] == b
    with pytest.raises(ValueError, match="exceed the 20 positions"):
        run(model, [program(p, 10)], 1, max_len=20)


def oracle_s1(model, tok, question, cfg):
    """s1's protocol as an earlier version ran it: each phase a fresh model.generate over its
    whole input (prompt, thinking so far, head), nothing carried in a cache."""
    stops = [tok.im_start, tok.im_end, tok.eot]
    prompt = tok.encode(s1_prompt(question))
    budget = cfg.max_context - len(prompt) - len(tok.encode(FINAL_ANSWER)) - cfg.answer_reserve
    think, waits = [], cfg.wait
    while True:
        o = model.generate([prompt + think], budget - len(think), stop_ids=stops)[0]
        natural = bool(o) and o[-1] in stops
        think += o[:-1] if natural else o
        if not (natural and waits and len(think) + len(tok.encode("Wait")) < budget):
            break
        waits -= 1
        think += tok.encode("Wait")
    text = tok.decode(think)
    head = ANSWER if natural else ("" if text.endswith("\n") else "\n") + FINAL_ANSWER
    x = prompt + think + tok.encode(head)
    room = min(cfg.max_context - len(x), cfg.max_answer_tokens or 10**9)
    a = model.generate([x], room, stop_ids=[tok.im_end, tok.eot])[0]
    ended = bool(a) and a[-1] in (tok.im_end, tok.eot)
    return THINK + text + head + tok.decode(a[:-1] if ended else a)


@pytest.mark.parametrize("stop_bias", [0.0, 30.0], ids=["budget-cut", "natural-stops-and-wait"])
def test_s1_phases_on_the_engine_equal_a_fresh_prefill_per_phase(tmp_path, stop_bias):
    """s1 on the engine (2 slots for 3 questions) writes the generations of the oracle above:
    thinking cut by its budget, or (<|im_start|> made likely) ended naturally and forced on twice
    by "Wait"."""
    d = tiny_env(tmp_path, adapters=())
    tok = Tokenizer(str(d / "model"))
    m = Qwen2.from_pretrained(str(d / "model"), dtype=torch.float64)
    with torch.no_grad():
        m.lm_head.weight[tok.im_start] *= 1 + stop_bias
    qs = ["What is 12*3?", "Check", "The product"]
    P = max(len(tok.encode(s1_prompt(q))) for q in qs)
    cfg = GenConfig(max_context=P + len(tok.encode(FINAL_ANSWER)) + 5 + 30, answer_reserve=5,
                    max_answer_tokens=7, wait=2)
    programs, max_len = s1_programs(tok, qs, cfg)
    got = {i: r["generation"] for i, r in Engine(m, 2, max_len, check_every=4).run(programs)}
    want = [oracle_s1(m, tok, q, cfg) for q in qs]
    assert [got[i] for i in range(3)] == want
    assert all(("Wait" in w) == (stop_bias > 0) for w in want)


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device (a scalar read, a data-dependent
    shape); Tensor.tolist, which reads memory without dispatching on a CPU, is counted apart."""
    SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "masked_select"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] in self.SYNCS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_no_host_sync_inside_a_block_of_steps(model, monkeypatch, temperature):
    """Inside a block of steps nothing reads the device (counted over every op, and over every
    tolist, which reads a CPU tensor without dispatching); between two blocks the host reads the
    slots' state once, and the finished slots' tokens once."""
    programs = [program(p, 20) for p in prompts_of(LENGTHS)]
    events = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (events.append("t"), real_tolist(t))[1])
    eng = Engine(model, 3, 64, temperature, 0.9, check_every=8)
    counter = SyncCounter()
    real_step = eng.step

    def counted():
        events.append("s")
        with counter:
            return real_step()
    eng.step = counted
    outs = dict(eng.run(programs))
    assert counter.n == 0 and len(outs) == 6
    assert re.fullmatch(r"(s{1,8}tt?)+", "".join(events)), "".join(events)


def test_the_compiled_step_has_no_graph_break_and_compiles_once_per_bucket(model, monkeypatch):
    """torch.compile(fullgraph=True) traces the step, an unmerged adapter included, and a whole
    generation that crosses cache buckets compiles one graph per bucket it used, none again; its
    tokens are the eager engine's."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(engine, "MIN_BUCKET", 8)
    prompts = prompts_of((3, 1, 5, 2))
    eager = run(model, [program(p, 40) for p in prompts], 3, check_every=2)
    used = []
    real_bucket = Engine._bucket
    monkeypatch.setattr(Engine, "_bucket", lambda self, n: (used.append(real_bucket(self, n)),
                                                            used[-1])[1])
    torch._dynamo.reset()
    counters.clear()
    got = run(model, [program(p, 40) for p in prompts], 3, check_every=2,
              compile=dict(backend="eager"))
    assert got == eager
    assert set(used) == {8, 16, 32, 64}
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]
    torch._dynamo.reset()


def test_gumbel_sampling_follows_the_nucleus_distribution():
    """pick() at temperature 1: over 20,000 seeds the frequencies of 5 tokens are softmax's
    (a chi-square test, p > 0.001), a top_p nucleus drops the tail, and the noise depends on
    (seed, position) alone."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 20000
    seeds, pos = torch.arange(n), torch.full((n,), 7)
    got = pick(logits.expand(n, 5), 1.0, 1.0, seeds, pos)
    p = logits.softmax(-1)[0]
    counts = torch.bincount(got, minlength=5).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 18.47  # the 0.999 quantile of chi-square with 4 degrees of freedom
    top = pick(logits.expand(n, 5), 1.0, 0.8, seeds, pos)  # nucleus {0, 1, 2}: mass 0.857
    assert set(top.tolist()) == {0, 1, 2}
    q = p[:3] / p[:3].sum()
    assert torch.bincount(top, minlength=3)[:3].double().div(n).sub(q).abs().max() < 0.015
    a = gumbel(torch.tensor([3, 3, 4]), torch.tensor([5, 6, 5]), 11)
    assert torch.equal(a, gumbel(torch.tensor([3, 3, 4]), torch.tensor([5, 6, 5]), 11))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert math.isfinite(a.abs().max().item())
