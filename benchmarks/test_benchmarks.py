"""pytest-benchmark tests of the CPU-runnable paths, at tiny UniFormerV2-like shapes.

    pytest benchmarks/ --benchmark-only        # the timed tests only (pytest-benchmark statistics)
    pytest benchmarks/                          # also the harness checks and the scripts' --quick smoke runs

Per op: the plain-PyTorch reference (``eager``), the public op on its reference backend (``op-reference``:
the torch.library custom-op path the model uses on CPU) and ``torch.compile`` of the reference
(``compile``), in forward and forward+backward (see harness.make_step). Op modules that do not exist yet are
skipped (importorskip). End-to-end: the ``tiny`` model's inference call and training step, eager and fused.
Triton kernels are not timed here: on the CPU they run only under TRITON_INTERPRET, which is not a timing.
The main test command runs ``pytest tests/`` only, so none of this slows CI.
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness as H  # noqa: E402

# How long a script run here may take before a test calls it hung: a bound on a hang, not a speed check (a
# loaded machine takes many times longer than an idle one for the same work).
SUBPROCESS_LIMIT_S = 1800

# Short calibration: these are smoke-level timings at tiny shapes, not the measurements of record.
pytestmark = pytest.mark.benchmark(max_time=0.25, min_rounds=3, warmup=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as the scripts use on the CPU: with 2 threads on a shared machine a call waits
    for a scheduler slice (~8 ms) and the timings measure the neighbours."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _script_env(**extra) -> dict:
    """The environment of a script run here: no GPU, and one torch thread, as the in-process tests (CI runs
    these beside the ahead-of-time compile check: more threads than free cores wait on each other)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)


L_SIDE, T, N, C, HEADS = 4, 3, 2, 128, 2  # L = 17 tokens, 6 frame rows, head dim 64
L = 1 + L_SIDE * L_SIDE
C_MID = int(C // 1.5)


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_(True)


def _inputs_layer_norm():
    return dict(x=_rand(L, N * T, C), weight=_rand(C, scale=0.5), bias=_rand(C, scale=0.5))


def _inputs_ffn():
    return dict(x=_rand(L, N * T, C), ln_weight=_rand(C), ln_bias=_rand(C),
                fc_weight=_rand(4 * C, C, scale=C ** -0.5), fc_bias=_rand(4 * C, scale=0.1),
                proj_weight=_rand(C, 4 * C, scale=(4 * C) ** -0.5), proj_bias=_rand(C, scale=0.1))


def _inputs_spatial_attention():
    return dict(x=_rand(L, N * T, C), ln_weight=_rand(C), ln_bias=_rand(C),
                in_proj_weight=_rand(3 * C, C, scale=C ** -0.5), in_proj_bias=_rand(3 * C, scale=0.1),
                out_proj_weight=_rand(C, C, scale=C ** -0.5), out_proj_bias=_rand(C, scale=0.1))


def _inputs_global_query_attention():
    return dict(x=_rand(L, N * T, C), dpe_weight=_rand(C, 1, 3, 3, 3, scale=0.2), dpe_bias=_rand(C, scale=0.1),
                ln_weight=_rand(C), ln_bias=_rand(C), query=_rand(1, N, C),
                in_proj_weight=_rand(3 * C, C, scale=C ** -0.5), in_proj_bias=_rand(3 * C, scale=0.1))


def _inputs_local_temporal_mhra():
    return dict(x=_rand(L, N * T, C), bn_weight=_rand(C), bn_bias=_rand(C),
                running_mean=torch.randn(C) * 0.1, running_var=torch.rand(C) + 0.5,
                conv1_weight=_rand(C_MID, C, 1, 1, 1, scale=C ** -0.5), conv1_bias=_rand(C_MID, scale=0.1),
                dw_weight=_rand(C_MID, 1, 3, 1, 1, scale=0.5), dw_bias=_rand(C_MID, scale=0.1),
                conv2_weight=_rand(C, C_MID, 1, 1, 1, scale=C_MID ** -0.5), conv2_bias=_rand(C, scale=0.1))


def _op_functions(op: str):
    """(reference fn(**inputs), public op fn(**inputs) on the reference backend, inputs factory)."""
    if op == "layer_norm":
        ref = pytest.importorskip("uniformerv2_kernels.reference.layer_norm")
        ops = pytest.importorskip("uniformerv2_kernels.ops.layer_norm")
        return (ref.clip_layer_norm,
                lambda **kw: ops.clip_layer_norm(**kw, backend="reference"), _inputs_layer_norm)
    if op == "ffn":
        ref = pytest.importorskip("uniformerv2_kernels.reference.ffn")
        ops = pytest.importorskip("uniformerv2_kernels.ops.ffn")
        return ref.fused_ffn, lambda **kw: ops.fused_ffn(**kw, backend="reference"), _inputs_ffn
    if op == "spatial_attention":
        ref = pytest.importorskip("uniformerv2_kernels.reference.spatial_attention")
        ops = pytest.importorskip("uniformerv2_kernels.ops.spatial_attention")
        return (lambda **kw: ref.spatial_attention(**kw, num_heads=HEADS),
                lambda **kw: ops.spatial_attention(**kw, num_heads=HEADS, backend="reference"),
                _inputs_spatial_attention)
    if op == "global_query_attention":
        ref = pytest.importorskip("uniformerv2_kernels.reference.global_query_attention")
        ops = pytest.importorskip("uniformerv2_kernels.ops.global_query_attention")
        return (lambda **kw: ref.global_query_attention_literal(**kw, T=T, num_heads=HEADS),
                lambda **kw: ops.global_query_attention(**kw, T=T, num_heads=HEADS, backend="reference"),
                _inputs_global_query_attention)
    if op == "local_temporal_mhra":
        ref = pytest.importorskip("uniformerv2_kernels.reference.local_temporal_mhra")
        ops = pytest.importorskip("uniformerv2_kernels.ops.local_temporal_mhra")

        def reference(**kw):  # eval-mode BN (running statistics): the inference path
            return ref.local_temporal_mhra_reference(**kw, T=T, training=False)[0]

        def public(**kw):
            return ops.local_temporal_mhra(**kw, T=T, num_batches_tracked=None, training=False, backend="reference")

        return reference, public, _inputs_local_temporal_mhra
    raise ValueError(op)


OPS = ("layer_norm", "ffn", "spatial_attention", "global_query_attention", "local_temporal_mhra")
PROVIDERS = ("eager", "op-reference", "compile")
MODES = ("forward", "forward+backward")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, provider, mode):
    reference, public, make_inputs = _op_functions(op)
    torch.manual_seed(0)
    fn = {"eager": reference, "op-reference": public, "compile": reference}[provider]
    prov = H.Provider(provider, fn, compile=provider == "compile")
    inputs = make_inputs()
    if mode == "forward":
        for t in inputs.values():
            if isinstance(t, torch.Tensor):
                t.requires_grad_(False)
    step, leaves = H.make_step(prov, inputs, mode)
    out = step()  # compile / warm up outside the timing
    if mode == "forward":
        assert torch.isfinite(out).all()
    else:
        grads = [t.grad for t in leaves]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)

    def clear_and_step():
        for t in leaves:
            t.grad = None
        return step()

    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, shape=f"L={L} NT={N * T} C={C} heads={HEADS}")
    benchmark(clear_and_step)


