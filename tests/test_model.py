"""The reference UniFormerV2: official keys, shapes, parameter counts, forward, gradients, init identities."""

import pytest
import torch

import uniformerv2
from uniformerv2.model import Extractor, LocalTemporalMHRA


def official_keys(layers, return_list, lmhra, double_lmhra, frozen=False):
    """The official state-dict keys, written out from DESIGN.md section 2 (independently of our modules)."""
    keys = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        keys += [p + s for s in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                 "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight",
                                 "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
                                 "ln_2.bias")]
        for m in (["lmhra1", "lmhra2"] if double_lmhra else ["lmhra1"]) if lmhra else []:
            q = p + m + ".pos_embed."
            keys += [q + "0." + s for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
            keys += [q + f"{k}.{s}" for k in (1, 2, 3) for s in ("weight", "bias")]
    keys.append("transformer.temporal_cls_token")
    for j in range(len(return_list)):
        keys += [f"transformer.dpe.{j}.weight", f"transformer.dpe.{j}.bias"]
        p = f"transformer.dec.{j}."
        keys += [p + s for s in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                 "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                 "ln_3.weight", "ln_3.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                 "mlp.c_proj.weight", "mlp.c_proj.bias")]
    keys += ["transformer.proj.0.weight", "transformer.proj.0.bias", "transformer.proj.2.weight",
             "transformer.proj.2.bias"]
    if not frozen:
        keys.append("transformer.balance")
    return sorted(keys)


def build_meta(name, **kw):
    with torch.device("meta"):
        return uniformerv2.build_model(name, **kw)


@pytest.mark.parametrize("name", uniformerv2.list_models())
def test_state_dict_keys_are_official(name):
    model = build_meta(name)
    c = model.config
    expected = official_keys(c["layers"], c["return_list"], not c["no_lmhra"], c["double_lmhra"], c["frozen"])
    assert sorted(model.state_dict()) == expected


