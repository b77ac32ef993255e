"""Named configurations: the official factory functions and one preset per published recipe.

Every entry is a dict of the official constructor arguments (`UniFormerV2.__init__`); `build_model`
applies `num_classes`, `num_frames` (= t_size, the number of input frames) and any override on top.
"""

from __future__ import annotations

import copy
import inspect

# Official factory defaults (uniformerv2_b16 / _l14 / _l14_336 of the release): LMHRA x2, temporal
# downsample, 16 input frames, four global blocks on the last four layers.
_FACTORY_DEFAULTS = dict(
    t_size=16, dw_reduction=1.5, backbone_drop_path_rate=0.0, temporal_downsample=True, no_lmhra=False,
    double_lmhra=True, mlp_factor=4.0, drop_path_rate=0.0, cls_dropout=0.5, num_classes=400,
    kernel_size=3, use_checkpoint=False, checkpoint_num=[0], frozen=False, output_dim=512,
)

B16 = dict(input_resolution=224, patch_size=16, width=768, layers=12, heads=12, n_dim=768, n_head=12)
L14 = dict(input_resolution=224, patch_size=14, width=1024, layers=24, heads=16, n_dim=1024, n_head=16)
L14_336 = dict(L14, input_resolution=336)


def _globals(return_list):
    return dict(return_list=list(return_list), n_layers=len(return_list), mlp_dropout=[0.5] * len(return_list))


# Kinetics / MiT style: 1x16x16 (or 1x14x14) stem, no LMHRA, global blocks on the last four layers.
_KINETICS = dict(temporal_downsample=False, no_lmhra=True, double_lmhra=False,
                 backbone_drop_path_rate=0.0, drop_path_rate=0.0)
# Something-Something style: 3xPxP stride-2 stem, LMHRA x2, global blocks on the later half.
_SSV2 = dict(temporal_downsample=True, no_lmhra=False, double_lmhra=True,
             backbone_drop_path_rate=0.2, drop_path_rate=0.4)

MODELS: dict[str, dict] = {
    # Official factory names, with the release's defaults.
    "uniformerv2_b16": dict(_FACTORY_DEFAULTS, **B16, **_globals([8, 9, 10, 11])),
    "uniformerv2_l14": dict(_FACTORY_DEFAULTS, **L14, **_globals([20, 21, 22, 23])),
    "uniformerv2_l14_336": dict(_FACTORY_DEFAULTS, **L14_336, **_globals([20, 21, 22, 23])),
    # Kinetics-400 / 600 / 700 / 710 and Moments-in-Time recipes.
    "k400_b16_f8x224": dict(_FACTORY_DEFAULTS, **B16, **_KINETICS, **_globals([8, 9, 10, 11]), t_size=8),
    "k400_b16_f16x224": dict(_FACTORY_DEFAULTS, **B16, **_KINETICS, **_globals([8, 9, 10, 11]), t_size=16),
    "k710_b16_f8x224": dict(_FACTORY_DEFAULTS, **B16, **_KINETICS, **_globals([8, 9, 10, 11]), t_size=8,
                            num_classes=710),
    "k400_l14_f8x224": dict(_FACTORY_DEFAULTS, **L14, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=8),
    "k400_l14_f16x224": dict(_FACTORY_DEFAULTS, **L14, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=16),
    "k400_l14_f32x224": dict(_FACTORY_DEFAULTS, **L14, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=32),
    "k400_l14_f16x336": dict(_FACTORY_DEFAULTS, **L14_336, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=16),
    "k400_l14_f32x336": dict(_FACTORY_DEFAULTS, **L14_336, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=32),
    "k400_l14_f64x336": dict(_FACTORY_DEFAULTS, **L14_336, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=64),
    "k710_l14_f8x224": dict(_FACTORY_DEFAULTS, **L14, **_KINETICS, **_globals([20, 21, 22, 23]), t_size=8,
                            num_classes=710),
    "k400_l14_336_frozen": dict(_FACTORY_DEFAULTS, **L14_336, **_KINETICS, **_globals([20, 21, 22, 23]),
                                t_size=8, frozen=True),
    "mit_b16_f8x224": dict(_FACTORY_DEFAULTS, **B16, **_KINETICS, **_globals([8, 9, 10, 11]), t_size=8,
                           num_classes=339),
    # Something-Something V2 recipes (174 classes).
    "ssv2_b16_f16x224": dict(_FACTORY_DEFAULTS, **B16, **_SSV2, **_globals(range(4, 12)), t_size=16,
                             num_classes=174),
    "ssv2_b16_f32x224": dict(_FACTORY_DEFAULTS, **B16, **_SSV2, **_globals(range(4, 12)), t_size=32,
                             num_classes=174),
    "ssv2_l14_f16x224": dict(_FACTORY_DEFAULTS, **L14, **_SSV2, **_globals(range(8, 24)), t_size=16,
                             num_classes=174),
    "ssv2_l14_f32x224": dict(_FACTORY_DEFAULTS, **L14, **_SSV2, **_globals(range(8, 24)), t_size=32,
                             num_classes=174),
    # A small configuration with every part switched on, for tests and the embedded training default.
    "tiny": dict(_FACTORY_DEFAULTS, input_resolution=32, patch_size=8, width=64, layers=4, heads=2, n_dim=64,
                 n_head=2, t_size=8, **_globals([2, 3]), num_classes=10),
}


def constructor_args() -> set[str]:
    from .model import UniFormerV2

    return set(inspect.signature(UniFormerV2.__init__).parameters) - {"self"}


def list_models() -> list[str]:
    return sorted(MODELS)


def get_config(name: str) -> dict:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return copy.deepcopy(MODELS[name])