E2E_PROVIDERS = ("eager", "fused")


@pytest.mark.parametrize("task", ("inference", "train"))
@pytest.mark.parametrize("provider", E2E_PROVIDERS)
def test_e2e_tiny(benchmark, provider, task):
    pytest.importorskip("uniformerv2.model")
    import bench_e2e

    args = H.parse_args("", ["--device", "cpu", "--quick", "--no-save"], extra=bench_e2e.extra_args)
    model = bench_e2e.build("tiny", {}, None, provider == "fused", args, seed=0)
    bench_e2e.randomise_buffers(model)
    x, labels, _, _ = bench_e2e.make_inputs(model, 2, args, seed=1)
    step = bench_e2e.make_step(model, model, task, x, labels, args)
    step()
    benchmark.group = f"e2e tiny {task}"
    benchmark.extra_info.update(provider=provider, task=task, batch=2)
    benchmark(step)


def test_e2e_graphed_steps_set_the_mode_they_need():
    """The fused+graph steps put the model in the mode their graph needs (a GPU run once built the inference
    graph on a model left in training mode and got GraphedInference's ValueError in every row). On the CPU
    both run the model eagerly: the same code path up to the capture."""
    pytest.importorskip("uniformerv2.model")
    import bench_e2e

    args = H.parse_args("", ["--device", "cpu", "--quick", "--no-save"], extra=bench_e2e.extra_args)
    model = bench_e2e.build("tiny", {}, None, False, args, seed=0)
    bench_e2e.randomise_buffers(model)
    x, labels, _, _ = bench_e2e.make_inputs(model, 2, args, seed=1)
    model.train()
    logits = bench_e2e.make_graphed_inference_step(model, x, args)()
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    bench_e2e.make_graphed_train_step(model, x, labels, args)()
    assert model.training


def _e2e_row(case, mode, provider, ms, gpu_ms=None, date="2026-12-07T10:00:00Z", commit="abc", device="H100"):
    return dict({c: None for c in H.CSV_COLUMNS}, bench="e2e", case=case, mode=mode, provider=provider,
                status="ok", ms=ms, gpu_ms=gpu_ms, host_ms=1.0, items_per_s=32 / (ms * 1e-3), first_ms=2000.0,
                date=date, commit=commit, device=device, dtype="bfloat16", quick=False)


