"""Deployment: ONNX (both exporters) and torch.export of the reference and the fused model, portable saved
programs, torch.jit.trace, and the uniformerv2-export command from a uniformerv2-train checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import uniformerv2
from uniformerv2 import evaluate, export, train

onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx (pip install '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model() -> uniformerv2.UniFormerV2:
    """Every part on (stride-2 stem, LMHRA x2, DPE, a global block), as small as the ops allow; weights
    perturbed so that the zero-initialised branches (LMHRA's last conv, the global blocks' projections)
    contribute."""
    torch.manual_seed(0)
    model = uniformerv2.build_model("tiny", width=16, heads=2, layers=1, return_list=[0], patch_size=8,
                                    input_resolution=16, num_frames=4, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def clip(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def fused_op_nodes(program):
    return [n for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("uniformerv2.")]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_onnx_export_with_dynamic_batch_matches_eager(tmp_path, fused):
    """torch.onnx.export(dynamo=True) of the same model object, fused (Triton, interpreted here) or not: one
    file with a dynamic batch, standard ONNX operators only, within 1e-5 of eager at two batch sizes."""
    model = tiny_model()
    if fused:
        model.set_fused(True)
    program = export.export_onnx(model, clip(2, 0), dynamic_batch=True, opset=18)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert export.nonstandard_nodes(proto) == []
    assert {op.domain: op.version for op in proto.opset_import}[""] == 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    with torch.no_grad():
        for batch in (1, 3):
            x = clip(batch, batch)
            assert export.relative_difference(run_onnx(path, x), model(x)) < 1e-5


def test_auto_backend_is_chosen_when_the_op_runs(monkeypatch):
    """Backend "auto" (what exported programs record) picks the backend at each call, by the rules of a call
    without one: UNIFORMERV2_BACKEND, else the first backend that can run."""
    from uniformerv2_kernels.ops import layer_norm

    ran = []
    monkeypatch.setattr(layer_norm.reference, "forward", lambda *a, _f=layer_norm.reference.forward: (
        ran.append("reference"), _f(*a))[1])
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    expected = layer_norm.select_backend(x, w, b)
    y, _, _ = torch.ops.uniformerv2.clip_layer_norm_fwd(x, w, b, 1e-5, "auto")
    assert ran == ([] if expected != "reference" else ["reference"])
    monkeypatch.setenv("UNIFORMERV2_BACKEND", "reference")
    y_ref, _, _ = torch.ops.uniformerv2.clip_layer_norm_fwd(x, w, b, 1e-5, "auto")
    assert ran[-1:] == ["reference"]
    assert export.relative_difference(y, y_ref) < 1e-6


def test_saved_fused_program_runs_on_the_reference_in_a_fresh_process(tmp_path):
    """A .pt2 of the fused model exported here, where the Triton backend runs (interpreted), records backend
    "auto"; a fresh process that imports only uniformerv2 loads it and, with no kernel able to run there
    (no GPU, no TRITON_INTERPRET), runs every op on the reference, at two batch sizes."""
    model = tiny_model().set_fused(True)
    x = clip(2, 0)
    program = export.export_program(model, x, dynamic_batch=True)
    nodes = fused_op_nodes(program)
    assert {str(n.target) for n in nodes} >= {
        "uniformerv2.clip_layer_norm_fwd.default", "uniformerv2.fused_ffn_fwd.default",
        "uniformerv2.global_query_attention_fwd.default", "uniformerv2.local_temporal_mhra_fwd.default",
        "uniformerv2.spatial_attention_qkv_fwd.default", "uniformerv2.spatial_attention_out_fwd.default"}
    assert {n.args[-1] for n in nodes} == {"auto"}
    torch.export.save(program, str(tmp_path / "model.pt2"))
    inputs = [clip(1, 1), clip(3, 3)]
    with torch.no_grad():
        torch.save({"inputs": inputs, "expected": [model(v) for v in inputs]}, tmp_path / "data.pt")
    script = textwrap.dedent("""
        import sys, torch, uniformerv2
        from uniformerv2_kernels.reference import ffn, layer_norm
        calls = []
        for module in (ffn, layer_norm):
            def counted(*args, _f=module.forward, _name=module.__name__):
                calls.append(_name)
                return _f(*args)
            module.forward = counted
        program = torch.export.load(sys.argv[1] + "/model.pt2")
        data = torch.load(sys.argv[1] + "/data.pt")
        with torch.no_grad():
            for x, expected in zip(data["inputs"], data["expected"]):
                got = program.module()(x)
                err = float((got - expected).abs().max() / expected.abs().max())
                assert err < 1e-5, err
        kernels = sorted(m for m in sys.modules if m.startswith("uniformerv2_kernels.triton"))
        print(len(calls), kernels)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UNIFORMERV2_BACKEND")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls, kernels = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    # per forward: ln_pre + the block's FFN + the global block's FFN (reference.layer_norm.forward / ffn.forward)
    assert int(calls) == 2 * 3 and kernels == "[]", proc.stdout


