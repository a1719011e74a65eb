"""The AS-MLP backbone (paper Sec. 3.1, Fig. 1a): patches -> four stages of blocks -> classifier or features.

    image (b, 3, H, W) -> PatchEmbed -> (b, C, H/4, W/4) -> stage 0 -> merge -> (b, 2C, H/8, W/8)
    -> stage 1 -> merge -> stage 2 -> merge -> stage 3 (b, 8C, H/32, W/32) -> norm -> pool -> head

Classification follows timm (``forward_features`` / ``forward_head`` / ``reset_classifier`` /
``forward_intermediates``; asmlp_min/features.py holds its feature-info and pooling conventions).
``features_only=True`` is the official dense-prediction backbone: the map of every stage *before* its
merge, each through its own ``norm{i}``, at strides 4/8/16/32. Any H, W work: the stem pads to a
multiple of 4 and each merge pads odd sizes at the right/bottom, as the official mmdet/mmseg code does.
The modules here are the reference path; ``create_model(..., fast=True)`` (the default) swaps in the faster
ones of asmlp_min/fast.py, which have the same parameters.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.utils.checkpoint
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .block import ASMLPBlock
from .checks import is_count, is_finite_number
from .features import FeatureInfo, GlobalPool, out_indices_tuple, take_indices


@dataclass(frozen=True)
class ASMLPConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    shift_size: int = 5
    drop_path_rate: float = 0.2
    mlp_ratio: float = 4.0
    patch_size: int = 4


# The paper's variants as the official yaml configs state them (svip-lab/AS-MLP, configs/). The mobile config is not
# in the released code:
# C=64, depths (2,2,2,2) gives the paper's ~9.6M parameters but is UNCONFIRMED, as are its shift and drop path.
MODEL_CONFIGS = {
    "asmlp_mobile": ASMLPConfig(embed_dim=64, depths=(2, 2, 2, 2), shift_size=5, drop_path_rate=0.1),
    "asmlp_tiny": ASMLPConfig(embed_dim=96, depths=(2, 2, 6, 2), shift_size=5, drop_path_rate=0.2),
    "asmlp_small": ASMLPConfig(embed_dim=96, depths=(2, 2, 18, 2), shift_size=5, drop_path_rate=0.3),
    "asmlp_base": ASMLPConfig(embed_dim=128, depths=(2, 2, 18, 2), shift_size=5, drop_path_rate=0.5),
}


@torch.fx.wrap  # a leaf for FX tracing: it branches on the input size
def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad right/bottom so h and w are multiples of ``multiple`` (as mmdet's backbone); no copy if they are."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


# The data the official ImageNet weights expect (the official code's timm data config):
# bicubic resize to 256 and a 224 centre crop at test time, ImageNet mean and std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256

@torch.fx.wrap  # a leaf for FX tracing (create_feature_extractor): its checks look at Python types and shapes
def check_image_batch(x: Tensor, in_chans: int, dtype: torch.dtype) -> None:
    """Raise a ValueError/TypeError saying what to change unless x is a (b, in_chans, h, w) batch of ``dtype``
    (the weights' dtype; any floating dtype under autocast) with h, w >= 1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected an image tensor (b, {in_chans}, h, w), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D image batch (b, {in_chans}, h, w), got shape {tuple(x.shape)}"
                         + ("; add a batch dimension with x[None]" if x.dim() == 3 else ""))
    if x.shape[1] != in_chans:
        fix = (f"the last axis has {in_chans}: a (b, h, w, c) image batch goes in as x.permute(0, 3, 1, 2)"
               if x.shape[-1] == in_chans else f"pass in_chans={x.shape[1]} to create_model for other images")
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (axis 1): {fix}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"got an empty image batch of shape {tuple(x.shape)}: height and width must be >= 1")
    if not x.is_floating_point():
        raise TypeError(f"expected float images, got {x.dtype}: convert 0-255 images with x.float() / 255 and "
                        "normalise them with IMAGENET_MEAN and IMAGENET_STD, as the official weights expect "
                        "(asmlp_min.data.transforms does both)")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"the images are {x.dtype} but the weights are {dtype}: use x.to({dtype}) or torch.autocast")


