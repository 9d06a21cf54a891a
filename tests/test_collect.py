"""collect.py: the stored scalars equal capture() of one full forward, resume, two processes, and
the store's checks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from batchtopk import SAE
from helpers import ROOT, run_script, tiny_env
from store import ActivationStore

PY = sys.executable


# --- collection --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    d = tiny_env(tmp_path_factory.mktemp("collect"))
    rows = [dict(question=f"What is {i}+{i}?",
                 deepseek_thinking_trajectory=f"{i} plus {i} is {2 * i}. " * (1 + i % 3),
                 deepseek_attempt=str(2 * i)) for i in range(5)]
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def collect(env, out, *extra, nproc=1):
    return run_script("collect.py", ["--model", env / "model", "--adapter", env / "adapter",
                                     "--data", env / "rows.jsonl", "--out", out,
                                     "--docs-per-shard", 2, "--window", 16, *extra], nproc)


def test_collection_equals_capture_resumes_and_matches_two_processes(model_env, tmp_path):
    from data import Tokenizer
    from lora import capture, sites
    from lora_files import load_adapter
    from model import Qwen2
    collect(model_env, tmp_path / "a")
    st = ActivationStore(str(tmp_path / "a"))
    idx = st.index
    assert idx["shape"][1] == 21 and len(idx["shards"]) == 3 and idx["documents"] == 5
    m = Qwen2.from_pretrained(str(model_env / "model"))
    load_adapter(m, str(model_env / "adapter"), verbose=False)
    assert idx["sites"] == [list(s) for s in sites(m)]
    tok = Tokenizer(str(model_env / "model"))
    from data import read_rows, s1_example
    rows, _ = read_rows(str(model_env / "rows.jsonl"))
    for sh_i, sh in enumerate(idx["shards"]):
        acts, toks = st.shard(sh_i), st.tokens(sh_i)
        for doc in sh["docs"]:
            ids = s1_example(rows[doc["doc"]], tok)[0]
            with torch.no_grad(), capture(m) as cap:
                m(torch.tensor([ids]))
            seg = slice(doc["start"], doc["start"] + doc["length"])
            assert toks[seg].tolist() == ids
            np.testing.assert_allclose(acts[seg], cap.acts[0].numpy(), atol=1e-5,
                                       rtol=1e-5)  # windows of 16 == one forward
    # interrupted: the last shard never finished -> a re-run redoes it and nothing else
    os.remove(tmp_path / "a" / "shard-00002.json")
    os.remove(tmp_path / "a" / "acts-00002.npy")
    before = os.path.getmtime(tmp_path / "a" / "acts-00000.npy")
    first = np.load(tmp_path / "a" / "tokens-00002.npy")
    collect(model_env, tmp_path / "a")
    assert os.path.getmtime(tmp_path / "a" / "acts-00000.npy") == before
    assert np.array_equal(np.load(tmp_path / "a" / "tokens-00002.npy"), first)
    st2 = ActivationStore(str(tmp_path / "a"))
    np.testing.assert_array_equal(st2.load_all().numpy(), st.load_all().numpy())
    # two processes: the same shards
    collect(model_env, tmp_path / "b", nproc=2)
    sb = ActivationStore(str(tmp_path / "b"))
    assert [s["docs"] for s in sb.index["shards"]] == [s["docs"] for s in idx["shards"]]
    np.testing.assert_allclose(sb.load_all().numpy(), st.load_all().numpy(), atol=1e-6)
    # and the SAE trains on the store from the CLI
    r = subprocess.run([PY, "sae.py", "train", "--acts", str(tmp_path / "a"),
                        "--out", str(tmp_path / "sae"), "--expansion", "2", "--k", "4",
                        "--batch-size", "32", "--epochs", "2", "--holdout", "0.2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    met = json.load(open(tmp_path / "sae" / "metrics.json"))["heldout"]
    assert np.isfinite(met["fvu"]) and met["l0"] > 0
    assert SAE.load(str(tmp_path / "sae")).d_in == 21


def test_store_errors(model_env, tmp_path):
    collect(model_env, tmp_path / "s")
    # a shard whose size does not match the index
    f = tmp_path / "s" / "acts-00001.npy"
    arr = np.load(f)
    np.save(f, arr[:-3])
    with pytest.raises(ValueError, match=r"acts-00001.npy: its checksum does not match"):
        ActivationStore(str(tmp_path / "s")).shard(1)
    with pytest.raises(ValueError, match=r"acts-00001.npy: holds .* but index.json says"):
        ActivationStore(str(tmp_path / "s"), verify=False).shard(1)
    # NaN in a stored shard, named with its row
    arr[5, 2] = np.nan
    np.save(f, arr)
    with pytest.raises(ValueError, match=r"acts-00001.npy: row 5 holds NaN or Inf"):
        ActivationStore(str(tmp_path / "s"), verify=False).load_all()
    # an index from another layout
    idx = json.load(open(tmp_path / "s" / "index.json"))
    idx["sites"] = idx["sites"][:7]
    json.dump(idx, open(tmp_path / "s" / "index.json", "w"))
    with pytest.raises(ValueError,
                       match="layout of 7 sites x rank 1 does not match the stored width 21"):
        ActivationStore(str(tmp_path / "s"))
