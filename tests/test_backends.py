"""Backend registry, the info command, and the build script's toolkit discovery."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from uniformerv2_kernels import backends, selection

# Triton defines its own library's jit functions when first imported, interpreted or not as TRITON_INTERPRET
# says then. Tests below set it to 0 for a moment: Triton must be imported under the session's setting
# before, or every later interpreted kernel that calls one of them (tl.sigmoid in the FFN's epilogue) fails.
backends._triton_import_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_is_always_available():
    assert backends.select("op", [torch.zeros(2)], backend="reference") == "reference"


def test_auto_prefers_the_first_backend_that_runs(monkeypatch):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    cpu = [torch.zeros(2)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.select("op", cpu) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select("op", cpu) == "triton"
    assert backends.select("op", cpu, implemented=("reference",)) == "reference"
    assert backends.select("op", cpu, extra_reasons={"triton": ["dtype float64 not supported"]}) == "reference"


def test_environment_override_and_per_call_priority(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(backends.ENV_BACKEND, "reference")
    assert backends.select("op", [torch.zeros(2)]) == "reference"
    assert backends.select("op", [torch.zeros(2)], backend="triton") == "triton"
    monkeypatch.setenv(backends.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="UNIFORMERV2_BACKEND='fast'"):
        backends.select("op", [torch.zeros(2)])


def test_unavailable_backend_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailableError) as info:
        backends.select("my_op", [torch.zeros(2)], backend="triton", cuda_ops=("x",))
    msg = str(info.value)
    assert "my_op: backend 'triton' cannot run" in msg
    assert "TRITON_INTERPRET is not set" in msg
    assert "cuda:" in msg and "reference: available" in msg
    with pytest.raises(ValueError, match="not a backend"):
        backends.select("op", [torch.zeros(2)], backend="numpy")


def test_cuda_backend_needs_cuda_tensors():
    reasons = backends.generic_reasons("cuda", [torch.zeros(2)], cuda_ops=("quick_gelu",))
    assert any("CUDA tensors" in r for r in reasons)


def test_info_prints_the_backend_table():
    out = subprocess.run([sys.executable, "-m", "uniformerv2_kernels.info"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    for name in ("cuda", "triton", "reference", "spatial attention", "torch", "Triton backend's fused GEMMs"):
        assert name in out
    # the inductor backend: its state, its row in every op's entry (opt-in, with why) and the decision rule
    assert "\n  inductor " in out and "decision (auto_inductor)" in out
    assert out.count("      inductor  any float input [opt-in: ") == len(selection.OPS)


def _load_setup_module():
    """setup.py's helpers without running setup()."""
    src = open(os.path.join(ROOT, "setup.py")).read().split("\next_modules, cmdclass = cuda_extension()")[0]
    namespace = {"__file__": os.path.join(ROOT, "setup.py")}
    exec(compile(src, "setup.py", "exec"), namespace)
    return namespace


def test_setup_resolves_an_nvcc_wrapper_script(tmp_path):
    helpers = _load_setup_module()
    real = tmp_path / "cuda-x" / "bin" / "nvcc"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"\x7fELF fake binary")
    wrapper = tmp_path / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    assert helpers["real_nvcc"](str(wrapper)) == str(real)
    assert helpers["real_nvcc"](str(real)) == str(real)
    assert int(helpers["max_jobs"]()) >= 1


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: the extension is not built")
def test_cuda_extension_is_built_and_registers_ops():
    """CI builds the extension (nvcc is there): it must load and register its ops for this torch."""
    if importlib.util.find_spec("uniformerv2_kernels._C") is None:
        if os.environ.get("UNIFORMERV2_BUILD_CUDA") == "1" or os.environ.get("CI"):
            pytest.fail("the CUDA extension was not built")
        pytest.skip("the CUDA extension was not built in this environment")
    assert backends.cuda_extension_error() is None
    # every op file of csrc/ made it into the build (they compile as one generated translation unit)
    for name in ("quick_gelu",) + tuple(op for entry in selection.OPS.values() for op in entry.cuda_ops):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"uniformerv2_cuda::{name}", "CUDA"), name
    assert backends.build_info()["TORCH_VERSION"] == torch.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("ldd") is None, reason="needs Linux and ldd")