@torch.fx.wrap  # a leaf for FX tracing: einops does not take FX proxies
def space_to_depth(x: Tensor) -> Tensor:
    """(b, c, 2h, 2w) -> (b, 4c, h, w) in the official channel order [x(0,0), x(1,0), x(0,1), x(1,1)].

    One rearrange, not the official cat of four strided slices: its backward is one copy too, where the slices'
    would build four zero-filled full-size gradients and sum them.
    """
    return rearrange(x, "b c (h i) (w j) -> b (j i c) h w", i=2, j=2)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, linearly embedded: (b, in_chans, H, W) -> (b, C, ceil(H/p), ceil(W/p))."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.GroupNorm(1, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(pad_to_multiple(x, self.patch_size)))


class PatchMerging(nn.Module):
    """2x2 neighbours stacked into channels, normalised, projected: (b, c, h, w) -> (b, 2c, ceil(h/2), ceil(w/2)).

    Channel order is the official one: [x(0,0), x(1,0), x(0,1), x(1,1)] for (row, col) offsets,
    i.e. einops ``"b c (h i) (w j) -> b (j i c) h w"``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, 4 * dim)
        self.reduction = nn.Conv2d(4 * dim, 2 * dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(x, 2)  # odd sizes: one zero row/column
        return self.reduction(self.norm(space_to_depth(x)))


class ASMLPStage(nn.Module):
    """``depth`` blocks at one resolution, then (except in the last stage) a PatchMerging.

    ``grad_checkpointing`` (``ASMLP.set_grad_checkpointing``): under autograd each block keeps only its input and
    recomputes the rest in the backward pass (same dropout and drop-path draws), trading time for memory.
    """

    grad_checkpointing = False

    def __init__(self, dim: int, depth: int, shift_size: int, drop_path: list[float], downsample: bool,
                 mlp_ratio: float = 4.0, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList(
            ASMLPBlock(dim, shift_size, mlp_ratio, drop_path[i], **block_options) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        """(b, c, h, w) -> (b, c, h, w) through the blocks (fast.py's stage runs them on pieces of the batch)."""
        return self.run_blocks(x)

    def run_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """(b, c, h, w) -> (b, 2c, ceil(h/2), ceil(w/2)) after the merge, or (b, c, h, w) in the last stage."""
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class ASMLP(nn.Module):
    """AS-MLP classifier, or with ``features_only=True`` the multi-scale backbone for FPN/UperNet.

    Classification: (b, in_chans, H, W) -> (b, num_classes), pooled by ``global_pool`` (the paper averages; the
    other choices are timm's, see :class:`GlobalPool`). Features: list of (b, C*2^i, H/2^(i+2), W/2^(i+2)) for i
    in ``out_indices`` (sizes rounded up; None: every stage; an int n: the last n stages, as in timm; or a slice).
    """

    def __init__(self, *, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2), shift_size: int = 5,
                 drop_path_rate: float = 0.2, mlp_ratio: float = 4.0, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, features_only: bool = False,
                 out_indices: int | tuple[int, ...] | slice | None = None, dilation: int = 1, padding: str = "zeros",
                 connection: str = "parallel", global_pool: str = "avg"):
        super().__init__()
        _check_options(in_chans, drop_path_rate, embed_dim, patch_size, mlp_ratio, depths)
        self.num_stages = len(depths)
        self.embed_dim, self.in_chans, self.features_only = embed_dim, in_chans, features_only
        self.grad_checkpointing = False
        self.num_features = embed_dim * 2 ** (self.num_stages - 1)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth grows linearly
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(ASMLPStage(
                embed_dim * 2 ** i, depth, shift_size, rates[first:first + depth],
                downsample=i < self.num_stages - 1, mlp_ratio=mlp_ratio, drop=drop_rate,
                dilation=dilation, padding=padding, connection=connection))
        # a stage ends with its merge, so a stage's own map is the output of its last block
        stages = [dict(num_chs=embed_dim * 2 ** i, reduction=patch_size * 2 ** i, module=f"layers.{i}.blocks.{d - 1}")
                  for i, d in enumerate(depths)]
        if features_only:
            self.out_indices = out_indices_tuple(out_indices, self.num_stages)
            for i in self.out_indices:  # official dense-prediction backbones: one norm per output
                self.add_module(f"norm{i}", nn.GroupNorm(1, embed_dim * 2 ** i))
                stages[i]["module"] = f"norm{i}"
            self.feature_info = FeatureInfo(stages, self.out_indices)
        else:
            self.norm = nn.GroupNorm(1, self.num_features)
            self.global_pool = GlobalPool(global_pool)
            self._new_head(num_classes)
            stages[-1]["module"] = "norm"
            self.feature_info = FeatureInfo(stages, tuple(range(self.num_stages)))
        self.pretrained_cfg = dict(  # timm's data config (resolve_data_config reads it), for the official weights
            input_size=(in_chans, 224, 224), interpolation="bicubic", crop_pct=EVAL_CROP_PCT, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, num_classes=0 if features_only else num_classes, first_conv="patch_embed.proj",
            classifier=None if features_only else "head", fixed_input_size=False,
            pool_size=(-(-224 // stages[-1]["reduction"]),) * 2)
        self.apply(_init_weights)

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``, still read by its tests and utilities."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    def forward_stem(self, x: Tensor) -> Tensor:
        check_image_batch(x, self.in_chans, self.patch_embed.proj.weight.dtype)
        return self.pos_drop(self.patch_embed(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """(b, 3, H, W) -> (b, 8C, H/32, W/32): unpooled, after the final norm (timm semantics)."""
        self._require_classifier()
        x = self.forward_stem(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(b, 8C, h, w) -> (b, num_classes), or the pooled (b, head_hidden_size) with ``pre_logits``."""
        x = self.global_pool(x)
        return x if pre_logits else self.head(x)

    def run_stages(self, x: Tensor, take: tuple[int, ...], stop: int) -> tuple[Tensor, list[Tensor]]:
        """Stem and stages 0..stop: (stage ``stop``'s map, [the map of each stage in ``take``]), all before merging."""
        x = self.forward_stem(x)
        maps = []
        for i, stage in enumerate(self.layers[:stop + 1]):
            x = stage.forward_blocks(x)
            if i in take:
                maps.append(x)
            if i < stop:
                x = stage.downsample(x)
        return x, maps

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's stage taps: (b, 3, H, W) -> (final features as ``forward_features``, [maps]) or, with
        ``intermediates_only``, the maps: stage i's (b, C*2^i, H/2^(i+2), W/2^(i+2)) before its merge, for i in
        ``indices`` (None: all, n: the last n, or a list; negatives count from the end).

        ``norm`` passes the last stage's map through the final norm; ``stop_early`` skips the stages after the last
        tap, and the final features are then that stage's map.
        """
        self._require_classifier()
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW': AS-MLP's maps are (b, c, h, w); got {output_fmt!r}")
        take, last_tap = take_indices(len(self.layers), indices)
        final = len(self.layers) - 1
        stop = last_tap if stop_early else final
        x, maps = self.run_stages(x, take, stop)
        if stop == final and (norm or not intermediates_only):  # the final norm is sized for the last stage only
            x = self.norm(x)
            if norm and final in take:
                maps[-1] = x
        return maps if intermediates_only else (x, maps)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: keep the stages up to the last of ``indices`` (without its merge); the final norm and the head go
        with the stages they were sized for, or on request. Returns ``indices`` as absolute stage numbers."""
        self._require_classifier()
        take, last_tap = take_indices(len(self.layers), indices)
        pruned_end = last_tap < len(self.layers) - 1
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        self.layers = self.layers[:last_tap + 1]
        if pruned_end:
            self.layers[-1].downsample = None
            self.num_features = self.feature_info.channels(last_tap)
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """(b, 3, H, W) -> maps at strides 4, 8, 16, 32 for ``out_indices``, taken before each merge."""
        maps = self.run_stages(x, self.out_indices, max(self.out_indices))[1]
        return [getattr(self, f"norm{i}")(m) for i, m in zip(self.out_indices, maps)]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """(b, in_chans, H, W) -> logits (b, num_classes), or with ``features_only`` the list of maps."""
        if self.features_only:
            return self.forward_pyramid(x)
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head: Linear(head_hidden_size, num_classes), Identity for 0; ``global_pool`` as in the
        constructor, kept if None. ``(0, "")`` makes the model return the final (b, c, h, w) map, as in timm."""
        self._require_classifier()
        if global_pool is not None:
            self.global_pool = GlobalPool(global_pool)
        self._new_head(num_classes)
        _init_weights(self.head)
        self.head.to(self.patch_embed.proj.weight)

    def _new_head(self, num_classes: int) -> None:
        """The constructor's and reset_classifier's head, after checking num_classes against the pooling."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no head), got {num_classes!r}")
        if num_classes > 0 and not self.global_pool.pool_type:
            raise ValueError(f"global_pool='' keeps the (b, c, h, w) map: use it with num_classes=0, or pool for a "
                             f"head of {num_classes} classes (reset_classifier({num_classes}, 'avg'))")
        self.num_classes = num_classes
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _require_classifier(self) -> None:
        if self.features_only:
            raise ValueError("a features_only model has no final norm or head: model(x) returns its feature maps")


def _check_options(in_chans, drop_path_rate, embed_dim, patch_size, mlp_ratio, depths) -> None:
    """ASMLP's constructor arguments, each with what to pass instead (num_classes: ``_new_head``)."""
    if not is_finite_number(drop_path_rate) or not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}")
    for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim), ("patch_size", patch_size)):
        if not is_count(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(depths, str) or not isinstance(depths, Sequence) or not depths or not all(map(is_count, depths)):
        raise ValueError(f"depths needs one block count >= 1 per stage, integers, e.g. (2, 2, 6, 2); got {depths!r}")
    if not is_finite_number(mlp_ratio) or int(embed_dim * mlp_ratio) < 1:  # stage 0 is the narrowest
        raise ValueError(f"mlp_ratio must be > 0 and leave each MLP a hidden channel, int(embed_dim * mlp_ratio) >= 1 "
                         f"(the paper uses 4); got {mlp_ratio!r} with embed_dim {embed_dim}")



def _init_weights(module: nn.Module) -> None:
    """Official init: truncated normal (std 0.02) for Linear layers only; 1x1 convs keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def list_models() -> list[str]:
    """Registered variant names, e.g. ``['asmlp_base', 'asmlp_mobile', 'asmlp_small', 'asmlp_tiny']``."""
    return sorted(MODEL_CONFIGS)


def model_config(name: str) -> ASMLPConfig:
    """The registered config of variant ``name``; a ValueError listing the variants for any other name."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {list_models()}")
    return MODEL_CONFIGS[name]


def create_model(name: str, *, fast: bool = True, **kwargs) -> ASMLP:
    """Build a registered variant; keyword arguments override its config or reach :class:`ASMLP`.

    ``fast=True`` swaps in asmlp_min/fast.py's modules (same parameters, same outputs up to float rounding);
    ``fast=False`` keeps the plain reference modules. ``asmlp_min.fast.enable(model, on)`` switches later.

    >>> create_model("asmlp_tiny", num_classes=10, features_only=False)  # doctest: +SKIP
    """
    config = dataclasses.asdict(model_config(name))
    pretrained = kwargs.pop("pretrained", False)
    if pretrained:
        raise ValueError("no weights can be downloaded here: call asmlp_min.load_official_checkpoint(model, path)")
    config.update(kwargs)
    model = ASMLP(**config)
    if fast:
        from .fast import enable  # fast.py builds on this module's classes
        enable(model)
    return model
