"""Test helpers: tiny random Qwen2 checkpoints written by HF transformers, a tiny tokenizer, fake
stores, a fake LLM server, headless Chromium, running scripts, and ../shared paths."""
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data import Tokenizer
from lora import SITE_ORDER
from store import ActivationStore, save_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
QWEN_TOK = os.path.join(SHARED_DATA, "qwen2.5-tokenizer")

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED_DATA),
                                  reason="../shared/data is not beside the checkout")

QWEN2_5_32B_JSON = """{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
 "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
 "num_attention_heads": 40, "num_key_value_heads": 8, "max_position_embeddings": 32768,
 "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": false,
 "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
 "sliding_window": 131072, "use_sliding_window": false, "max_window_layers": 70,
 "hidden_act": "silu"}"""

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)


def hf_tiny(seed=0, **overrides):
    """A random HF Qwen2ForCausalLM with non-trivial biases and norm weights (tested too)."""
    transformers = pytest.importorskip("transformers",
                                       reason="transformers (test-only oracle) is not installed")
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**TINY, **overrides})
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.5 if "norm" in n else 0.0, 0.1)
    return m


def save_hf(m, path, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    m.save_pretrained(str(path), **kw)
    return str(path)


def peft_model(hf, layers=None, seed=1):
    """hf wrapped by PEFT with rank-1 adapters on all 7 targets (alpha 16, rsLoRA), A and B random
    N(0, 0.2^2) so that they change the outputs."""
    peft = pytest.importorskip("peft", reason="peft (test-only oracle) is not installed")
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=1, lora_alpha=16, use_rslora=True,
                          lora_dropout=0.0, target_modules=list(SITE_ORDER),
                          layers_to_transform=layers)
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def peft_pair(hf, path):
    """(PEFT model, our model, base directory): hf saved to path and loaded by model.py, the same
    random adapters on both."""
    from lora import adapters, apply_lora
    from model import Qwen2
    ours = Qwen2.from_pretrained(save_hf(hf, path))
    pm = peft_model(hf)
    apply_lora(ours, rank=1, alpha=16, rslora=True, verbose=False)
    peft_sd = pm.state_dict()
    with torch.no_grad():
        for m in adapters(ours):
            m.lora_A.copy_(peft_sd[f"base_model.model.{m.name}.lora_A.default.weight"])
            m.lora_B.copy_(peft_sd[f"base_model.model.{m.name}.lora_B.default.weight"])
    return pm, ours, str(path)


def tiny_tokenizer(path):
    """A small BPE tokenizer trained in code, with the ChatML special tokens (no ../shared needed),
    saved as path/tokenizer.json."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["What is 12*3? The product is 36. Check answer think user assistant "
                            "system"] * 50,
                           trainer)
    tk.save(str(path / "tokenizer.json"))
    return Tokenizer(str(path))


def tiny_env(d, adapters=(("adapter", 0),), silent_layer=None):
    """The suite's tiny environment in directory d: d/model (a random HF Qwen2 of 300 tokens with
    tiny_tokenizer) and, for each (name, seed), d/name, a rank-1 adapter on it whose B vectors are
    random (N(0, 0.3^2), so that it changes the outputs); silent_layer's adapters are left zero."""
    from lora import adapters as adapters_of
    from lora import apply_lora
    from lora_files import save_adapter
    from model import Qwen2
    save_hf(hf_tiny(vocab_size=300), d / "model")
    tiny_tokenizer(d / "model")
    for name, seed in adapters:
        m = apply_lora(Qwen2.from_pretrained(str(d / "model")), verbose=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a in adapters_of(m):
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.3)
                if a.layer == silent_layer:
                    a.lora_B.zero_()
        save_adapter(m, d / name)
    return d


