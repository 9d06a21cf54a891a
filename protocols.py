"""
The generation protocols of the evaluation (docs/paper.md section C): how a model is asked.

s1 (the fine-tunes): chat prompt + `<|im_start|>think`; think until `<|im_start|>` (or
<|im_end|>) or the thinking budget (auto = max context - prompt - len(FINAL_ANSWER) - 100, s1's
formula); then `<|im_start|>answer` (with `\nFinal Answer:` when the budget ran out) and the
answer until <|im_end|>, in all the context thinking left. `wait` N replaces an early end of
thinking by "Wait" up to N times (budget forcing). plain (s1's runs of Qwen2.5-32B-Instruct): the
chat prompt and one answer up to the context limit, graded on the whole output. completion: a
template filled with the question, no chat turn (the text a base model saw in pretraining).

    from protocols import GenConfig, generate
    outs = generate(model, tok, questions, GenConfig(protocol="s1", max_context=32768))
"""
from dataclasses import dataclass

from common import check_numbers
from data import ANSWER, FINAL_ANSWER, THINK, chat_prompt, s1_prompt
from model import PREFILL_CHUNK, KVCache, prefill_bytes

PROTOCOLS = ("s1", "plain", "completion")

# -----------------------------------------------------------------------------
# how many questions fit on a device at once

BATCH_CAP = 64  # beyond this a decode step gains little, and a benchmark's tail waits longer
PROMPT_SPREAD = 1024  # rows are left-padded to the longest input of their call, and a call takes
#                       inputs within this many tokens of one another (generate_grouped): a row's
#                       cache holds at most --max-context + PROMPT_SPREAD positions
RESERVE = 2 * 2**30  # kept free for the CUDA context, the allocator's slack and the sampling


def row_bytes(mcfg, dtype, max_context):
    """What one question in a batch costs on the device beyond the weights: its KV cache row at
    the context (plus PROMPT_SPREAD) and the activations of a prefill chunk."""
    n = max_context + PROMPT_SPREAD
    return KVCache.row_bytes(mcfg, n, dtype) + prefill_bytes(mcfg, PREFILL_CHUNK, n, dtype)


def auto_batch(mcfg, dtype, max_context, free_bytes, n_jobs):
    """(batch, why): as many questions as fit in free_bytes (the device's free memory with the
    weights loaded) less RESERVE, at most BATCH_CAP and the number of questions. A ValueError when
    not even one fits."""
    row = row_bytes(mcfg, dtype, max_context)
    fit = int((free_bytes - RESERVE) // row)
    gb = lambda b: f"{b / 1e9:.3g} GB"
    why = (f"{gb(free_bytes)} free with the weights loaded, {gb(RESERVE)} kept back, "
           f"{gb(row)} per question (KV cache for {max_context + PROMPT_SPREAD:,} positions "
           f"{gb(KVCache.row_bytes(mcfg, max_context + PROMPT_SPREAD, dtype))} + a "
           f"{PREFILL_CHUNK:,}-token prefill)")
    if fit < 1:
        raise ValueError(f"--max-context {max_context}: one question needs {gb(row)} beyond the "
                         f"weights and {gb(free_bytes - RESERVE)} are free; lower --max-context "
                         "or use a device with more memory")
    return min(fit, BATCH_CAP, max(n_jobs, 1)), why


@dataclass
class GenConfig:
    """How eval.py generates: the protocol, its budgets, budget forcing and sampling."""
    protocol: str = "s1"          # s1: think, then answer; plain: one chat answer (s1's base runs);
    #                               completion: --template filled with the question, no chat turn
    template: str = "{question}"  # completion's prompt text ("Problem: {question}\nSolution:\n")
    max_context: int = 32768      # prompt + all generated tokens (s1: max_gen_toks, the context)
    thinking_budget: int = 0      # 0: auto = max_context - prompt - len(FINAL_ANSWER) - reserve
    answer_reserve: int = 100     # what auto leaves for the answer at least (s1's 100)
    max_answer_tokens: int = 0    # a cap on the answer (0: all that thinking left, as s1)
    wait: int = 0                 # budget forcing: an early end of thinking -> "Wait", N times
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0            # sample from the smallest set of tokens of this much mass

    RANGES = dict(max_context="positive", top_p="unit", thinking_budget="nonnegative",
                  answer_reserve="nonnegative", max_answer_tokens="nonnegative",
                  wait="nonnegative", temperature="nonnegative")

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, "
                             f"got {self.protocol!r}")
        check_numbers(self)
        if "{question}" not in self.template:
            raise ValueError(f"--template must contain {{question}}, got {self.template!r}")


def generate(model, tok, questions, cfg, generator=None):
    """Answers to a batch of questions under cfg.protocol: one dict per question."""
    if cfg.protocol == "s1":
        return s1_generate(model, tok, questions, cfg, generator)
    if cfg.protocol == "plain":
        texts = [chat_prompt(q) for q in questions]
    else:  # completion: the text a base model saw in pretraining, e.g. a textbook's page
        texts = [cfg.template.replace("{question}", q) for q in questions]
    return plain_generate(model, tok, [tok.encode(t) for t in texts], cfg, generator)