def test_saved_fused_program_exports_to_onnx(tmp_path):
    """A program already exported with the fused ops (a loaded .pt2) becomes ONNX through the ops' reference
    decompositions."""
    model = tiny_model().set_fused(True, backend="reference")
    program = export.export_program(model, clip(2, 0), dynamic_batch=True)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    onnx_program = export.export_onnx(torch.export.load(str(tmp_path / "model.pt2")))
    onnx_program.save(str(tmp_path / "model.onnx"))
    assert export.nonstandard_nodes(onnx.load(str(tmp_path / "model.onnx"))) == []
    x = clip(3, 3)
    with torch.no_grad():
        assert export.relative_difference(run_onnx(tmp_path / "model.onnx", x), model(x)) < 1e-5


def test_traced_reference_model_and_legacy_onnx_exporter(tmp_path):
    """torch.jit.trace and the TorchScript-based ONNX exporter (dynamo=False), the usual route into TensorRT:
    the shape arithmetic traces, so the batch stays dynamic."""
    model = tiny_model()
    traced = torch.jit.trace(model, (clip(2, 0),))
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(model, (clip(2, 0),), str(path), dynamo=False, opset_version=17, input_names=["video"],
                      output_names=["logits"], dynamic_axes={"video": {0: "batch"}, "logits": {0: "batch"}})
    assert export.nonstandard_nodes(onnx.load(str(path))) == []
    with torch.no_grad():
        for batch in (2, 3):
            x = clip(batch, batch)
            expected = model(x)
            assert export.relative_difference(traced(x), expected) < 1e-6
            assert export.relative_difference(run_onnx(path, x), expected) < 1e-5


def test_fused_ops_accept_a_traced_T():
    """Under torch.jit.trace a size read from a shape is a tensor: the fused ops take it for T."""
    model = tiny_model().set_fused(True, backend="reference")
    x = clip(2, 0)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    ops = {n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith("uniformerv2::")}
    assert {"uniformerv2::local_temporal_mhra_fwd", "uniformerv2::global_query_attention_fwd"} <= ops
    with torch.no_grad():
        assert export.relative_difference(traced(x), model(x)) < 1e-6


def test_export_command_from_a_training_checkpoint(tmp_path, capsys):
    """uniformerv2-train (a few steps on the synthetic data) -> uniformerv2-export: both files, each run back
    and checked against the eager model, with the run's class names in their metadata."""
    run = tmp_path / "run"
    train.main(["--preset", "synthetic", "--output-dir", str(run), "train.progress=false", "train.max_steps=2",
                "train.epochs=1", "train.batch_size=4", "train.eval_every=0", "data.synthetic.train_size=8",
                "data.synthetic.val_size=4", "data.num_frames=4", "data.crop_size=16",
                "model.overrides={width: 16, layers: 1, heads: 2, patch_size: 8, input_resolution: 16, "
                "return_list: [0], mlp_dropout: [0.0], no_lmhra: false}"])
    capsys.readouterr()
    prefix = tmp_path / "exports" / "synthetic"
    assert export.main([str(run / "last.pt"), "--output", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert out.count("(ok, tolerance 1e-04)") == 2, out
    assert "torch.export.load" in out and "onnxruntime CPUExecutionProvider" in out
    info = json.loads({p.key: p.value for p in onnx.load(f"{prefix}.onnx").metadata_props}["uniformerv2"])
    assert info["input"]["shape"] == ["batch", 3, 4, 16, 16] and len(info["classes"]) == 4
    assert info["config"]["width"] == 16
    program = torch.export.load(f"{prefix}.pt2")
    x = torch.randn(5, 3, 4, 16, 16)
    model, _, _ = evaluate.load_trained(str(run / "last.pt"), fused=False)
    with torch.no_grad():
        assert export.relative_difference(program.module()(x), model(x)) < 1e-5


@pytest.mark.parametrize("argv, message", [
    (["tiny", "--format", "tflite"], "--format 'tflite': expected pt2, onnx or pt2,onnx"),
    (["tiny", "--dtype", "bf16"], "--dtype 'bf16': expected one of"),
    (["tiny", "--batch", "1"], "--batch 1 cannot be traced with a dynamic batch"),
    (["tiny", "--opset", "17"], "--opset 17: expected 18 or newer"),
    (["tiny", "--fused", "maybe"], "--fused 'maybe': expected auto, true or false"),
    (["no_such_model"], "'no_such_model' is neither a checkpoint file nor a model name"),
    (["tiny", "--model", "b16"], "--model 'b16': not a model name"),
])
def test_export_command_reports_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        export.main([*argv, "--output", str(tmp_path / "out" / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "uniformerv2-export: error: " + message in err, err
    assert not (tmp_path / "out").exists()


def test_export_command_reports_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        export.main([str(bad), "--model", "tiny", "--output", str(tmp_path / "out" / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"uniformerv2-export: error: {bad}: " in err and "checkpoint" in err, err
    assert not (tmp_path / "out").exists()