def test_e2e_official_cases_are_the_issues_batches():
    """On a GPU with no --configs / --batch: the official per-GPU batches, each task only where asked."""
    import bench_e2e

    args = H.parse_args("", ["--device", "cpu", "--full", "--no-save"], extra=bench_e2e.extra_args)
    cases = bench_e2e.resolve_cases(args, ["train", "inference"])
    assert [(c.preset, c.batch, c.task) for c in cases] == [
        ("k400_b16_f8x224", 32, "train"), ("ssv2_b16_f16x224", 32, "train"),
        ("k400_b16_f8x224", 64, "inference"), ("k400_l14_f8x224", 16, "train")]
    assert "2 repeated augmentations" in cases[1].note
    assert [c.batch for c in bench_e2e.resolve_cases(args, ["inference"])] == [64]
    args = H.parse_args("", ["--device", "cpu", "--full", "--no-save", "--configs", "k400_b16_f8x224,tiny"],
                        extra=bench_e2e.extra_args)
    assert [(c.preset, c.batch, c.task) for c in bench_e2e.resolve_cases(args, ["train", "inference"])] == [
        ("k400_b16_f8x224", 32, "train"), ("k400_b16_f8x224", 64, "inference"), ("tiny", 16, "train"),
        ("tiny", 16, "inference")]
    args = H.parse_args("", ["--device", "cpu", "--full", "--no-save", "--batch", "8"], extra=bench_e2e.extra_args)
    grid = bench_e2e.resolve_cases(args, ["train", "inference"])
    assert {(c.preset, c.batch, c.task) for c in grid} == {
        (p, 8, t) for p in bench_e2e.FULL_CONFIGS for t in ("train", "inference")}


def test_e2e_comparison_ratios_against_eager_and_the_best_compile_row():
    import bench_e2e

    rows = [_e2e_row("k400 N=32", "train", "eager", 400.0, 300.0),
            _e2e_row("k400 N=32", "train", "compile", 200.0, 180.0),
            _e2e_row("k400 N=32", "train", "compile-max-autotune", 160.0, 150.0),
            _e2e_row("k400 N=32", "train", "fused", 100.0, 75.0),
            _e2e_row("k400 N=64", "inference", "eager", 50.0)]
    table = bench_e2e.comparison_markdown(rows)
    lines = {line.split(" | ")[2]: line for line in table.splitlines()[2:]}
    fused = lines["fused"].split(" | ")
    # ms, GPU ms, host, busy, clips/s, peak, first s, vs eager, vs best compile, GPU vs eager, GPU vs compile
    assert fused[3:5] == ["100.0", "75"] and fused[6] == "75%"
    assert fused[-4:] == ["4.00x", "1.60x", "4.00x", "2.00x |"]
    assert "compile-max-autotune (best compile)" in lines
    assert lines["compile"].split(" | ")[-3] == "0.80x"  # 160 / 200: the default mode is the slower one
    infer = [line for line in table.splitlines() if "inference" in line][0].split(" | ")
    assert infer[-4:] == ["1.00x", "", "", " |"]  # no compile row, no GPU ms: no ratio, not a made-up one


def test_e2e_report_joins_the_suite_steps_rows_of_the_latest_commit(tmp_path):
    """The GPU suite measures eager/fused and the compile rows in separate steps (separate runs, one CSV):
    the report compares them together, the latest commit's rows only, the latest row per provider."""
    import bench_e2e

    path = str(tmp_path / "e2e.csv")
    H.append_csv([_e2e_row("k400 N=32", "train", "eager", 999.0, commit="old", date="2026-12-01T00:00:00Z"),
                  _e2e_row("k400 N=32", "train", "eager", 400.0, date="2026-12-07T10:00:00Z"),
                  _e2e_row("k400 N=32", "train", "fused", 120.0, date="2026-12-07T10:00:00Z"),
                  _e2e_row("k400 N=32", "train", "compile", 200.0, date="2026-12-07T10:05:00Z"),
                  _e2e_row("k400 N=32", "train", "fused", 100.0, date="2026-12-07T10:06:00Z")], path)
    text = bench_e2e.report([path])
    assert "commit abc" in text and "999" not in text
    fused = [line for line in text.splitlines() if "| fused |" in line]
    assert len(fused) == 1 and fused[0].split(" | ")[-4:-2] == ["4.00x", "2.00x"], fused
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench_e2e.py"), "--device", "cpu", "--report", path],
                          capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0 and "| fused |" in proc.stdout, proc.stderr[-2000:]


