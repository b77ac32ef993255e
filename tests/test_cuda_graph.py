"""GraphedInference (uniformerv2/cuda_graph.py): a CUDA-graph replay of the model's forward equals the model.

The replay itself needs a GPU; on the CPU the wrapper runs the model as is, and its argument checks run
everywhere.
"""

import contextlib

import pytest
import torch

import uniformerv2
from uniformerv2.cuda_graph import GraphedInference

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
    from uniformerv2.train import build_dataset, build_model

    # 13 validation clips in batches of 4: the last batch (1 clip) is padded on the graph's path
    cfg = build_config("synthetic", None, ["data.synthetic.val_size=13", "eval.batch_size=4",
                                           f"eval.cuda_graph={str(cuda_graph).lower()}", "data.num_workers=0"])
    dataset = build_dataset(cfg, train=False)
    torch.manual_seed(0)
    model, _ = build_model(cfg, dataset.num_classes, log=False)
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
