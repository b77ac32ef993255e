"""Checkpoint formats, strict key reports, CLIP initialisation, the K710 head mapping, and files that must
not load (code in a pickle, unreadable bytes)."""

import re
import warnings

import pytest
import torch

import uniformerv2
from uniformerv2.loading import CheckpointError, interpolate_positional_embedding

from test_model import randomise_, tiny


def _video():
    return torch.randn(2, 3, 4, 16, 16)


def _formats(sd):
    """The same weights in every format users hold."""
    official = {"backbone." + k: v for k, v in sd.items()}
    training = {"epoch": 3, "model_state": {"module." + k: v for k, v in sd.items()},
                "optimizer_state": {}, "scaler": None, "cfg": {"x": 1}}
    mm = {}
    for k, v in sd.items():
        if k.startswith("transformer.proj.0."):
            mm["backbone.transformer.norm." + k[len("transformer.proj.0."):]] = v
        elif k.startswith("transformer.proj.2."):
            mm["cls_head.fc_cls." + k[len("transformer.proj.2."):]] = v
        else:
            mm["backbone." + k] = v
    return {"plain": dict(sd), "official": official, "training": training,
            "mmaction2": {"state_dict": mm, "meta": {"epoch": 1}}}


@pytest.mark.parametrize("fmt", ["plain", "official", "training", "mmaction2"])
def test_round_trip_every_format(tmp_path, fmt):
    src = randomise_(tiny()).eval()
    x = _video()
    expected = src(x)
    path = tmp_path / f"{fmt}.pth"
    torch.save(_formats(src.state_dict())[fmt], path)
    dst = tiny().eval()
    report = uniformerv2.load_checkpoint(dst, path)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    assert torch.equal(dst(x), expected)
    for name, value in dst.state_dict().items():
        assert torch.equal(value, src.state_dict()[name]), name


def test_build_model_pretrained_loads(tmp_path):
    src = randomise_(tiny()).eval()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = tiny(pretrained=tmp_path / "w.pth").eval()
    x = _video()
    assert torch.equal(dst(x), src(x))


def test_missing_key_is_named(tmp_path):
    sd = tiny().state_dict()
    del sd["transformer.dec.1.ln_3.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer\.dec\.1\.ln_3\.bias"):
        uniformerv2.load_checkpoint(tiny(), sd)


def test_misshaped_and_unexpected_keys_are_named():
    sd = tiny().state_dict()
    sd["transformer.proj.2.weight"] = torch.randn(5, 16)
    sd["transformer.extra.weight"] = torch.randn(2)
    with pytest.raises(CheckpointError) as info:
        uniformerv2.load_checkpoint(tiny(), sd)
    msg = str(info.value)
    assert "transformer.proj.2.weight: checkpoint (5, 16) vs model (3, 16)" in msg
    assert "transformer.extra.weight" in msg


def test_non_strict_loads_what_fits_and_reports():
    src = randomise_(tiny())
    sd = src.state_dict()
    sd["transformer.proj.2.weight"] = torch.randn(5, 16)
    dst = tiny()
    with pytest.warns(UserWarning, match="loaded partially"):
        report = uniformerv2.load_checkpoint(dst, sd, strict=False)
    assert report["mismatched"] and not report["missing"]
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


def test_a_wrong_file_is_never_loaded_silently(tmp_path):
    torch.save({"epoch": 1, "notes": "nothing"}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        uniformerv2.load_checkpoint(tiny(), tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        uniformerv2.load_checkpoint(tiny(), tmp_path / "absent.pth")
    with pytest.raises(CheckpointError):  # another architecture entirely
        uniformerv2.load_checkpoint(tiny(), {"fc.weight": torch.randn(3, 3)})


def synthetic_clip(width=16, layers=2, grid=2, patch=8, with_text=True):
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
          "visual.positional_embedding": r(grid * grid + 1, width), "visual.ln_pre.weight": r(width),
          "visual.ln_pre.bias": r(width), "visual.ln_post.weight": r(width), "visual.ln_post.bias": r(width),
          "visual.proj": r(width, 8)}
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
                   p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
                   p + "ln_1.weight": r(width), p + "ln_1.bias": r(width), p + "ln_2.weight": r(width),
                   p + "ln_2.bias": r(width), p + "mlp.c_fc.weight": r(4 * width, width),
                   p + "mlp.c_fc.bias": r(4 * width), p + "mlp.c_proj.weight": r(width, 4 * width),
                   p + "mlp.c_proj.bias": r(width)})
    if with_text:  # the text tower shares key names without the `visual.` prefix
        sd["transformer.resblocks.0.attn.in_proj_weight"] = r(3 * 32, 32)
        sd["token_embedding.weight"] = r(10, 32)
    return sd


