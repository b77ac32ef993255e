"""GraphedInference and GraphedTrainStep (uniformerv2/cuda_graph.py): a CUDA-graph replay of the model's
forward (inference), or of a training step's forward, loss and backward, equals the model run eagerly.

The replay itself needs a GPU; on the CPU the wrappers run the model as is, and their argument checks run
everywhere.
"""

import contextlib
import copy

import pytest
import torch

import uniformerv2
from uniformerv2.cuda_graph import (GraphedInference, GraphedTrainStep, check_training_options,
                                    resolve_train_cuda_graph)

from conftest import requires_cuda
from test_model import randomise_

SMALL = dict(input_resolution=32, patch_size=8, width=64, layers=3, heads=2, return_list=[1, 2],
             temporal_downsample=False, backbone_drop_path_rate=0.0, drop_path_rate=0.0, mlp_dropout=0.0,
             cls_dropout=0.0)


def small_model(fused=False, device="cpu"):
    model = randomise_(uniformerv2.build_model("tiny", num_frames=4, num_classes=5, **SMALL))
    if fused:
        model.set_fused(True)
    return model.to(device).eval()


def video(batch, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 4, 32, 32, generator=g).to(device)


def test_cpu_inputs_run_the_model_as_is():
    model = small_model()
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(True)
        yield

    graphed = GraphedInference(model, context=context)
    x = video(3)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(graphed(x), expected)
    assert graphed.graph is None and graphed.eager_calls == 1 and entered == [True]


def test_bad_arguments_are_named():
    model = small_model()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GraphedInference(lambda v: v)
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        GraphedInference(model, warmup=0)
    with pytest.raises(TypeError, match="video must be a tensor"):
        GraphedInference(model)([1, 2])
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        GraphedInference(model.train())(video(2))


def test_evaluation_config_has_the_switch():
    from uniformerv2.recipes import DEFAULTS

    assert DEFAULTS["eval"]["cuda_graph"] is False


@requires_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_replay_equals_the_model_full_padded_and_other_shapes(fused):
    model = small_model(fused=fused, device="cuda")
    graphed = GraphedInference(model)
    full, part, other = video(4, "cuda", 1), video(3, "cuda", 2), video(6, "cuda", 3)
    with torch.no_grad():
        expected = [model(v) for v in (full, part, other)]
    out_full = graphed(full)
    assert graphed.graph is not None and graphed.replays == 1
    out_part = graphed(part)  # padded to the captured batch of 4, cut back to 3
    out_other = graphed(other)  # larger than the captured batch: eager
    assert graphed.replays == 2 and graphed.eager_calls == 1
    for name, got, want in zip(("full", "padded", "other"), (out_full, out_part, out_other), expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} batch")