def test_cuda_extension_links_the_shared_libstdcxx():
    """A private static libstdc++ in the extension (what a g++ that cannot find libstdc++.so links) makes every
    TORCH_CHECK message that formats a number crash instead of raising (seen on the H100 machine). setup.py
    names the shared library torch runs on; the built extension must depend on it."""
    spec = importlib.util.find_spec("uniformerv2_kernels._C")
    if spec is None:
        pytest.skip("the CUDA extension was not built in this environment")
    needed = subprocess.run(["ldd", spec.origin], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in needed, f"{spec.origin} does not link the shared libstdc++:\n{needed}"


def test_setup_names_the_libstdcxx_torch_runs_on():
    path = _load_setup_module()["shared_libstdcxx"]()
    if not sys.platform.startswith("linux"):
        assert path is None
        return
    with open("/proc/self/maps") as maps:
        loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    assert path in loaded if len(loaded) == 1 else path is None


def test_extension_built_from_other_sources_is_refused(monkeypatch):
    """Kernels edited after the build must not run silently: the recorded csrc/ digest must match."""
    if importlib.util.find_spec("uniformerv2_kernels._C") is None:
        pytest.skip("the CUDA extension was not built in this environment")
    from uniformerv2_kernels._sources import csrc_digest

    recorded = {"TORCH_VERSION": torch.__version__, "CSRC_SHA256": "0" * 64}
    monkeypatch.setattr(backends, "build_info", lambda: recorded)
    module, err = backends._import_extension()
    assert module is None and "stale" in err and "rebuild" in err
    recorded["CSRC_SHA256"] = csrc_digest(ROOT)
    assert backends._import_extension()[1] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_quick_gelu_matches_torch():
    if not backends.has_cuda_op("quick_gelu"):  # also loads the extension (this may be a fresh process)
        pytest.skip(f"the CUDA extension is not available: {backends.cuda_extension_error()}")
    z = torch.randn(1000, device="cuda")
    torch.testing.assert_close(torch.ops.uniformerv2_cuda.quick_gelu(z), z * torch.sigmoid(1.702 * z))


def test_auto_picks_cuda_only_for_gpu_verified_ops(monkeypatch):
    """Compiled-but-unverified CUDA kernels are opt-in; verified ones are preferred on CUDA tensors."""
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    monkeypatch.setattr(backends, "generic_reasons", lambda name, tensors, cuda_ops=(): [])
    monkeypatch.setattr(backends, "GPU_VERIFIED_CUDA_OPS", frozenset())
    assert backends.select("my_op", [torch.zeros(1)]) == "triton"
    assert backends.select("my_op", [torch.zeros(1)], backend="cuda") == "cuda"
    monkeypatch.setattr(backends, "GPU_VERIFIED_CUDA_OPS", frozenset({"my_op"}))
    assert backends.select("my_op", [torch.zeros(1)]) == "cuda"


@pytest.fixture
def restore_fp32_precision():
    """Put the matmul precision settings back as they were (legacy flag and torch >= 2.9 setting)."""
    matmul = torch.backends.cuda.matmul
    legacy_readable = getattr(matmul, "fp32_precision", "none") == "none"
    saved = (getattr(matmul, "fp32_precision", None), matmul.allow_tf32 if legacy_readable else None)
    yield
    if saved[0] is not None:
        matmul.fp32_precision = saved[0]
    if saved[1] is not None:
        matmul.allow_tf32 = saved[1]


def test_tf32_follows_both_precision_apis(restore_fp32_precision):
    """torch >= 2.9 users may set fp32_precision, after which reading the legacy allow_tf32 flag raises:
    the kernels' TF32 decision must read whichever API is in use (it once crashed every fp32 FFN call)."""
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = False
    assert backends.tf32_allowed() is False
    matmul.allow_tf32 = True
    assert backends.tf32_allowed() is True
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision setting")
    matmul.fp32_precision = "tf32"
    assert backends.tf32_allowed() is True
    matmul.fp32_precision = "ieee"
    assert backends.tf32_allowed() is False
    from uniformerv2_kernels.ops.ffn import fused_ffn

    x = torch.randn(3, 2, 32)
    params = [torch.randn(32), torch.randn(32), torch.randn(128, 32), torch.randn(128), torch.randn(32, 128),
              torch.randn(32)]
    fused_ffn(x, *params)  # the automatic backend (Triton under the interpreter) reads the setting


def test_triton_gemm_switch_reads_the_environment_and_names_a_bad_value(monkeypatch):
    monkeypatch.delenv("UNIFORMERV2_TRITON_GEMM", raising=False)
    assert backends.triton_gemm() == "cublas"  # the default since the H200 run
    monkeypatch.setenv("UNIFORMERV2_TRITON_GEMM", " TRITON ")
    assert backends.triton_gemm() == "triton"
    monkeypatch.setenv("UNIFORMERV2_TRITON_GEMM", "cutlass")
    with pytest.raises(ValueError, match="UNIFORMERV2_TRITON_GEMM='cutlass'"):
        backends.triton_gemm()


def test_selection_table_drives_the_selector_and_the_model_rules(monkeypatch):
    from types import SimpleNamespace

    import uniformerv2.model as model
    from uniformerv2_kernels import selection

    for op, entry in selection.OPS.items():
        assert "reference" in entry.backends, op  # the fallback everywhere
        assert not entry.cuda_ops or "cuda" in entry.backends, op
    assert backends.GPU_VERIFIED_CUDA_OPS == {op for op, e in selection.OPS.items() if e.auto_cuda}
    # the table's limits are the call's reasons: dtype and the LayerNorm row width the FFN inherits
    reasons = selection.call_reasons("fused_ffn", x=torch.zeros(2, 9000, dtype=torch.float64))
    assert any("float64" in r for r in reasons["triton"]) and any("9000" in r for r in reasons["triton"])
    assert any("float64" in r for r in reasons["cuda"]) and not any("9000" in r for r in reasons["cuda"])
    assert backends.select_op("fused_ffn", [torch.zeros(2, 9000)], x=torch.zeros(2, 9000)) == "reference"
    # model rule 1: a model asked for cuda runs the spatial attention (no CUDA kernel) on Triton
    monkeypatch.setenv("UNIFORMERV2_BACKEND", "cuda")
    assert model.spatial_attention_backend(None) == "triton"
    monkeypatch.delenv("UNIFORMERV2_BACKEND")
    assert model.spatial_attention_backend("reference") == "reference"
    # model rule 2: the Extractor's MLP runs fused except when training with dropout
    calls = []
    monkeypatch.setattr(model, "_ops", lambda: SimpleNamespace(fused_ffn=lambda x, *a, **k: calls.append(1) or x))
    block = model.Extractor(32, 4, dropout=0.5)
    block.fused = True
    x = torch.randn(3, 2, 32)
    block.eval()
    block.mlp_residual(x)
    assert calls == [1]
    block.train()
    block.mlp_residual(x)
    assert calls == [1]  # the reference path: nn.Dropout inside the official MLP
    block.mlp.dropout.p = 0.0
    block.mlp_residual(x)
    assert calls == [1, 1]


# ---- the inductor backend in the selection ----

def test_inductor_is_requestable_but_never_picked_automatically(monkeypatch):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(2, 16)
    assert all("inductor" in entry.backends and not entry.auto_inductor for entry in selection.OPS.values())
    assert backends.INDUCTOR_OWNED_OPS == frozenset()
    assert backends.select_op("fused_ffn", [x], x=x) == "reference"
    assert backends.select_op("fused_ffn", [x], backend="inductor", x=x) == "inductor"
    monkeypatch.setenv(backends.ENV_BACKEND, "inductor")
    assert backends.select_op("clip_layer_norm", [x], x=x) == "inductor"
    monkeypatch.delenv(backends.ENV_BACKEND)
    # an op the table gave to inductor: picked for CUDA tensors, never for CPU ones
    monkeypatch.setattr(backends, "INDUCTOR_OWNED_OPS", frozenset({"fused_ffn"}))
    assert backends.select_op("fused_ffn", [x], x=x) == "reference"
    monkeypatch.setattr(backends, "generic_reasons", lambda name, tensors, cuda_ops=(): [])
    monkeypatch.setattr(backends, "_devices", lambda tensors: {"cuda"})
    assert backends.select_op("fused_ffn", [x], x=x) == "inductor"
    assert backends.select_op("clip_layer_norm", [x], x=x) == "cuda"


def test_inductor_requests_that_cannot_run_say_why(monkeypatch):
    x = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="'inductr' is not a backend; expected one of .*'inductor'"):
        backends.select_op("fused_ffn", [x], backend="inductr", x=x)
    monkeypatch.setitem(backends._CACHE, "c++", "inductor on the CPU needs a C++ compiler (none found; set CXX)")
    with pytest.raises(backends.BackendUnavailableError, match="inductor: inductor on the CPU needs a C\\+\\+"):
        backends.select_op("fused_ffn", [x], backend="inductor", x=x)
    monkeypatch.setitem(backends._CACHE, "torch.compile", "torch.compile is not available here (RuntimeError: "
                        "Python 3.15+ not yet supported for torch.compile)")
    with pytest.raises(backends.BackendUnavailableError, match="torch.compile is not available here"):
        backends.select_op("spatial_attention", [x], backend="inductor", x=x)
    assert backends.status()["inductor"]  # info shows it too
    reasons = backends.generic_reasons("inductor", [torch.zeros(2, device="meta")])
    assert any("inductor compiles for CUDA or CPU tensors" in r for r in reasons)


