"""The fused rank-1 CUDA ops: nvcc compiles them everywhere; on a GPU they match the reference path.

    python -m pytest tests/test_cuda_kernel.py          # GPU tests skip without CUDA
    python tests/test_cuda_kernel.py --compile-only     # just the nvcc check (what CI needs)
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def jit_nvcc_flags():
    """The flags torch.utils.cpp_extension.load (lora_cuda.py) gives nvcc, less the include paths
    and architectures: what users compile is what CI compiles."""
    return ["-DTORCH_EXTENSION_NAME=rank1_lora1", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-O3", "-std=c++20"]


def nvcc_compile(archs=(80, 90), out="/tmp/rank1_lora1_check.o", mode="-c"):
    """Compile csrc/lora1_cuda.cu with nvcc and the JIT build's flags against the installed torch
    headers (mode -ptx: to PTX, for the first arch); returns nvcc's stderr.

    C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel ships c10/cuda headers without their generated
    cmake macro file (it only defines Windows export macros), so the check supplies none.
    """
    tdir = os.path.dirname(torch.__file__)
    cmd = ["nvcc", mode, os.path.join(ROOT, "csrc", "lora1_cuda.cu"), "-o", out,
           *jit_nvcc_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{tdir}/include",
           f"-I{tdir}/include/torch/csrc/api/include",
           f"-I{sysconfig.get_paths()['include']}", "--threads", "2"]
    for a in archs if mode == "-c" else archs[:1]:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"] if mode == "-c" else [f"-arch=sm_{a}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
    return r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_nvcc_compiles_for_sm80():
    """With the JIT build's flags (no half/bf16 operator overloads, relaxed constexpr): no warning
    in our file, and kernels for the op's three dtypes only (no double kernels). sm_90 goes to PTX
    in the next test (and was built and run on an H200); one arch here keeps the suite short."""
    out = "/tmp/rank1_lora1_check.o"
    err = nvcc_compile(archs=(80,), out=out)
    ours = [l for l in err.splitlines() if "lora1_cuda.cu" in l and "warning" in l.lower()]
    assert not ours, "warnings in our kernel:\n" + "\n".join(ours)
    symbols = subprocess.run(["nm", "-C", out], capture_output=True, text=True).stdout
    types = set(re.findall(r"\w+_kernel<([^,>]+)", symbols))
    assert types == {"float", "c10::Half", "c10::BFloat16"}, sorted(types)
    r = subprocess.run(["g++", "-fsyntax-only", "-std=c++20",
                        f"-I{os.path.dirname(torch.__file__)}/include",
                        os.path.join(ROOT, "csrc", "lora1.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.slow
def test_gpu_bench_runs_end_to_end_on_cpu():
    """bench/gpu.sh --cpu: the GPU benchmark's every section on tiny shapes, so it cannot rot."""
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--cpu"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for title in ("(a) rank-1 op", "(b) training step", "(c) greedy decode", "(d) plain autograd",
                  "(e) the op past 2^31 elements", "targets"):
        assert f"### {title}" in r.stdout, r.stdout[-2000:]
    assert "| fused path bitwise deterministic | True |" in r.stdout
    assert "| past 2^31 elements, every error within its bound | True |" in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_check_bounds_each_element_and_fails_small_wrong_outputs(dtype):
    """bench/gpu.py's check past 2^31 elements judges each output element against its own bound:
    the op's outputs pass; outputs wrong by a little fail: the rank-1 term of y or dx 1% off (the
    scale 16.16 for 16), u, dA or dB 0.1% off, y without its bias."""
    from bench.gpu import large_errors, large_inputs, run_op
    inputs = large_inputs(300, 64, 24, dtype, torch.device("cpu"))
    good = run_op(*inputs)
    assert max(large_errors(*inputs, good).values()) <= 1
    x, W, bias, a, b, g = inputs
    off = run_op(*inputs, s=16.16)
    nobias = run_op(x, W, torch.zeros_like(bias), a, b, g)
    wrong = {"y": (off[0], *good[1:]), "dx": (*good[:2], off[2], *good[3:]),
             "u": (good[0], good[1] * 1.001, *good[2:]),
             "dA": (*good[:3], good[3] * 1.001, good[4]),
             "dB": (*good[:4], good[4] * 1.001), "bias": (nobias[0], *good[1:])}
    for name, out in wrong.items():
        err = large_errors(*inputs, out)
        assert max(err.values()) > 1, (name, err)


