"""AS-MLP in timm's model registry: after ``import asmlp_min.timm``, ``timm.create_model("asmlp_tiny", ...)`` builds
the model ``asmlp_min.create_model`` builds, so timm's tools (``features_only``, ``out_indices``, ``num_classes``,
``in_chans``, ``global_pool``, ``checkpoint_path``, the data config) take it by name.

Nothing is downloaded: ``pretrained=True`` reads an official checkpoint from disk, named as timm names a local file,
``pretrained_cfg_overlay=dict(file="asmlp_tiny_patch4_shift5_224.pth")``, through asmlp_min's own loader. As timm
does, a head for another number of classes is left fresh and the first conv is adapted to ``in_chans`` other
than 3 (:func:`adapt_input_conv`). Only this module needs timm; ``import asmlp_min`` does not.
"""
from __future__ import annotations

from timm.models import register_model, resolve_pretrained_cfg
from timm.models._builder import pretrained_cfg_for_features
from torch import Tensor

from .backbone import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, MODEL_CONFIGS, ASMLP, create_model
from .checkpoint import (CheckpointError, LoadReport, extract_state_dict, load_backbone_checkpoint, load_checkpoint,
                         load_official_checkpoint, state_dict_entry)

FIRST_CONV = "patch_embed.proj"
# timm options that wrap or dilate a model for features: the model gives its features itself (features_only)
_FEATURE_WRAPPING = ("feature_cls", "feature_cfg", "output_stride")

# The official ImageNet-1k weights (svip-lab/AS-MLP, released on OneDrive, so no url timm could fetch).
default_cfgs = {name: dict(
    input_size=(3, 224, 224), fixed_input_size=False, interpolation="bicubic", crop_pct=EVAL_CROP_PCT,
    crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000, pool_size=(7, 7),
    first_conv=FIRST_CONV, classifier="head", origin_url="https://github.com/svip-lab/AS-MLP",
    paper_ids="arXiv:2107.08391") for name in MODEL_CONFIGS}


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """(c, 3, k, k) RGB weights -> (c, in_chans, k, k), as timm adapts a pretrained first conv.

    One channel sums the three, so a grey image gives the response the RGB weights give to that grey in every
    channel. More channels repeat R, G, B cyclically, scaled by 3 / in_chans: an image that repeats its RGB
    channels in the same cycle gets the RGB response.
    """
    rgb = weight.shape[1]
    if in_chans == rgb:
        return weight
    if rgb != 3:
        raise CheckpointError(f"{FIRST_CONV}.weight has {rgb} input channels: only RGB adapts to in_chans={in_chans}")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.repeat(1, -(-in_chans // rgb), 1, 1)[:, :in_chans] * (rgb / in_chans)


def load_pretrained(model: ASMLP, cfg: dict) -> LoadReport:
    """timm's ``pretrained=True`` from the local file ``cfg["file"]``: strict for a classifier (the head is skipped
    when ``num_classes`` differs from the checkpoint's ``cfg["num_classes"]``), the backbone's keys for a
    ``features_only`` model (its per-stage norms are new unless the file is an mmdet/mmseg checkpoint)."""
    if not cfg.get("file"):
        raise ValueError(f"{cfg['architecture']}: no weights can be downloaded here; pass the official checkpoint "
                         "as pretrained_cfg_overlay=dict(file='path/to/asmlp_tiny_patch4_shift5_224.pth')")
    checkpoint = load_checkpoint(cfg["file"])
    state = extract_state_dict(checkpoint)
    key = f"{FIRST_CONV}.weight"
    if key in state:
        state[key] = adapt_input_conv(state[key], model.in_chans)
    # the adapted weights in place of the file's, beside its config: the loaders check the shift size it states
    entry = state_dict_entry(checkpoint)
    checkpoint = {**checkpoint, entry: state} if entry else state
    if model.features_only:
        return load_backbone_checkpoint(model, checkpoint, name=cfg["architecture"])
    return load_official_checkpoint(model, checkpoint, skip_head=model.num_classes != cfg["num_classes"])


def build(variant: str, pretrained: bool = False, pretrained_cfg: dict | str | None = None,
          pretrained_cfg_overlay: dict | None = None, cache_dir=None, **kwargs) -> ASMLP:
    """What timm's ``create_model`` calls: it always passes ``pretrained_cfg``, ``pretrained_cfg_overlay`` and
    ``cache_dir`` (unused: nothing is downloaded); every other keyword goes to ``asmlp_min.create_model``."""
    unsupported = {key: kwargs[key] for key in _FEATURE_WRAPPING if kwargs.get(key) is not None}
    if unsupported:
        given = ", ".join(f"{key}={value!r}" for key, value in unsupported.items())
        raise ValueError(f"{variant}: {given} is not supported; features_only=True (with out_indices) returns the "
                         "list of stage outputs (b, C_i, H/s_i, W/s_i) itself, strides 4, 8, 16, 32, as timm's "
                         "default feature model does")
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    model = create_model(variant, **kwargs)
    if pretrained:
        load_pretrained(model, cfg)
    cfg["input_size"] = (model.in_chans, *cfg["input_size"][1:])  # the model's channels, as resolve_data_config needs
    model.pretrained_cfg = pretrained_cfg_for_features(cfg) if model.features_only else cfg
    return model


def _entrypoint(variant: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> ASMLP:
        return build(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant  # register_model files it under its name
    entrypoint.__doc__ = f"{variant} ({MODEL_CONFIGS[variant]}), built by asmlp_min.create_model."
    return entrypoint


for _variant in MODEL_CONFIGS:
    globals()[_variant] = register_model(_entrypoint(_variant))