@pytest.mark.parametrize("temporal_downsample", [True, False])
def test_load_clip_sets_the_right_tensors(temporal_downsample, tmp_path):
    clip = synthetic_clip()
    torch.save(clip, tmp_path / "clip.pt")
    model = tiny(temporal_downsample=temporal_downsample)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = uniformerv2.load_clip(model, tmp_path / "clip.pt")
    sd = model.state_dict()
    w2d = clip["visual.conv1.weight"]
    if temporal_downsample:
        assert sd["conv1.weight"].shape[2] == 3
        assert torch.equal(sd["conv1.weight"][:, :, 1], w2d)
        assert torch.count_nonzero(sd["conv1.weight"][:, :, 0]) == 0
        assert torch.count_nonzero(sd["conv1.weight"][:, :, 2]) == 0
    else:
        assert torch.equal(sd["conv1.weight"][:, :, 0], w2d)
    for k in ("class_embedding", "positional_embedding", "ln_pre.weight",
              "transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_proj.bias"):
        assert torch.equal(sd[k], clip["visual." + k]), k
        assert k in loaded
    # Parts CLIP does not have keep their own initialisation.
    for k in ("transformer.dec.0.attn.in_proj_weight", "transformer.proj.2.weight",
              "transformer.resblocks.0.lmhra1.pos_embed.1.weight"):
        assert torch.equal(sd[k], before[k]), k
    assert not any(k.startswith("ln_post") or k == "proj" for k in loaded)


def test_load_clip_stripped_keys_and_resolution_change():
    clip = {k[len("visual."):]: v for k, v in synthetic_clip(grid=3, with_text=False).items()}
    model = tiny()  # a 2x2 grid: the 3x3 CLIP embedding is interpolated
    with pytest.warns(UserWarning, match="interpolating"):
        uniformerv2.load_clip(model, clip)
    assert model.positional_embedding.shape == (5, 16)
    assert torch.equal(model.positional_embedding[0], clip["positional_embedding"][0])


def test_load_clip_wrong_width_is_named():
    with pytest.raises(CheckpointError, match="class_embedding"):
        uniformerv2.load_clip(tiny(), synthetic_clip(width=32))


def test_positional_embedding_interpolation_identity():
    pos = torch.randn(1 + 16, 8)
    torch.testing.assert_close(interpolate_positional_embedding(pos, 17), pos)


def test_k710_head_mapping():
    model = randomise_(tiny(num_classes=12))
    sd = model.state_dict()
    k400 = uniformerv2.map_k710_head({"backbone." + k: v for k, v in sd.items()}, [5, 0, 11])
    assert torch.equal(k400["backbone.transformer.proj.2.weight"], sd["transformer.proj.2.weight"][[5, 0, 11]])
    mapped = uniformerv2.map_k710_head(model, [2, 3])
    assert mapped.transformer.proj[2].out_features == 2
    assert torch.equal(mapped.transformer.proj[2].bias, sd["transformer.proj.2.bias"][[2, 3]])
    big = {"transformer.proj.2.weight": torch.randn(710, 4), "transformer.proj.2.bias": torch.randn(710)}
    out = uniformerv2.map_k710_head(big, "k400")
    assert torch.equal(out["transformer.proj.2.weight"], big["transformer.proj.2.weight"][:400])
    with pytest.raises(ValueError, match="out of range"):
        uniformerv2.map_k710_head(big, [710])


# ---------------------------------------------------------------------------------------- files from users


class CreatesAFile:
    """Unpickling this calls open(path, "w"): what a malicious checkpoint could do with any callable."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_whose_unpickling_runs_code_is_refused(tmp_path):
    from uniformerv2.evaluate import load_trained

    target = tmp_path / "created_by_the_checkpoint"
    src = tiny()
    path = tmp_path / "evil.pth"
    torch.save({"model_state": src.state_dict(), "payload": CreatesAFile(target)}, path)
    for load in (lambda: uniformerv2.load_checkpoint(tiny(), path), lambda: uniformerv2.load_clip(tiny(), path),
                 lambda: load_trained(str(path), model_name="tiny")):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: refused to load: unpickling it would "
                                                  "call io.open"):
            load()
        assert not target.exists()


def test_an_openai_torchscript_clip_archive_loads(tmp_path):
    """OpenAI ships CLIP as TorchScript archives: one is made here with OpenAI's key names (visual and text
    towers) and every visual tensor must arrive unchanged."""

    class Tree(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    clip = synthetic_clip()
    clip["logit_scale"] = torch.tensor(4.6)
    archive = Tree()
    for key, value in clip.items():
        *path, name = key.split(".")
        module = archive
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, Tree())
            module = getattr(module, part)
        module.register_parameter(name, torch.nn.Parameter(value.clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; OpenAI's files exist
        torch.jit.script(archive).save(str(tmp_path / "ViT-B-16.pt"))
    model = tiny()
    loaded = uniformerv2.load_clip(model, tmp_path / "ViT-B-16.pt")
    sd = model.state_dict()
    visual = {k[len("visual."):]: v for k, v in clip.items() if k.startswith("visual.")}
    expected = sorted(k for k in visual if k != "proj" and not k.startswith("ln_post."))
    assert loaded == expected
    for k in expected:
        if k == "conv1.weight":
            assert torch.equal(sd[k][:, :, 1], visual[k]), k  # inflated in time, the middle slice
        else:
            assert torch.equal(sd[k], visual[k]), k


@pytest.mark.parametrize("content, expected", [
    (b"", "empty file, expected a PyTorch checkpoint"),
    (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    (b"PK\x03\x04" + bytes(200), "not a readable PyTorch checkpoint"),  # a zip header, then nothing
])
def test_an_unreadable_checkpoint_file_is_named(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    for load in (uniformerv2.load_checkpoint, uniformerv2.load_clip):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {expected}"):
            load(tiny(), path)


def test_a_non_dict_checkpoint_is_named(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 'list.pth'))}: expected a state dict"):
        uniformerv2.load_checkpoint(tiny(), tmp_path / "list.pth")
