"""torch.compile of the fused model: a first-class path (issue 20), equal to the fused model run eagerly.

The fused ops are torch.library operators with fake kernels, so dynamo records them in one graph
(fullgraph=True) and inductor compiles the glue between them. On a GPU these tests compile with inductor;
on the CPU with aot_eager (dynamo + AOTAutograd + functionalization + the ops' fake kernels, without code
generation: inductor needs over a minute per graph on the development machine), on the reference backend of
the ops (the operators and their fake kernels are the same for every backend).
"""

import torch

import uniformerv2
import uniformerv2.model
from uniformerv2 import train
from uniformerv2_kernels import backends
from uniformerv2_kernels.testing import rel_error

from test_model import randomise_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
COMPILE_BACKEND = "inductor" if CUDA else "aot_eager"
OPS_BACKEND = "triton" if CUDA else "reference"
# aot_eager runs the same ATen ops as eager; inductor fuses the glue and may reorder fp32 sums
TOLERANCE = 1e-4 if CUDA else 1e-5

SMALL = dict(input_resolution=32, patch_size=8, width=32, layers=2, heads=1, return_list=[0, 1],
             temporal_downsample=False, no_lmhra=False, double_lmhra=True, backbone_drop_path_rate=0.0,
             drop_path_rate=0.0, mlp_dropout=0.0, cls_dropout=0.0)


def fused_model():
    torch.manual_seed(0)
    model = randomise_(uniformerv2.build_model("tiny", num_frames=4, num_classes=5, **SMALL))
    return model.to(DEVICE).set_fused(True, backend=OPS_BACKEND)


def video(batch=2):
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def test_a_compiled_fused_models_first_call_is_one_graph(monkeypatch):
    """The fused ops are imported when the model is switched to them: a first forward inside torch.compile
    would otherwise have to trace their lazy import, which dynamo cannot (a graph break in the stem)."""
    monkeypatch.setattr(uniformerv2.model, "_FUSED_OPS", None)
    torch._dynamo.reset()
    model = fused_model().eval()
    with torch.no_grad():
        logits = torch.compile(model, fullgraph=True, backend="eager")(video(1))
    assert logits.shape == (1, 5)


def test_compiled_fused_model_matches_eager_forward_and_backward():
    """Training mode (BatchNorm batch statistics and running-statistic updates included): logits, every
    parameter gradient and the BN running statistics equal the fused model run eagerly."""
    torch._dynamo.reset()
    eager_model = fused_model().train()
    compiled_model = fused_model().train()
    x = video()

    def run(model, fn):
        logits = fn(x)
        logits.float().square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, dict(model.named_buffers())

    logits, grads, buffers = run(eager_model, eager_model)
    c_logits, c_grads, c_buffers = run(compiled_model,
                                       torch.compile(compiled_model, fullgraph=True, backend=COMPILE_BACKEND))
    assert rel_error(c_logits, logits) < TOLERANCE
    assert set(c_grads) == set(grads) and len(grads) == len(list(eager_model.parameters()))
    for name, grad in grads.items():
        assert rel_error(c_grads[name], grad) < TOLERANCE, name
    assert any("running_mean" in name for name in buffers)
    for name, buf in buffers.items():
        if buf.is_floating_point():
            assert rel_error(c_buffers[name], buf) < TOLERANCE, name
        else:
            assert torch.equal(c_buffers[name], buf), name


def test_training_with_train_compile_on_the_fused_model(tmp_path, monkeypatch):
    """uniformerv2-train with model.fused=true train.compile=true: the fused model is compiled, trains, and
    its losses equal those of the same run without compile; the checkpoint holds the plain model's keys."""
    compiles = []
    plain_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiles.append((type(model).__name__, kwargs))
        # on the CPU dynamo alone ("eager"): the trainer's wiring is under test here, AOTAutograd above
        kwargs.setdefault("backend", "inductor" if CUDA else "eager")
        return plain_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setenv(backends.ENV_BACKEND, OPS_BACKEND)  # on the CPU: not the interpreted Triton kernels
    model = ("model.overrides={width: 32, layers: 2, heads: 1, patch_size: 8, return_list: [0, 1], "
             "no_lmhra: false, backbone_drop_path_rate: 0.0, drop_path_rate: 0.0}")
    common = ["--preset", "synthetic", model, "data.num_frames=4", "data.crop_size=32", "train.progress=false",
              "train.log_every=1", "data.synthetic.train_size=8", "data.synthetic.val_size=2",
              "train.batch_size=4", "train.max_steps=2", "train.epochs=1", "train.eval_every=0",
              "data.num_workers=0", "model.fused=true", "optim.clip_grad=null"]
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert train.main([*common, "--output-dir", str(tmp_path / "compiled"), "train.compile=true"]) == 0
    assert compiles and compiles[0][0] == "UniFormerV2", compiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before
    assert train.main([*common, "--output-dir", str(tmp_path / "eager"), "train.compile=false"]) == 0
    assert len(compiles) == 1

    def losses(run):
        import json
        with open(tmp_path / run / "metrics.jsonl") as fh:
            return [r["loss"] for r in map(json.loads, fh) if r["kind"] == "train"]

    compiled, eager = losses("compiled"), losses("eager")
    assert len(compiled) == 2 and all(torch.isfinite(torch.tensor(compiled)))
    assert rel_error(torch.tensor(compiled), torch.tensor(eager)) < TOLERANCE, (compiled, eager)
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=False, map_location="cpu")["model_state"]
    assert state and not any(key.startswith("_orig_mod.") for key in state)
