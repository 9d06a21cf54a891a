"""
The generation protocols of the evaluation (docs/paper.md section C): how a model is asked.

s1 (the fine-tunes): chat prompt + `<|im_start|>think`; think until `<|im_start|>` (or
<|im_end|>) or the thinking budget (auto = max context - prompt - len(FINAL_ANSWER) - 100, s1's
formula); then `<|im_start|>answer` (with `\nFinal Answer:` when the budget ran out) and the
answer until <|im_end|>, in all the context thinking left. `wait` N replaces an early end of
thinking by "Wait" up to N times (budget forcing). plain (s1's runs of Qwen2.5-32B-Instruct): the
chat prompt and one answer up to the context limit, graded on the whole output. completion: a
template filled with the question, no chat turn (the text a base model saw in pretraining).
Each protocol is written as engine programs (engine.py), one per question, so its phases run per
slot and a slot takes the next question as soon as an answer ends.

    from protocols import GenConfig, generate, stream
    cfg = GenConfig(protocol="s1", max_context=32768)
    outs = generate(model, tok, questions, cfg)                 # in the questions' order
    for i, out in stream(model, tok, questions, cfg, slots=8):  # as each one finishes
        ...
"""
from dataclasses import dataclass

from common import check_numbers
from data import ANSWER, FINAL_ANSWER, THINK, chat_prompt, s1_prompt
from engine import Engine, Turn
from model import PREFILL_CHUNK, KVCache, prefill_bytes

PROTOCOLS = ("s1", "plain", "completion")

# -----------------------------------------------------------------------------
# how many questions fit on a device at once

BATCH_CAP = 64  # beyond this a decode step gains little
RESERVE = 2 * 2**30  # kept free for the CUDA context, the allocator's slack and the sampling


def slot_bytes(mcfg, dtype, max_context):
    """What one slot of the engine costs on the device beyond the weights: its KV cache row at
    the context, its new tokens and a step's fp32 logits (four copies: logits, log-softmax, noise,
    the nucleus sort)."""
    return (KVCache.row_bytes(mcfg, max_context, dtype) + 8 * (max_context + 1)
            + 4 * 4 * mcfg.vocab_size)