def test_model_backend_per_op(monkeypatch):
    """A model's backend: one name for every op, or a dict op -> name whose ops get theirs and the others
    the automatic choice; the dict is checked when it is set."""
    from types import SimpleNamespace

    import uniformerv2.model as model

    calls = {}

    def recording(op):
        def fn(x, *args, backend=None, **kwargs):
            calls[op] = backend
            return x
        return fn

    monkeypatch.setattr(model, "_ops", lambda: SimpleNamespace(
        **{op: recording(op) for op in ("fused_ffn", "spatial_attention", "local_temporal_mhra")}))
    block = model.ResidualAttentionBlock(32, 4)
    x = torch.randn(5, 4, 32)
    ops = ("fused_ffn", "spatial_attention", "local_temporal_mhra")
    for backend, expected in (({"fused_ffn": "inductor"}, {"fused_ffn": "inductor"}),
                              ("reference", dict.fromkeys(ops, "reference")), (None, {})):
        block.fused, block.backend = True, selection.check_model_backend(backend)
        calls.clear()
        block(x, T=2)
        assert calls == {op: expected.get(op) for op in ops}, backend
    with pytest.raises(ValueError, match="unknown op.*'ffn'.*the fused ops are"):
        selection.check_model_backend({"ffn": "inductor"})
    with pytest.raises(ValueError, match="spatial_attention has no 'cuda' backend"):
        selection.check_model_backend({"spatial_attention": "cuda"})
    with pytest.raises(ValueError, match="'fast' is not a backend"):
        selection.check_model_backend({"fused_ffn": "fast"})
    with pytest.raises(TypeError, match="dict op -> backend"):
        selection.check_model_backend(["inductor"])