def script_cmd(script, args, nproc=1):
    """The command that runs one of the project's scripts: python, or torchrun with nproc
    processes (on a port of this test process's own)."""
    path = os.path.join(ROOT, script)
    if nproc == 1:
        return [sys.executable, path, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master-port", str(29100 + os.getpid() % 800), path, *map(str, args)]


def run_script(script, args, nproc=1, check=True):
    """Run a project script to the end; with check, fail the test (showing its output) unless it
    succeeded."""
    r = subprocess.run(script_cmd(script, args, nproc), capture_output=True, text=True, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def kill_when(proc, condition, timeout=120, sig=signal.SIGKILL):
    """Send sig (SIGKILL: the fault-injection tests' kill -9) to a running command as soon as
    condition() holds (polled every 10 ms); with SIGKILL, check that it was killed rather than
    finished. Returns the exit status."""
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, "the command finished before the kill point"
        assert time.time() - t0 < timeout, "the kill point never came"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait()
    assert sig != signal.SIGKILL or proc.returncode == -9
    return proc.returncode


class FakeLLM(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions server. FakeLLM.script says what the next requests
    get, in order: an HTTP status, "null" (content null), "garbage" (a body that is not JSON) or
    "slow" (no reply for FakeLLM.delay seconds). When the script is empty it answers well:
    explanations, a judge that picks the snippets marked <<X>>, rubric class 1, and the category
    result_formulation / final_answer (an unlisted one for features whose text says UNLISTED)."""
    script, requests, delay = [], [], 1.0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeLLM.requests.append(body)
        what = FakeLLM.script.pop(0) if FakeLLM.script else None
        if isinstance(what, int):
            self.send_response(what)
            self.end_headers()
            return
        if what == "slow":
            time.sleep(FakeLLM.delay)
        text = body["messages"][-1]["content"]
        system = body["messages"][0]["content"]
        if system.startswith("You are given an explanation"):
            lines = [l for l in text.split("\n") if l[:1].isdigit()]
            content = json.dumps([int(l.split(".")[0]) for l in lines if "<<X>>" in l])
        elif system.startswith("Classify this feature"):
            content = '{"classification": 1, "classification_reasoning": "all fit"}'
        elif system.startswith("You sort features"):
            cat = "arithmetic" if "UNLISTED" in text else "result_formulation"
            content = json.dumps({"category": cat, "subcategory": "final_answer"})
        else:
            content = "Fires on the letter X."
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
        if what == "null":
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]})
        elif what == "garbage":
            out = '{"choices": [{"mess'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            self.wfile.write(out.encode())
        except BrokenPipeError:  # the client gave up waiting ("slow")
            pass

    def log_message(self, *a):
        pass


# a real headless browser for the dashboard tests (.ci/run installs Debian's chromium)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dom(url):
    """(DOM after scripts ran, browser log) of a page in headless Chromium."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--enable-logging=stderr", "--v=0",
                        "--virtual-time-budget=3000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    return r.stdout, r.stderr


def fake_store(path, doc_lengths, d=3, docs_per_shard=2, seed=0, ties=True, values=None):
    """A store in collect.py's layout with random scalars (rounded so that ties are common), or
    with the rows of `values` (N, d), cut into documents of doc_lengths."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    shards, doc, row = [], 0, 0
    d = d if values is None else values.shape[1]
    for s0 in range(0, len(doc_lengths), docs_per_shard):
        lens = doc_lengths[s0:s0 + docs_per_shard]
        if values is None:
            acts = rng.normal(size=(sum(lens), d)).astype(np.float32)
            acts = np.round(acts * 2) / 2 if ties else acts
        else:
            acts, row = np.asarray(values[row:row + sum(lens)], dtype=np.float32), row + sum(lens)
        ids = rng.integers(0, 50, sum(lens)).astype(np.int32)
        docs, off = [], 0
        for n in lens:
            docs.append(dict(doc=doc, source=f"row {doc}", start=off, length=n))
            off, doc = off + n, doc + 1
        side = dict(tokens=off, docs=docs)
        save_shard(str(path), len(shards), dict(acts=acts, ids=ids), side)  # collect.py's writer
        shards.append(side)
    sites = ([[0, "gate_proj"], [0, "q_proj"], [1, "down_proj"]][:d] if d <= 3 else
             [[i // 7, SITE_ORDER[i % 7]] for i in range(d)])
    idx = dict(shape=[sum(doc_lengths), d], dtype="float32", sites=sites, rank=1, shards=shards,
               documents=doc)
    json.dump(idx, open(os.path.join(path, "index.json"), "w"))
    return ActivationStore(str(path))