def auto_batch(mcfg, dtype, max_context, free_bytes, n_jobs):
    """(slots, why): as many slots as fit in free_bytes (the device's free memory with the weights
    loaded) less RESERVE and one prefill chunk (prefills run one slot at a time), at most
    BATCH_CAP and the number of questions. A ValueError when not even one fits."""
    slot = slot_bytes(mcfg, dtype, max_context)
    prefill = prefill_bytes(mcfg, PREFILL_CHUNK, max_context, dtype)
    fit = int((free_bytes - RESERVE - prefill) // slot)
    gb = lambda b: f"{b / 1e9:.3g} GB"
    why = (f"{gb(free_bytes)} free with the weights loaded, {gb(RESERVE)} kept back, "
           f"{gb(prefill)} for a {PREFILL_CHUNK:,}-token prefill, {gb(slot)} per slot (its KV "
           f"cache for {max_context:,} positions)")
    if fit < 1:
        raise ValueError(f"--max-context {max_context}: one question needs "
                         f"{gb(slot + prefill)} beyond the weights and "
                         f"{gb(free_bytes - RESERVE)} are free; lower --max-context or use a "
                         "device with more memory")
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


def generate(model, tok, questions, cfg, seeds=None, slots=BATCH_CAP, compile=None):
    """Answers to the questions under cfg.protocol, in their order: one dict per question."""
    out = [None] * len(questions)
    for i, res in stream(model, tok, questions, cfg, slots, seeds, compile):
        out[i] = res
    return out


def stream(model, tok, questions, cfg, slots, seeds=None, compile=None):
    """(i, answer to questions[i]) as each one finishes, `slots` questions decoding at a time on
    the engine (engine.py); seeds[i] (default i) seeds question i's samples."""
    if not questions:
        return
    programs, max_len = programs_for(tok, questions, cfg)
    eng = Engine(model, min(slots, len(questions)), max_len, cfg.temperature, cfg.top_p,
                 compile=compile)
    yield from eng.run(programs, seeds)


def programs_for(tok, questions, cfg):
    """(an engine program per question under cfg.protocol, the longest sequence one can make)."""
    if cfg.protocol == "s1":
        return s1_programs(tok, questions, cfg)
    if cfg.protocol == "plain":
        texts = [chat_prompt(q) for q in questions]
    else:  # completion: the text a base model saw in pretraining, e.g. a textbook's page
        texts = [cfg.template.replace("{question}", q) for q in questions]
    return plain_programs(tok, [tok.encode(t) for t in texts], cfg)


def plain_programs(tok, prompts, cfg):
    """One generation from each prompt (token ids) up to the context limit (or
    --max-answer-tokens); the answer is read from the whole output. With the chat template this is
    s1's base-model protocol."""
    budgets = [cfg.max_context - len(p) for p in prompts]
    if cfg.max_answer_tokens:
        budgets = [min(b, cfg.max_answer_tokens) for b in budgets]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens fills --max-context")
    ends = (tok.im_end, tok.eot)

    def program(prompt, budget):
        o = yield Turn(prompt, budget, ends)
        ended = o[-1] in ends
        return dict(generation=tok.decode(o[:-1] if ended else o), thinking_tokens=0,
                    answer_tokens=len(o), thinking_truncated=False, answer_truncated=not ended)
    return [program(p, b) for p, b in zip(prompts, budgets)], cfg.max_context


def s1_programs(tok, questions, cfg):
    """s1's two phases for each question (cfg: a GenConfig), as engine programs. With P the prompt
    (chat template + think marker) and F = FINAL_ANSWER, in tokens:
        thinking budget (auto) = max_context - |P| - |F| - answer_reserve    (s1's "auto")
        answer budget = max_context - |P| - |thinking| - |answer head|, capped by max_answer_tokens
    so the answer may use all that thinking left of the context, as s1's second call may."""
    prompts = [tok.encode(s1_prompt(q)) for q in questions]
    reserve = len(tok.encode(FINAL_ANSWER)) + cfg.answer_reserve
    auto = cfg.thinking_budget <= 0
    budgets = [cfg.max_context - len(p) - reserve if auto else cfg.thinking_budget for p in prompts]
    if min(budgets) < 1:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no thinking budget "
                         "within --max-context")
    programs = [s1_program(tok, p, b, cfg) for p, b in zip(prompts, budgets)]
    # a --thinking-budget beyond the context may still end early enough to answer
    return programs, max(cfg.max_context, max(len(p) + b for p, b in zip(prompts, budgets)))


def s1_program(tok, prompt, budget, cfg):
    """Think until a stop (<|im_start|>, <|im_end|>) or the budget; a stop with `wait` left
    becomes "Wait" and thinking goes on; then the answer head (with FINAL_ANSWER after a cut) and
    the answer until <|im_end|>, in the room thinking left."""
    stops, ends = (tok.im_start, tok.im_end, tok.eot), (tok.im_end, tok.eot)
    wait_ids, waits = tok.encode("Wait"), cfg.wait
    think, feed = [], prompt
    while True:
        o = yield Turn(feed, budget - len(think), stops)
        natural = o[-1] in stops
        think += o[:-1] if natural else o
        if not (natural and waits > 0 and len(think) + len(wait_ids) < budget):
            break
        waits -= 1
        think += wait_ids  # budget forcing: suppress the end of thinking, continue
        feed = wait_ids
    text = tok.decode(think)
    head = ANSWER if natural else ("" if text.endswith("\n") else "\n") + FINAL_ANSWER
    head_ids = tok.encode(head)
    room = cfg.max_context - len(prompt) - len(think) - len(head_ids)
    if cfg.max_answer_tokens:
        room = min(room, cfg.max_answer_tokens)
    if room < 1:
        raise ValueError("a prompt and its thinking leave no room for the answer within "
                         "--max-context (set --thinking-budget lower)")
    # the last thinking token is not in the cache yet, unless a stop (dropped) ended thinking
    a = yield Turn(([] if natural else o[-1:]) + head_ids, room, ends)
    ended = a[-1] in ends
    return dict(generation=THINK + text + head + tok.decode(a[:-1] if ended else a),
                thinking_tokens=len(think), answer_tokens=len(a),
                thinking_truncated=not natural, answer_truncated=not ended)