def test_e2e_compile_providers_run_on_the_cpu_with_aot_eager(tmp_path):
    """Every torch.compile provider builds, compiles and times its step (aot_eager: no code generation, so
    the test stays short; inductor runs in the GPU suite). Rows land in the CSV and the comparison."""
    import bench_e2e

    rows = bench_e2e.main(["--device", "cpu", "--quick", "--configs", "tiny_k400", "--mode", "fwd", "--rep", "1",
                           "--providers", "eager,compile,fused+compile,fused+compile-reduce-overhead,"
                           "fused+inductor-ffn", "--compile-backend", "aot_eager", "--no-flops", "--out",
                           str(tmp_path)])
    by = {r["provider"]: r for r in rows}
    assert by["compile"]["status"] == "ok" and by["fused+compile"]["status"] == "ok", by
    assert "torch.compile mode=default backend=aot_eager" in by["fused+compile"]["note"]
    # the FFN on its inductor backend inside the fused model (compiled with aot_eager here)
    assert by["fused+inductor-ffn"]["status"] == "ok", by["fused+inductor-ffn"]
    assert "fused_ffn: inductor (torch.compile backend=aot_eager)" in by["fused+inductor-ffn"]["note"]
    from uniformerv2_kernels import inductor
    assert inductor.COMPILER == "inductor" and inductor.compiled_count("fused_ffn") > 0
    assert by["compile"]["first_ms"] > by["eager"]["first_ms"]  # the compilation is in the first call
    assert by["fused+compile-reduce-overhead"]["status"] == "skipped"  # CUDA graphs: GPU only
    written = (tmp_path / "e2e_cpu_quick.md").read_text()
    assert "Against eager and the best torch.compile row" in written and "| compile |" in written


# ---- checks of the harness itself (not timed; skipped under --benchmark-only) ----

def test_time_fn_cpu_median_is_positive_and_grows_with_work():
    small = torch.randn(64, 64)
    big = torch.randn(256, 256)
    t_small = H.time_fn(lambda: small @ small, "cpu", rep=5)
    t_big = H.time_fn(lambda: [big @ big for _ in range(4)], "cpu", rep=5)
    assert 0 < t_small < t_big


def test_measure_rows_throughput_and_skip_reasons(tmp_path):
    args = H.parse_args("", ["--device", "cpu", "--mode", "all", "--out", str(tmp_path)])
    args.bench_name = "selftest"

    def make_inputs(device, dtype, requires_grad):
        return dict(a=torch.randn(33, 65, device=device, dtype=dtype, requires_grad=requires_grad),
                    b=torch.randn(65, 17, device=device, dtype=dtype, requires_grad=requires_grad))

    case = H.Case("mm", make_inputs, fwd_flops=2 * 33 * 65 * 17, bwd_flops=4 * 33 * 65 * 17,
                  fwd_bytes=4 * (33 * 65 + 65 * 17 + 33 * 17))
    providers = [H.Provider("eager", lambda a, b: a @ b),
                 H.Provider("gpu-only", lambda a, b: a @ b, requires=("gpu",)),
                 H.Provider("broken", lambda a, b: a @ b.t())]
    rows = H.run_benchmark("selftest", [case], providers, args)
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in H.MODES:
        ok = by[("eager", mode)]
        assert ok["status"] == "ok" and ok["ms"] > 0 and ok["speedup"] == pytest.approx(1.0)
        nbytes, flops = case.work(mode)
        assert ok["tflops"] == pytest.approx(flops / (ok["ms"] * 1e-3) / 1e12)
        assert by[("gpu-only", mode)]["status"] == "skipped"
        assert "CUDA" in by[("gpu-only", mode)]["note"]
        assert by[("broken", mode)]["status"] == "error"
    assert by[("eager", "forward")]["gbps"] is not None and by[("eager", "backward")]["gbps"] is None
    with open(tmp_path / "selftest.csv") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows) and saved[0]["commit"] and saved[0]["torch"] == torch.__version__
    assert (tmp_path / "selftest_cpu_quick.md").read_text().count("| mm |") == 6  # 3 modes x (eager, broken)


