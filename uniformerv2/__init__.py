"""UniFormerV2, the exact official model, with a switch onto the fused kernels of `uniformerv2_kernels`."""

from __future__ import annotations

import uniformerv2_kernels  # noqa: F401  (registers the fused operators, which a saved program may use)

from .configs import constructor_args, get_config, list_models
from .loading import CheckpointError, load_checkpoint, load_clip, map_k710_head
from .model import UniFormerV2

__all__ = [
    "UniFormerV2", "build_model", "list_models", "get_config", "load_checkpoint", "load_clip",
    "map_k710_head", "CheckpointError",
]


def build_model(name: str, num_classes: int | None = None, num_frames: int | None = None, fused: bool = False,
                pretrained=None, backend: str | dict | None = None, **overrides) -> UniFormerV2:
    """Builds a named configuration (see `list_models()`).

    num_classes / num_frames (= t_size, input frames) and `overrides` (any official constructor argument)
    replace the preset's values; an unknown override is an error. `pretrained` is a checkpoint path or
    state dict loaded strictly with `load_checkpoint`. `fused=True` runs the blocks on the fused ops, on
    `backend`: None (automatic), one backend for every op, or a dict op -> backend (`UniFormerV2.set_fused`).
    """
    config = get_config(name)
    unknown = sorted(set(overrides) - constructor_args())
    if unknown:
        raise TypeError(f"unknown override(s) {unknown}; accepted: {sorted(constructor_args())}")
    if "return_list" in overrides:
        n = len(overrides["return_list"])
        overrides.setdefault("n_layers", n)
        if "mlp_dropout" not in overrides and isinstance(config.get("mlp_dropout"), list):
            overrides["mlp_dropout"] = [config["mlp_dropout"][0]] * n
    for key in ("width", "heads"):  # the global blocks follow the backbone unless told otherwise
        if key in overrides:
            other = {"width": "n_dim", "heads": "n_head"}[key]
            overrides.setdefault(other, overrides[key])
    config.update(overrides)
    if num_classes is not None:
        config["num_classes"] = num_classes
    if num_frames is not None:
        config["t_size"] = num_frames
    model = UniFormerV2(**config)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    if fused:
        model.set_fused(True, backend=backend)
    return model