@requires_cuda
def test_replay_under_bf16_autocast_equals_the_model():
    model = small_model(fused=True, device="cuda")

    def context():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    graphed = GraphedInference(model, context=context)
    x = video(4, "cuda")
    with torch.no_grad(), context():
        expected = model(x)
    got = graphed(x)
    assert got.dtype == expected.dtype and graphed.replays == 1
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@requires_cuda
def test_replay_sees_in_place_parameter_updates():
    model = small_model(device="cuda")
    graphed = GraphedInference(model)
    x = video(2, "cuda")
    before = graphed(x)
    with torch.no_grad():
        model.transformer.proj[2].weight.mul_(2.0)  # what optimizer.step() and load_state_dict do: in place
        expected = model(x)
    after = graphed(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def _evaluate(cuda_graph: bool, device: str) -> dict:
    from uniformerv2 import distributed as du
    from uniformerv2.evaluate import evaluate_model
    from uniformerv2.recipes import build_config
    from uniformerv2.runtime import build_dataset, model_from_config

    # 13 validation clips in batches of 4: the last batch (1 clip) is padded on the graph's path
    cfg = build_config("synthetic", None, ["data.synthetic.val_size=13", "eval.batch_size=4",
                                           f"eval.cuda_graph={str(cuda_graph).lower()}", "data.num_workers=0"])
    dataset = build_dataset(cfg, train=False)
    torch.manual_seed(0)
    model, _ = model_from_config(cfg, dataset.num_classes, log=False)
    info = du.DistInfo(device=torch.device(device))
    return evaluate_model(model.to(device), dataset, cfg, info, dataset.num_classes, progress=False)


def test_evaluation_with_the_switch_on_a_cpu_is_the_plain_one():
    plain, switched = _evaluate(False, "cpu"), _evaluate(True, "cpu")
    assert plain["acc1"] == switched["acc1"] and plain["indices"] == switched["indices"] == list(range(13))


@requires_cuda
def test_evaluation_from_the_graph_equals_the_plain_one():
    plain, graphed = _evaluate(False, "cuda"), _evaluate(True, "cuda")
    assert plain["indices"] == graphed["indices"] == list(range(13))
    for key in ("acc1", "acc5", "mean_class_acc"):
        if key in plain:
            assert abs(plain[key] - graphed[key]) < 1e-6, key


# ------------------------------------------------------------------------------------------ training


def loss_fn(logits, label):
    return torch.nn.functional.cross_entropy(logits.float(), label)


def labels(batch, device="cpu", seed=0):
    return torch.randint(0, 5, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)


def _eager_step(model, x, y):
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach()


def test_train_step_on_cpu_inputs_is_the_eager_step_with_gradients_rewritten():
    model = small_model().train()
    reference = copy.deepcopy(model)
    step = GraphedTrainStep(model, loss_fn)
    x, y = video(3), labels(3)
    for _ in range(2):  # the second call rewrites the gradients (zeroed in place), never accumulates
        loss = step(x, y)
    expected = _eager_step(reference, x, y)
    assert step.graph is None and step.eager_calls == 2
    assert torch.equal(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name


def test_train_step_bad_arguments_and_options_are_named():
    model = small_model()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GraphedTrainStep(lambda v: v, loss_fn)
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        GraphedTrainStep(model, loss_fn, warmup=0)
    with pytest.raises(ValueError, match=r"model\.train\(\)"):
        GraphedTrainStep(model.eval(), loss_fn)(video(2), labels(2))
    from uniformerv2.recipes import DEFAULTS, build_config

    assert DEFAULTS["train"]["cuda_graph"] is False
    check_training_options(build_config("synthetic"), world_size=1)  # the defaults are fine
    cfg = build_config("synthetic", None, ["train.compile=true", "model.grad_checkpointing=true"])
    with pytest.raises(ValueError, match=r"2 processes.*train\.compile=true.*model\.grad_checkpointing=true"):
        check_training_options(cfg, world_size=2)


def test_train_cuda_graph_auto_is_on_only_where_a_graph_can_work(caplog):
    """train.cuda_graph=auto: on for one CUDA process without train.compile or grad checkpointing; off, with
    a log line naming why, elsewhere (where true would be an error); and a setting that is neither is named."""
    from uniformerv2.recipes import build_config

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read
    auto = build_config("synthetic", None, ["train.cuda_graph=auto"])
    assert resolve_train_cuda_graph(auto, cuda, world_size=1) is True
    assert resolve_train_cuda_graph(auto, cpu, world_size=1) is False
    with caplog.at_level("INFO", logger="uniformerv2"):
        assert resolve_train_cuda_graph(auto, cuda, world_size=2) is False
    assert "train.cuda_graph=auto: the training steps run eagerly (2 processes" in caplog.text
    compiled = build_config("synthetic", None, ["train.cuda_graph=auto", "train.compile=true"])
    assert resolve_train_cuda_graph(compiled, cuda, world_size=1) is False
    for switch, expected in (("false", False), ("true", True)):
        cfg = build_config("synthetic", None, [f"train.cuda_graph={switch}"])
        assert resolve_train_cuda_graph(cfg, cuda, world_size=1) is expected
    with pytest.raises(ValueError, match=r"train\.cuda_graph=true cannot be used with 2 processes"):
        resolve_train_cuda_graph(build_config("synthetic", None, ["train.cuda_graph=true"]), cuda, world_size=2)
    with pytest.raises(ValueError, match=r"train\.cuda_graph='sometimes': expected one of true, false, auto"):
        build_config("synthetic", None, ["train.cuda_graph=sometimes"])


def test_training_with_the_switch_on_a_cpu_is_the_plain_one(tmp_path, monkeypatch):
    from test_train import TINY, _rows
    from uniformerv2 import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU on a GPU machine too

    runs = {}
    for switch in ("false", "true"):
        out = tmp_path / switch
        assert train.main(["--preset", "synthetic", "--output-dir", str(out), *TINY, "train.batch_size=4",
                           "train.max_steps=3", "train.epochs=1", "train.eval_every=0",
                           f"train.cuda_graph={switch}"]) == 0
        runs[switch] = [r["loss"] for r in _rows(out)]
    assert len(runs["true"]) == 3 and runs["true"] == runs["false"]


@requires_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_graphed_training_steps_equal_eager_steps(fused):
    """Three SGD steps, graphed and eager side by side (no drop path or dropout: the same math; SGD, not
    AdamW, whose normalisation would turn rounding-level gradient differences into full-size steps); the
    third batch has another size and runs eagerly on the graphed side. Losses and gradients match at every
    step, and BatchNorm's running statistics at the end: the warm-up's updates are undone."""
    model = small_model(fused=fused, device="cuda").train()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    step = GraphedTrainStep(model, loss_fn)
    batches = [(video(4, "cuda", 1), labels(4, "cuda", 1)), (video(4, "cuda", 2), labels(4, "cuda", 2)),
               (video(3, "cuda", 3), labels(3, "cuda", 3))]
    for i, (x, y) in enumerate(batches):
        loss = step(x, y)
        expected = _eager_step(reference, x, y)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5, msg=f"loss of step {i}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{name}.grad, step {i}")
        opt.step()
        opt_ref.step()
    assert step.replays == 2 and step.eager_calls == 1
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)