@pytest.mark.parametrize("key,header,on_cpu", [
    ("host_ms", "host ms", lambda: H.host_time_ms(lambda: None, "cpu")),  # launch overhead
    ("gpu_ms", "GPU ms", lambda: H.graph_time_ms(lambda: None, "cpu")[0]),  # a CUDA-graph replay
])
def test_cuda_only_columns_are_shown_when_measured(key, header, on_cpu):
    """host ms and GPU ms are measured on CUDA only; the table shows a column when a row has it."""
    assert on_cpu() is None
    args = H.parse_args("", ["--device", "cpu"])
    case = H.Case("c", lambda *a: {})
    rows = []
    for provider, value in (("eager", 0.05), ("triton", 0.031)):
        row = H.new_row(provider, case, "forward", args)
        row.update(status="ok", ms=0.2, **{key: value})
        rows.append(row)
    table = H.format_table(rows, markdown=True)
    assert f"| {header} |" in table and "| 0.031 |" in table
    rows[1][key] = rows[0][key] = None
    assert header not in H.format_table(rows, markdown=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_time_of_a_capturable_and_an_uncapturable_step():
    a = torch.randn(1024, 1024, device="cuda")
    ms, why = H.graph_time_ms(lambda: a @ a, "cuda")
    assert why is None and ms > 0

    def refuses_capture():  # as a step with a host sync would (without poisoning this test process's stream)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this step syncs with the host")
        return a @ a

    ms, why = H.graph_time_ms(refuses_capture, "cuda")
    assert ms is None and "syncs with the host" in why
    assert H.graph_time_ms(lambda: a @ a, "cuda")[0] > 0  # capture still works afterwards


def test_variants_are_compared_with_their_defaults(tmp_path):
    args = H.parse_args("", ["--device", "cpu"])
    case = H.Case("b16", lambda *a: {})
    rows = []
    for provider, ms, gpu in (("eager", 3.0, None), ("triton", 2.0, 1.0), ("triton-triton-gemm", 1.5, 0.5)):
        row = H.new_row(provider, case, "forward", args)
        row.update(status="ok", ms=ms, gpu_ms=gpu, bench="ffn", date="2026-11-25T00:00:00Z", device="GPU")
        rows.append(row)
    H.append_csv(rows, str(tmp_path / "ffn.csv"))
    table = H.compare_variants([str(tmp_path / "ffn.csv")])
    assert "| ffn | b16 | forward | triton-triton-gemm | 2 | 1.5 | 0.75 | 1 | 0.5 | 0.50 |" in table, table
    assert "eager" not in table


def test_committed_csvs_have_the_current_header():
    """benchmarks/results/*.csv must carry CSV_COLUMNS, or `harness merge` would move them aside."""
    for path in glob.glob(os.path.join(HERE, "results", "*.csv")):
        with open(path, newline="") as f:
            assert next(csv.reader(f)) == list(H.CSV_COLUMNS), path


def test_csv_with_another_header_is_moved_aside(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    args = H.parse_args("", ["--device", "cpu"])
    case = H.Case("c", lambda *a: {})
    row = H.new_row("p", case, "forward", args)
    row.update(status="ok", ms=1.0)
    H.append_csv([row], str(path))
    assert list(tmp_path.glob("x.csv.old-*"))
    with open(path) as f:
        assert next(csv.reader(f)) == list(H.CSV_COLUMNS)


def test_shapes_are_the_real_model_sizes():
    args = H.parse_args("", ["--device", "cpu", "--full"])
    full = H.shapes(args)
    assert {(s.model, s.L, s.C, s.heads, s.head_dim) for s in full} == {("b16", 197, 768, 12, 64), ("l14", 257, 1024, 16, 64)}
    args = H.parse_args("", ["--device", "cpu", "--models", "l14", "--frames", "8,16", "--batch", "4"])
    assert [(s.T, s.N, s.NT, s.S) for s in H.shapes(args)] == [(8, 4, 32, 8 * 257), (16, 4, 64, 16 * 257)]
    assert H.MODELS["b16"].lmhra_dim == 512 and H.MODELS["l14"].lmhra_dim == 682


# ---- every bench script runs on the CPU and prints its table ----

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "bench_*.py")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_quick_on_cpu(script, tmp_path):
    env = _script_env()
    env.pop("TRITON_INTERPRET", None)
    # the tiny shape only: the scripts' code is the same at every shape (the real sizes: test_shapes_...), and
    # each shape costs a cold inductor compile for the compile row
    cmd = [sys.executable, os.path.join(HERE, script), "--device", "cpu", "--quick", "--models", "tiny",
           "--mode", "forward", "--out", str(tmp_path), "--rep", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "provider" in proc.stdout, proc.stdout[-2000:]  # the table's header
    saved = list(tmp_path.glob("*.csv"))
    assert saved, "the script saved no CSV"
    with open(saved[0]) as f:
        rows = list(csv.DictReader(f))
    assert any(r["status"] == "ok" for r in rows), "no provider ran on the CPU"


def test_op_benchmark_times_the_inductor_backend_when_named():
    """The ``inductor`` row (each op script has one): the public op on backend="inductor", here the FFN with
    inductor's C++ on the CPU (one compile, forward+backward at the tiny shape). A CPU run that does not
    name it skips it with the reason (the quick runs above)."""
    import bench_ffn

    argv = ["--device", "cpu", "--quick", "--models", "tiny", "--mode", "forward+backward", "--rep", "5", "--no-save"]
    provider = next(p for p in bench_ffn.PROVIDERS if p.name == "inductor")
    assert "name the provider in --providers" in H.provider_skip_reason(provider, None, H.parse_args("", argv))
    args = H.parse_args("", argv + ["--providers", "eager,inductor"])
    rows = H.run_benchmark("ffn", [bench_ffn.make_case(s, args.dtype) for s in H.shapes(args)], bench_ffn.PROVIDERS,
                           args)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"eager", "inductor"} and by["inductor"]["status"] == "ok", by
    assert by["inductor"]["first_ms"] > by["eager"]["first_ms"]  # the compilation is in the first call


# ---- the profiling driver (benchmarks/profile_kernels.py) without a GPU ----


def test_profile_driver_runs_every_op_interpreted():
    env = _script_env()
    cmd = [sys.executable, os.path.join(HERE, "profile_kernels.py"), "--interpret", "--model", "tiny",
           "--frames", "3", "--batch", "2", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("profiled step") == 5, proc.stdout


def test_timeline_union_and_cpu_report():
    import profile_kernels

    assert profile_kernels._union_us([(0, 10), (5, 12), (20, 21), (1, 3)]) == 13
    assert profile_kernels._union_us([]) == 0
    a = torch.randn(64, 64)
    info = profile_kernels.timeline(lambda: (a @ a).sum(), torch.device("cpu"), top=3)
    assert info["wall_ms"] >= info["host_ms"] > 0 and len(info["top"]) <= 3
    assert any("mm" in name for name, _, _ in info["top"])
    md = profile_kernels.timeline_markdown("selftest", info)
    assert md.startswith("### selftest") and "| op | calls | self CPU us |" in md


def test_profile_summary_of_ncu_csv(tmp_path):
    import profile_kernels

    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [("0", "_gqa_forward_partial_kernel", "gpu__time_duration.sum", "50,000"),
            ("0", "_gqa_forward_partial_kernel", "dram__bytes_read.sum", "40,000,000"),
            ("0", "_gqa_forward_partial_kernel", "lts__t_bytes.sum", "400,000,000"),
            ("1", "_gqa_forward_partial_kernel", "gpu__time_duration.sum", "50,000"),
            ("1", "_gqa_forward_partial_kernel", "dram__bytes_read.sum", "40,000,000"),
            ("1", "_gqa_forward_partial_kernel", "lts__t_bytes.sum", "400,000,000")]
    log = tmp_path / "ncu.log"
    log.write_text("==PROF== noise\n[profile] a line of the driver\n" + header
                   + "".join(f'"{i}","{k}","{m}","x","{v}"\n' for i, k, m, v in rows))
    table = profile_kernels.summarize(str(log))
    # two launches, 100 us, 80 MB of DRAM traffic at 800 GB/s, L2 traffic 10x the DRAM traffic
    assert "| _gqa_forward_partial_kernel | 2 | 100.0 | 80.0 | 800 | 10.0x |" in table, table


# ---- host time per call (benchmarks/launch_overhead.py) without a GPU ----


def test_launch_overhead_runs_on_cpu(tmp_path):
    env = _script_env()
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "launch_overhead.md"
    cmd = [sys.executable, os.path.join(HERE, "launch_overhead.py"), "--device", "cpu", "--reps", "30",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    by_item = {(r[0].strip(), r[1].strip()): r for r in rows}
    # the Python-side rows are measured, the GPU-only ones say why not
    assert float(by_item[("fwd+bwd, custom op + register_autograd", "-")][2]) > 0
    assert float(by_item[("clip_layer_norm, forward+backward", "reference")][2]) > 0
    assert "needs a CUDA GPU" in by_item[("Triton launch", "-")][6]
    assert "CUDA tensors" in by_item[("global_query_attention", "cuda")][6]
    # what one call issues is counted on any machine, Triton included (interpreted, counted, not timed)
    ln_triton = by_item[("clip_layer_norm, forward+backward", "triton")]
    assert float(ln_triton[2]) > 0 and "launches stubbed" in ln_triton[6]  # interpreted: host work timed
    assert int(ln_triton[4]) >= 1 and int(ln_triton[5]) >= 2  # allocations; forward + backward kernels
    ref = by_item[("global_query_attention, forward", "reference")]
    assert int(ref[4]) > 10 and int(ref[5]) == 0
    # whole model steps: eager timed, fused (Triton) counted; columns: host ms, wall ms, compute, alloc, view,
    # Triton launches
    for recipe in ("k400_b16_f8x224", "ssv2_b16_f16x224"):
        eager = by_item[(f"{recipe} train fwd+bwd", "eager")]
        fused = by_item[(f"{recipe} train fwd+bwd", "fused")]
        assert float(eager[2]) > 0 and int(eager[4]) > 100 and int(eager[7]) == 0
        assert float(fused[2]) > 0 and int(fused[7]) > 10 and "launches stubbed" in fused[8]


# ---- the ahead-of-time compile check's cases (benchmarks/aot_compile_check.py; CI runs the compiles) ----


def test_aot_compile_check_light_variants_keep_every_other_gemm_tile():
    """--light-variants edges: the light GEMM variants at the smallest and largest tile of
    their lists, every other variant at every tile; none drops them; a bad value is refused. In a subprocess:
    importing the script sets Triton's compile environment."""
    code = r"""
import collections, aot_compile_check as A
def tiles(light):
    counts = collections.Counter()
    for c in A.linear_cases(["fp32", "fp16"], light_variants=light):
        if c.kernel == "_linear_kernel":
            counts[(c.dtype, c.config.split(" ")[0])] += 1
    return counts
full, edges, none = tiles("all"), tiles("edges"), tiles("none")
mod = A._module("linear")
for dt, precision in (("fp32", "ieee"), ("fp16", "tf32")):
    n = len(mod.gemm_configs(precision=precision))
    for label in ("c_fc(gelu,pre)", "c_proj(res,scale)", "dgrad(gelu')", "out_proj(swap)"):
        assert full[(dt, label)] == edges[(dt, label)] == none[(dt, label)] == n, (dt, label)
    for label in ("c_fc(gelu)", "c_proj(res)", "qkv"):
        assert full[(dt, label)] == n and edges[(dt, label)] == 2 and (dt, label) not in none, (dt, label)
edge_tiles = {c.config for c in A.linear_cases(["fp16"], light_variants="edges") if c.config.startswith("qkv ")}
assert edge_tiles == {"qkv 64x64x32 s4 w4", "qkv 128x256x64 s3 w8"}, edge_tiles
try:
    A.linear_cases(["fp16"], light_variants="some")
except ValueError as e:
    assert "light_variants" in str(e)
else:
    raise AssertionError("no error")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                          env=_script_env(PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)])),
                          timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-3000:]


# ---- the GPU suite script, dry-run on the CPU (a broken script would waste a rare GPU lease) ----


def test_gpu_suite_lease_call_dry_run(tmp_path):
    env = _script_env(SUITE_DEVICE="cpu", PYTHON=sys.executable,
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path),
               SUITE_STEPS="env,cuda_tests,e2e_tests,e2e,e2e_compile,tests,tests_triton_gemm",
               SUITE_TEST_ARGS="-k quick_gelu -n 0", GIT_COMMIT="dry-run")
    env.pop("UNIFORMERV2_AUTOTUNE", None)
    script = os.path.join(HERE, "gpu_suite.sh")
    proc = subprocess.run(["bash", script, "lease"], capture_output=True, text=True, env=env,
                          timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| cuda_tests | rc=0 |" in summary, summary
    assert "of a 550 s budget" in summary, summary  # the lease's budget, not the three-call one
    log = (tmp_path / "out" / "suite.log").read_text()
    started = [line.split("START ")[1] for line in log.splitlines() if "START " in line]
    # issue 20's comparison before the general tests, each step with the lease's cap
    assert [s.split(" ")[0] for s in started] == ["cuda_tests", "e2e_tests", "bench_e2e", "bench_e2e_compile",
                                                  "tests", "tests_triton_gemm"], started
    assert "START cuda_tests (limit 100s)" in log, log
    assert "START e2e_tests (limit 80s)" in log and "tests/test_cuda_graph.py tests/test_fused_compile.py" in log
    assert "START bench_e2e (limit 120s)" in log and "--providers eager,fused,fused+graph" in log
    assert "START bench_e2e_compile (limit 150s)" in log and "--providers compile,fused+compile" in log
    tests_line = [s for s in started if s.startswith("tests ")][0]
    assert "--ignore=tests/test_fused_compile.py" in tests_line  # run once, by e2e_tests
    assert "START tests_triton_gemm (limit 90s): env UNIFORMERV2_TRITON_GEMM=triton" in log, log
    assert "| bench_e2e | rc=0 |" in summary and "| bench_e2e_compile | rc=0 |" in summary, summary
    # the comparison joins both e2e steps' rows: compile rows beside eager and fused
    report = summary.split("against eager and the best torch.compile row (issue 20)")[1].split("## Benchmarks")[0]
    for provider in ("eager", "fused", "compile", "fused+compile"):
        assert f"| {provider} |" in report, report
    assert (tmp_path / "out" / "gpu_suite_results.tar.gz").exists()
    bad = subprocess.run(["bash", script, "no-such-call"], capture_output=True, text=True, env=env,
                         timeout=SUBPROCESS_LIMIT_S)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_gpu_suite_inductor_call_dry_run(tmp_path):
    """`gpu_suite.sh inductor` (issue 20 item 3's measurement, one call): each op's inductor row beside
    compile and our kernels, then fused against fused+inductor-ffn end to end. On the CPU: the LayerNorm's
    eager row only (test_op_benchmark_times_the_inductor_backend_when_named compiles one), the tiny shapes,
    and the model's FFN compiled by dynamo alone."""
    env = _script_env(SUITE_DEVICE="cpu", PYTHON=sys.executable,
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), SUITE_STEPS="env,ops_inductor,e2e_inductor",
               SUITE_INDUCTOR_OPS="layer_norm", SUITE_INDUCTOR_OP_PROVIDERS="eager,cuda", GIT_COMMIT="dry-run")
    proc = subprocess.run(["bash", os.path.join(HERE, "gpu_suite.sh"), "inductor"], capture_output=True, text=True,
                          env=env, timeout=SUBPROCESS_LIMIT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    log = (tmp_path / "out" / "suite.log").read_text()
    assert "of a 550 s budget" in summary, summary
    assert "| bench_layer_norm_inductor | rc=0 |" in summary and "| bench_e2e_inductor | rc=0 |" in summary, summary
    assert "bench_layer_norm.py --device cpu" in log and "--providers fused,fused+inductor-ffn" in log, log
    assert "[layer_norm] tiny T=3 N=2 | forward | eager: " in log and "| fused+inductor-ffn: " in log, log
    report = summary.split("against eager and the best torch.compile row (issue 20)")[1].split("## Benchmarks")[0]
    assert "| fused+inductor-ffn |" in report and "| fused |" in report, report


# ---- the input pipeline benchmark (benchmarks/data_pipeline.py) on tiny synthetic videos ----


def test_data_pipeline_benchmark_runs_on_tiny_videos(tmp_path):
    pytest.importorskip("av")
    import data_pipeline

    out = tmp_path / "data.md"
    rows = data_pipeline.main(["--videos", "2", "--frames", "12", "--size", "64x48", "--codec", "mpeg4",
                               "--num-frames", "4", "--crop-size", "32", "--clips", "2", "--crops", "3",
                               "--reps", "1", "--workers", "0", "--batch-size", "2", "--batches", "2",
                               "--gpu-clips-per-s", "100", "--out", str(out)])
    assert [r["stage"].split(" (")[0] for r in rows] == ["decode", "train transform",
                                                         "training clip: decode + transform", "test views of a video",
                                                         "test views of a video: decode only"]
    assert all(r["ms"] > 0 and r["wall_ms"] > 0 and r["rate"] > 0 for r in rows)
    text = out.read_text()
    assert "DataLoader, 0 workers" in text and "| cpu |" in text and "| gpu |" in text and "about" in text
    assert "Batched transform" in text and "ms per batch" in text
    for bad in (["--crops", "2"], ["--device", "nonsense"]):
        with pytest.raises(SystemExit):
            data_pipeline.main(bad)


def test_real_video_training_compares_the_videos_run_with_one_repeated_batch(tmp_path):
    """The three runs train (the tiny video-list model on the CPU), each rate comes from its metrics after the first
    window, and the share is their ratio; bad arguments are usage errors."""
    pytest.importorskip("av")
    import data_pipeline
    import real_video_training

    videos = tmp_path / "videos"
    videos.mkdir()
    list_file = data_pipeline.write_synthetic_videos(str(videos), 2, 16, 64, 48, "mpeg4", 30)
    out = tmp_path / "real.md"
    rows = real_video_training.main(["--list", list_file, "--workers", "1", "--batch", "2", "--steps", "4",
                                     "--log-every", "1", "--out", str(out), "train.seed=3"])
    assert [r["run"] for r in rows] == ["videos", "one batch", "device batch"]
    assert all(r["clips_per_s"] > 0 and r["windows"] == 3 and 0 <= r["data_wait"] <= 1 for r in rows)
    assert [r["share"] for r in rows] == pytest.approx([r["clips_per_s"] / rows[2]["clips_per_s"] for r in rows])
    text = out.read_text()
    assert "| videos |" in text and "| one batch |" in text and "| device batch |" in text
    assert "Overrides: train.seed=3" in text
    for bad in (["--workers", "0"], ["--steps", "3", "--log-every", "2"], ["--list", str(tmp_path / "none.txt")]):
        with pytest.raises(SystemExit) as exc:
            real_video_training.main(bad)
        assert exc.value.code == 2


def test_launch_overhead_stubbed_measurement_skips_every_triton_launch():
    """The GPU rows "Triton launches stubbed" time a call with no launch run; checked here on the interpreter,
    where a launch that slipped through would run the (slow) interpreted kernel and change the output."""
    code = r"""
import torch, launch_overhead as lo
ops, leaves = lo._tiny_op_calls(torch.device("cpu"), torch.float32)
call = lambda: ops["clip_layer_norm"]("triton")
real = call()  # kept alive: the stubbed call's output cannot reuse its memory (and its values)
with lo.counted_triton_launches(stub=True) as n:
    stubbed = call()
assert n[0] == 1, n
assert not torch.equal(stubbed, real)  # torch.empty's contents: the kernel did not run
host, wall, note = lo.stubbed_host_us(call, torch.device("cpu"), reps=3, warmup=1)
assert host > 0 and wall >= host and note == lo.GPU_STUBBED_NOTE, (host, wall, note)
def broken():
    raise RuntimeError("boom")
host, wall, note = lo.stubbed_host_us(broken, torch.device("cpu"), reps=1, warmup=0)
assert host is None and note == "failed: RuntimeError: boom", note
print("ok")
"""
    env = _script_env(TRITON_INTERPRET="1", PYTHONPATH=HERE)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=SUBPROCESS_LIMIT_S, cwd=HERE)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