def test_gpu_bench_sections_have_time_limits_and_write_json(tmp_path):
    """A table over its time limit is cut, recorded as such in its JSON file, and the next one
    runs; a table that fails is recorded too."""
    import json
    import time

    from bench.gpu import run_section

    def slow():
        time.sleep(5)
        return "never"
    t0 = time.time()
    assert run_section("a", slow, 1, str(tmp_path)) == (None, False)
    assert time.time() - t0 < 4
    assert run_section("b", lambda: 1 / 0, 1, str(tmp_path)) == (None, False)
    assert run_section("c", lambda: {"x": 1}, 1, str(tmp_path)) == ({"x": 1}, True)
    got = {k: json.load(open(tmp_path / f"{k}.json")) for k in "abc"}
    assert got["a"]["status"].startswith("SectionTimeout") and got["a"]["result"] is None
    assert got["b"]["status"].startswith("ZeroDivisionError")
    assert got["c"]["status"] == "done" and got["c"]["result"] == {"x": 1}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_fwd_kernel_loads_adapter_vectors_16_bytes_at_a_time():
    """In the vectorised forward kernels (bf16/fp16: 8 elements per load, fp32: 4), a and b come in
    as float4 loads: no scalar fp32 global load is left (the bf16 kernel once had 48)."""
    nvcc_compile(archs=(90,), out="/tmp/rank1_lora1_check.ptx", mode="-ptx")
    ptx = open("/tmp/rank1_lora1_check.ptx").read()
    kernels = {m.group(1): m.group(2) for m in re.finditer(
        r"\.entry\s+(\S*fwd_kernel\S*?)\((.*?)\n}", ptx, re.S)}
    vectorised = {k: v for k, v in kernels.items() if re.search(r"Li[48]EE", k)}
    assert len(vectorised) == 3, sorted(kernels)
    for name, body in vectorised.items():
        assert re.findall(r"ld\.global(?:\.nc)?\.v4\.f32", body), name
        assert not re.findall(r"ld\.global(?:\.nc)?\.f32", body), name


def test_bench_counts_the_rank1_traffic_once():
    """bench_lora / gpu.py's bytes of the rank-1 part: forward x + 2 out (u, y read and written),
    backward g once + x + 2 in (dA, dx read and written): (4 in + 3 out) T bytes per element."""
    from bench.timing import rank1_bytes
    assert rank1_bytes(3, 5, 2, 2) == (4 * 3 + 3 * 5) * 2 * 2 == 108
    assert rank1_bytes(3, 5, 2, 2, backward=False) == (3 + 2 * 5) * 2 * 2


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