@requires_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_graphed_steps_draw_the_eager_steps_drop_path_masks(fused):
    """With drop path on (rate 0.5: a different mask changes the loss by far more than rounding), graphed and
    eager training from the same CUDA random state give the same losses and gradients step after step: the
    warm-up passes' random numbers are given back before the capture, and each replay draws from the
    generator's state as the eager kernels would."""
    rates = dict(SMALL, backbone_drop_path_rate=0.5, drop_path_rate=0.5)
    model = randomise_(uniformerv2.build_model("tiny", num_frames=4, num_classes=5, **rates))
    if fused:
        model.set_fused(True)
    model = model.to("cuda").train()
    reference = copy.deepcopy(model)
    step = GraphedTrainStep(model, loss_fn)
    batches = [(video(4, "cuda", i), labels(4, "cuda", i)) for i in (1, 2, 3)]
    torch.cuda.manual_seed(123)
    graphed = [step(x, y) for x, y in batches[:1]]
    grads = [p.grad.clone() for p in model.parameters()]
    graphed += [step(x, y) for x, y in batches[1:]]
    torch.cuda.manual_seed(123)
    eager = [_eager_step(reference, *batches[0])]
    ref_grads = [p.grad.clone() for p in reference.parameters()]
    eager += [_eager_step(reference, x, y) for x, y in batches[1:]]
    assert step.replays == 3
    for i, (a, b) in enumerate(zip(graphed, eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"loss of step {i}")
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=f"{name}.grad of the first step")


@requires_cuda
def test_resume_from_the_graph_continues_exactly(tmp_path):
    """With train.cuda_graph=true, N steps straight == k steps, stop, resume to N (no dropout or drop path
    here: test_graphed_steps_draw_the_eager_steps_drop_path_masks covers the random stream). BatchNorm and
    an epoch boundary included. Evidence for making the graph the default for one-GPU training
    (benchmarks/results/h200_2026-11-26.md)."""
    from test_train import TINY, _rows
    from uniformerv2 import train

    common = ["--preset", "synthetic", *TINY, "data.synthetic.train_size=24", "data.synthetic.val_size=4",
              "train.batch_size=6", "train.epochs=2", "train.eval_every=0", "eval.batch_size=4",
              "train.cuda_graph=true", "model.overrides.mlp_dropout=[0, 0]", "model.overrides.cls_dropout=0",
              "model.overrides.backbone_drop_path_rate=0", "model.overrides.drop_path_rate=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main([*common, "--output-dir", str(straight), "train.max_steps=6"]) == 0
    assert train.main([*common, "--output-dir", str(split), "train.max_steps=3"]) == 0
    assert train.main([*common, "--output-dir", str(split), "train.max_steps=6", "--resume"]) == 0
    a, b = [r["loss"] for r in _rows(straight)], [r["loss"] for r in _rows(split)]
    assert len(a) == 6 and a == b and len(set(a)) == 6
    sa = torch.load(straight / "last.pt", weights_only=False, map_location="cpu")
    sb = torch.load(split / "last.pt", weights_only=False, map_location="cpu")
    for k, v in sa["model_state"].items():
        assert torch.equal(v, sb["model_state"][k]), k


@requires_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_from_the_graph_follows_eager_training_under_autocast(tmp_path, amp):
    """The training script with and without train.cuda_graph, under bf16 autocast and under fp16 autocast
    with its GradScaler (whose scale the graph reads from a device tensor the eager update() changes in
    place). No dropout or drop path in this preset, so the first step's loss (before any update) is the same
    math on both sides; later steps drift only by rounding that AdamW amplifies."""
    from test_train import TINY, _rows
    from uniformerv2 import train

    losses = {}
    for switch in ("false", "true"):
        out = tmp_path / switch
        assert train.main(["--preset", "synthetic", "--output-dir", str(out), *TINY, "train.batch_size=4",
                           "train.max_steps=4", "train.epochs=1", "train.eval_every=0", f"train.amp={amp}",
                           f"train.cuda_graph={switch}"]) == 0
        losses[switch] = torch.tensor([r["loss"] for r in _rows(out)])
    graphed, eager = losses["true"], losses["false"]
    assert len(graphed) == 4 and torch.isfinite(graphed).all()
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(graphed, eager, rtol=5e-2, atol=1e-2)
