"""The fused rank-1 CUDA ops: nvcc compiles them everywhere; on a GPU they match the reference path.

    python -m pytest tests/test_cuda_kernel.py          # GPU tests skip without CUDA
    python tests/test_cuda_kernel.py --compile-only     # just the nvcc check (what CI needs)
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def nvcc_compile(archs=(80, 90), out="/tmp/rank1_lora1_check.o"):
    """Compile csrc/lora1_cuda.cu with nvcc against the installed torch headers; returns nvcc's
    stderr.

    C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel ships c10/cuda headers without their generated
    cmake macro file (it only defines Windows export macros), so the check supplies none.
    """
    tdir = os.path.dirname(torch.__file__)
    cmd = ["nvcc", "-c", os.path.join(ROOT, "csrc", "lora1_cuda.cu"), "-o", out, "-std=c++20",
           "-O3",
           "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{tdir}/include",
           f"-I{tdir}/include/torch/csrc/api/include",
           f"-I{sysconfig.get_paths()['include']}", "--threads", "2"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
    return r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles_for_sm80_and_sm90():
    err = nvcc_compile()
    ours = [l for l in err.splitlines() if "lora1_cuda.cu" in l and "warning" in l.lower()]
    assert not ours, "warnings in our kernel:\n" + "\n".join(ours)
    r = subprocess.run(["g++", "-fsyntax-only", "-std=c++20",
                        f"-I{os.path.dirname(torch.__file__)}/include",
                        os.path.join(ROOT, "csrc", "lora1.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_reference_path_is_selected_without_cuda(monkeypatch):
    import lora
    monkeypatch.setattr(lora, "_IMPL", None)
    if not torch.cuda.is_available():
        assert lora.lora_impl() is None
    monkeypatch.setattr(lora, "_IMPL", None)
    monkeypatch.setenv("LORA_IMPL", "bogus")
    with pytest.raises(ValueError, match="LORA_IMPL='bogus'"):
        lora.lora_impl()
    monkeypatch.setattr(lora, "_IMPL", None)
    monkeypatch.setenv("LORA_IMPL", "ref")
    assert lora.lora_impl() is None


# ---------------------------------------------------------------------------------------------
# GPU: the fused ops against the reference autograd path


def _case(T, din, dout, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, din, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(dout, din, device="cuda", generator=g) / din ** 0.5).to(dtype)
    bias = torch.randn(dout, device="cuda", generator=g).to(dtype)
    A = (torch.randn(1, din, device="cuda", generator=g) / din ** 0.5).requires_grad_()
    B = torch.randn(dout, 1, device="cuda", generator=g).requires_grad_()
    gy = torch.randn(T, dout, device="cuda", generator=g).to(dtype)
    return x, W, bias, A, B, gy


def _run(fn, x, W, bias, A, B, gy):
    for t in (x, A, B):
        t.grad = None
    y, u = fn(x, W, bias, A, B, 16.0)
    y.backward(gy)
    return y.detach(), u.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,din,dout",
                         [(64, 128, 256), (37, 5120, 1024), (129, 1000, 77), (3, 27, 2053),
                          (1, 8, 8)])
def test_fused_matches_reference(dtype, T, din, dout):
    import lora_cuda
    from lora import lora_linear_ref
    args = _case(T, din, dout, dtype)
    ref = _run(lora_linear_ref, *args)
    got = _run(lora_cuda.lora_linear, *args)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, r, o in zip(("y", "u", "dx", "dA", "dB"), ref, got):
        scale = r.float().abs().max().item() or 1.0
        torch.testing.assert_close(o.float() / scale, r.float() / scale, **tol,
                                   msg=f"{name} differs")


@gpu
def test_fused_is_deterministic():
    import lora_cuda
    args = _case(4099, 1024, 3000, torch.bfloat16)
    a = _run(lora_cuda.lora_linear, *args)
    b = _run(lora_cuda.lora_linear, *args)
    for r, o in zip(a, b):
        assert torch.equal(r, o)


@gpu
def test_opcheck():
    import lora_cuda  # noqa: F401  (registers the ops)
    x, W, bias, A, B, gy = _case(33, 96, 40, torch.bfloat16)
    torch.library.opcheck(torch.ops.rank1.lora1_linear, (x.detach(), W, bias, A.detach().view(-1),
                                                         B.detach().view(-1), 16.0))
    u = torch.ops.rank1.lora1_linear(x.detach(), W, bias, A.detach().view(-1), B.detach().view(-1),
                                     16.0)[1]
    torch.library.opcheck(torch.ops.rank1.lora1_linear_backward,
                          (gy, x.detach(), W, u, A.detach().view(-1), B.detach().view(-1), 16.0,
                           True))


@gpu
def test_training_step_same_with_either_path(monkeypatch):
    import lora
    from model import Qwen2, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    results = []
    for impl in ("ref", "cuda"):
        monkeypatch.setattr(lora, "_IMPL", None)
        monkeypatch.setenv("LORA_IMPL", impl)
        torch.manual_seed(0)
        m = Qwen2(cfg).cuda()
        lora.apply_lora(m, verbose=False)
        for a in lora.adapters(m):
            torch.nn.init.normal_(a.lora_B, std=0.05)
        idx = torch.randint(0, 300, (2, 45), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(1))
        _, loss = m(idx, idx)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for r, c in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-6)


@gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None,
                    reason="compute-sanitizer is not installed")
def test_compute_sanitizer_finds_nothing():
    code = ("import sys; sys.path.insert(0, %r); import torch, lora_cuda; from "
            "tests.test_cuda_kernel import _case, _run;"
            "[_run(lora_cuda.lora_linear, *_case(T, i, o, torch.bfloat16))"
            " for T, i, o in [(37, 5120, 1024), (3, 27, 2053)]];"
            "torch.cuda.synchronize()") % ROOT
    r = subprocess.run(["compute-sanitizer", "--error-exitcode", "1", sys.executable, "-c", code],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        print(nvcc_compile() or "nvcc: compiled for sm_80 and sm_90 with no diagnostics")
    else:
        sys.exit(pytest.main([__file__, "-v"]))