@gpu
def test_a_no_grad_decode_step_takes_plain_ops(monkeypatch):
    """Under no_grad, DECODE_ROWS rows or fewer (a decode step) never reach the fused training op
    or its autograd wrapper, and give its values; more rows (a prefill) still take the fused op."""
    import lora
    x, W, bias, A, B, _ = _case(lora.DECODE_ROWS, 256, 512, torch.bfloat16)
    want = lora.lora_linear_ref(x, W, bias, A, B, 16.0)
    calls = []
    monkeypatch.setattr(lora, "lora_linear_ref", lambda *a: calls.append(1))
    monkeypatch.setattr(lora, "lora_impl", lambda: lambda *a: calls.append(1))
    with torch.no_grad():
        y, u = lora.lora_linear(x, W, bias, A, B, 16.0)
        assert not calls
        lora.lora_linear(torch.cat([x, x]), W, bias, A, B, 16.0)
        assert calls == [1]
    torch.testing.assert_close(y, want[0].detach(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(u, want[1].detach(), atol=1e-4, rtol=1e-4)


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
@pytest.mark.parametrize("T,din,dout", [(0, 64, 32), (5, 0, 32), (5, 64, 0)])
def test_fused_zero_tokens_and_widths(T, din, dout):
    """No tokens or a zero width: what the reference path gives, no SIGFPE in the backward."""
    import lora_cuda
    from lora import lora_linear_ref
    for fn in (lora_linear_ref, lora_cuda.lora_linear):
        x = torch.randn(2, T, din, device="cuda", requires_grad=True)
        W, b = torch.randn(dout, din, device="cuda"), torch.randn(dout, device="cuda")
        A = torch.randn(1, din, device="cuda", requires_grad=True)
        B = torch.randn(dout, 1, device="cuda", requires_grad=True)
        y, u = fn(x, W, b, A, B, 16.0)
        (y.sum() + u.sum()).backward()
        torch.cuda.synchronize()
        assert y.shape == (2, T, dout) and u.shape == (2, T, 1) and x.grad.shape == x.shape
        assert A.grad.shape == A.shape and B.grad.shape == B.shape


@gpu
def test_fused_u_gradient_and_misaligned_adapter_vectors():
    """A loss through u reaches A and x as on the reference path; a and b at an odd offset take
    the scalar loads and give the same result to rounding (the scalar loop sums x . a in another
    order: on an H200, bitwise equality failed)."""
    import lora_cuda
    from lora import lora_linear_ref
    x, W, bias, A, B, gy = _case(33, 256, 128, torch.bfloat16)
    got = []
    for fn in (lora_linear_ref, lora_cuda.lora_linear):
        for t in (x, A, B):
            t.grad = None
        y, u = fn(x, W, bias, A, B, 16.0)
        ((y.float() * gy.float()).sum() + (u * 3.0).sum()).backward()
        got.append((x.grad.float(), A.grad.clone(), B.grad.clone()))
    for r, o in zip(*got):
        torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2)
    store = torch.empty(1 + 256 + 128, device="cuda")  # a at offset 1 float: not 16-byte aligned
    a, b = store[1:257], store[257:]
    a.copy_(A.detach().view(-1)), b.copy_(B.detach().view(-1))
    y1, u1 = torch.ops.rank1.lora1_linear(x.detach(), W, bias, a, b, 16.0)
    y2, u2 = torch.ops.rank1.lora1_linear(x.detach(), W, bias, A.detach().view(-1).clone(),
                                          B.detach().view(-1).clone(), 16.0)
    torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y2)  # bf16: one rounding step apart at most


@gpu
def test_fused_checks_devices_and_runs_under_autocast():
    import lora_cuda
    from lora import lora_linear
    x, W, bias, A, B, gy = _case(9, 64, 48, torch.float32)
    u = torch.ops.rank1.lora1_linear(x.detach(), W, bias, A.detach().view(-1),
                                     B.detach().view(-1), 16.0)[1]
    with pytest.raises(RuntimeError, match="g and u must be on x's device"):
        torch.ops.rank1.lora1_linear_backward(gy, x.detach(), W, u.cpu(), A.detach().view(-1),
                                              B.detach().view(-1), 16.0, False)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 weights, bf16 autocast
        y1, u1 = lora_cuda.lora_linear(x, W, bias, A, B, 16.0)
        y2, u2 = lora_linear(x, W, bias, A, B, 16.0)
    ref_y, ref_u = lora_cuda.lora_linear(x.to(torch.bfloat16), W.to(torch.bfloat16),
                                         bias.to(torch.bfloat16), A, B, 16.0)
    assert y1.dtype == y2.dtype == torch.bfloat16 and u1.dtype == torch.float32
    assert torch.equal(y1, ref_y) and torch.equal(u1, ref_u) and torch.equal(y2, ref_y)
    y1.float().sum().backward()
    assert A.grad is not None and x.grad.dtype == torch.float32


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