@pytest.mark.parametrize("name", uniformerv2.list_models())
def test_state_dict_shapes(name):
    model = build_meta(name)
    c = model.config
    sd = model.state_dict()
    C, p, res = c["width"], c["patch_size"], c["input_resolution"]
    kt = c["kernel_size"] if c["temporal_downsample"] else 1
    assert sd["conv1.weight"].shape == (C, 3, kt, p, p)
    assert sd["positional_embedding"].shape == ((res // p) ** 2 + 1, C)
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * C, C)
    assert sd["transformer.resblocks.0.mlp.c_fc.weight"].shape == (4 * C, C)
    assert sd["transformer.dpe.0.weight"].shape == (C, 1, 3, 3, 3)
    assert sd["transformer.temporal_cls_token"].shape == (1, 1, C)
    assert sd["transformer.proj.2.weight"].shape == (c["num_classes"], C)
    if not c["no_lmhra"]:
        Cr = int(C // c["dw_reduction"])
        assert sd["transformer.resblocks.0.lmhra1.pos_embed.1.weight"].shape == (Cr, C, 1, 1, 1)
        assert sd["transformer.resblocks.0.lmhra1.pos_embed.2.weight"].shape == (Cr, 1, 3, 1, 1)
        assert sd["transformer.resblocks.0.lmhra1.pos_embed.3.weight"].shape == (C, Cr, 1, 1, 1)


def test_parameter_counts_match_the_release():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    k400 = build_meta("k400_b16_f8x224")
    assert count(k400) == 114_552_208
    assert len(k400.state_dict()) == 219
    assert count(build_meta("ssv2_b16_f16x224")) == 162_992_814
    assert count(build_meta("ssv2_b16_f16x224")) == count(build_meta("ssv2_b16_f32x224"))


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="widht"):
        uniformerv2.build_model("tiny", widht=32)
    with pytest.raises(KeyError, match="unknown model"):
        uniformerv2.build_model("no_such_model")


def test_overrides_follow_official_meaning():
    model = build_meta("k400_b16_f8x224", num_classes=7, num_frames=4, return_list=[10, 11],
                       backbone_drop_path_rate=0.1)
    assert model.config["t_size"] == 4
    assert model.config["n_layers"] == 2 and len(model.transformer.dec) == 2
    assert model.transformer.proj[2].out_features == 7
    assert model.transformer.resblocks[-1].drop_prob == pytest.approx(0.1)
    assert model.transformer.resblocks[0].drop_prob == 0.0


@pytest.mark.parametrize("name,frames,classes", [("k400_b16_f8x224", 8, 400), ("ssv2_b16_f16x224", 8, 174)])
def test_forward_full_size_gives_logits(name, frames, classes):
    model = uniformerv2.build_model(name, num_frames=frames).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, frames, 224, 224))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def randomise_(model, scale=0.3):
    """Every parameter and BN statistic random: zero-initialised parts hide bugs. Deep real-size models
    need a smaller `scale` (e.g. 0.02, CLIP's init) to stay finite through 12 blocks."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def tiny(**kw):
    base = dict(input_resolution=16, patch_size=8, width=16, layers=2, heads=2, return_list=[0, 1],
                num_frames=4, num_classes=3, dw_reduction=1.5, mlp_dropout=[0.0, 0.0], cls_dropout=0.0)
    base.update(kw)
    frames = base.pop("num_frames")
    classes = base.pop("num_classes")
    return uniformerv2.build_model("tiny", num_frames=frames, num_classes=classes, **base)


def test_gradcheck_tiny_model_float64():
    model = randomise_(tiny(num_frames=2, temporal_downsample=False)).double().eval()
    x = torch.randn(1, 3, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gradcheck_tiny_model_parameters_float64():
    """Gradients of parameters of every kind of part: LMHRA convs, BN, DPE, global attention, balance."""
    model = randomise_(tiny(num_frames=4, temporal_downsample=True)).double().eval()
    names = ["transformer.resblocks.0.lmhra1.pos_embed.2.weight", "transformer.resblocks.1.lmhra2.pos_embed.0.weight",
             "transformer.dpe.0.weight", "transformer.dec.1.attn.in_proj_weight", "transformer.balance",
             "transformer.dec.0.ln_3.weight", "conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
             "transformer.resblocks.1.mlp.c_fc.weight", "positional_embedding"]
    params = dict(model.named_parameters())
    x = torch.randn(1, 3, 4, 16, 16, dtype=torch.float64)

    def f(*tensors):
        overrides = dict(zip(names, tensors))
        return torch.func.functional_call(model, overrides, (x,))

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_zero_initialised_parts_are_identities():
    torch.manual_seed(0)
    lmhra = LocalTemporalMHRA(16).eval()
    x = torch.randn(1 + 4, 2 * 3, 16)
    assert torch.equal(lmhra.forward_stream(x, 3, 0.0, fused=False), x)

    dec = Extractor(16, 2).eval()
    q = torch.randn(1, 2, 16)
    assert torch.equal(dec(q, torch.randn(12, 2, 16)), q)

    model = tiny(num_frames=4).eval()
    assert torch.count_nonzero(model.transformer.temporal_cls_token) == 0
    # At init the global query stays zero, and balance 0 means f = 0.5 * mean of final class tokens.
    video = torch.randn(2, 3, 4, 16, 16)
    stream, T = model.stem(video)
    for blk in model.transformer.resblocks:
        stream = blk(stream, T)
    L, NT, C = stream.shape
    residual = stream.view(L, 2, T, C)[0].mean(1)
    expected = model.transformer.proj(0.5 * residual)
    torch.testing.assert_close(model(video), expected)


def test_drop_path_is_identity_in_eval_and_random_in_train():
    model = randomise_(tiny(backbone_drop_path_rate=0.5, drop_path_rate=0.5))
    x = torch.randn(2, 3, 4, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    torch.manual_seed(2)
    c = model(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomise_(tiny())
    x = torch.randn(2, 3, 4, 16, 16)
    model.eval()
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_frozen_variant_has_no_balance_and_a_frozen_backbone():
    model = build_meta("k400_l14_336_frozen")
    assert not hasattr(model.transformer, "balance")
    assert not model.conv1.weight.requires_grad
    assert not model.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    assert model.transformer.dec[0].attn.in_proj_weight.requires_grad


def test_any_frame_count_and_bad_input_errors():
    model = tiny(num_frames=4).eval()
    assert model(torch.randn(1, 3, 6, 16, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match="patch grid"):
        model(torch.randn(1, 3, 4, 24, 24))
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        model(torch.randn(3, 4, 16, 16))
    with pytest.raises(TypeError, match="uint8.*normalised"):  # raw pixels
        model(torch.randint(0, 255, (1, 3, 4, 16, 16), dtype=torch.uint8))
    with pytest.raises(TypeError, match="float64 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 4, 16, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the input itself, but never float64
        assert model(torch.randn(1, 3, 4, 16, 16, dtype=torch.float16)).shape == (1, 3)
        with pytest.raises(TypeError, match="float64 but the model's weights are torch.float32"):
            model(torch.randn(1, 3, 4, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="input is on meta but the model is on cpu"):
        model(torch.randn(1, 3, 4, 16, 16, device="meta"))


def test_set_fused_switches_every_block():
    model = tiny()
    model.set_fused(True, backend="reference")
    assert all(b.fused and b.backend == "reference" for b in model.transformer.resblocks)
    assert all(d.fused for d in model.transformer.dec)
    model.set_fused(False)
    assert not any(b.fused for b in model.transformer.resblocks)