def generate_grouped(model, prompts, budgets, cfg, stops, generator=None):
    """model.generate over the prompts, in groups whose lengths lie within PROMPT_SPREAD of one
    another: the rows of one call share a cache as long as its longest prompt plus its largest
    budget (context - shortest prompt), so a 300-token and a 31,000-token input together (s1's
    answer phase after a short and a long thinking) would need a cache of twice the context per
    row. Each group keeps the rows' order; outputs come back in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups = [[order[0]]]
    for i in order[1:]:
        if len(prompts[i]) - len(prompts[groups[-1][0]]) > PROMPT_SPREAD:
            groups.append([])
        groups[-1].append(i)
    out = [None] * len(prompts)
    for g in sorted(sorted(g) for g in groups):
        rows = model.generate([prompts[i] for i in g], max(budgets[i] for i in g),
                              temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stops,
                              generator=generator)
        for i, o in zip(g, rows):
            out[i] = o
    return out


def plain_generate(model, tok, prompts, cfg, generator=None):
    """One generation from each prompt (token ids) up to the context limit (or
    --max-answer-tokens); the answer is read from the whole output. With the chat template this is
    s1's base-model protocol."""
    budgets = [cfg.max_context - len(p) for p in prompts]
    if cfg.max_answer_tokens:
        budgets = [min(b, cfg.max_answer_tokens) for b in budgets]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens fills --max-context")
    outs = generate_grouped(model, prompts, budgets, cfg, [tok.im_end, tok.eot], generator)
    res = []
    for o, budget in zip(outs, budgets):
        o = o[:budget]
        ended = bool(o) and o[-1] in (tok.im_end, tok.eot)
        res.append(dict(generation=tok.decode(o[:-1] if ended else o), thinking_tokens=0,
                        answer_tokens=len(o), thinking_truncated=False, answer_truncated=not ended))
    return res


def s1_generate(model, tok, questions, cfg, generator=None):
    """Two-phase s1 generation for a batch of questions (cfg: a GenConfig); a dict per question.

    With P the prompt (chat template + think marker) and F = FINAL_ANSWER, in tokens:
        thinking budget (auto) = max_context - |P| - |F| - answer_reserve    (s1's "auto")
        answer budget = max_context - |P| - |thinking| - |answer head|, capped by max_answer_tokens
    so the answer may use all that thinking left of the context, as s1's second call may."""
    stops = [tok.im_start, tok.im_end, tok.eot]
    prompts = [tok.encode(s1_prompt(q)) for q in questions]
    reserve = len(tok.encode(FINAL_ANSWER)) + cfg.answer_reserve
    auto = cfg.thinking_budget <= 0
    budgets = [cfg.max_context - len(p) - reserve if auto else cfg.thinking_budget for p in prompts]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no thinking budget "
                         "within --max-context")
    think = [[] for _ in prompts]
    natural = [False] * len(prompts)
    waits_left = [cfg.wait] * len(prompts)
    todo = list(range(len(prompts)))
    wait_ids = tok.encode("Wait")
    while todo:
        outs = generate_grouped(model, [prompts[i] + think[i] for i in todo],
                                [budgets[i] - len(think[i]) for i in todo], cfg, stops, generator)
        nxt = []
        for i, o in zip(todo, outs):
            o = o[:budgets[i] - len(think[i])]  # a batch shares one length: cut each to its budget
            stopped = bool(o) and o[-1] in stops
            think[i] += o[:-1] if stopped else o
            natural[i] = stopped
            if stopped and waits_left[i] > 0 and len(think[i]) + len(wait_ids) < budgets[i]:
                waits_left[i] -= 1
                think[i] += wait_ids  # budget forcing: suppress the end of thinking, continue
                nxt.append(i)
        todo = nxt
    heads = []
    for i in range(len(prompts)):
        text = tok.decode(think[i])
        heads.append(ANSWER if natural[i] else ("" if text.endswith("\n") else "\n") + FINAL_ANSWER)
    inputs = [p + t + tok.encode(h) for p, t, h in zip(prompts, think, heads)]
    room = [cfg.max_context - len(x) for x in inputs]
    if cfg.max_answer_tokens:
        room = [min(r, cfg.max_answer_tokens) for r in room]
    if min(room) < 1:
        raise ValueError("a prompt and its thinking leave no room for the answer within "
                         "--max-context (set --thinking-budget lower)")
    answers = generate_grouped(model, inputs, room, cfg, [tok.im_end, tok.eot], generator)
    res = []
    for i, a in enumerate(answers):
        a = a[:room[i]]  # a batch shares one length: cut each to its room
        ended = bool(a) and a[-1] in (tok.im_end, tok.eot)
        gen = THINK + tok.decode(think[i]) + heads[i] + tok.decode(a[:-1] if ended else a)
        res.append(dict(generation=gen, thinking_tokens=len(think[i]), answer_tokens=len(a),
                        thinking_truncated=not natural[i], answer_truncated=not ended))
    return res
