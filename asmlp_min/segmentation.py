"""Semantic segmentation (paper Sec. 4.3): AS-MLP features -> UperNet -> a class for every pixel.

    image (b, 3, H, W) -> backbone -> F1..F4: (b, C, H/4, W/4), (b, 2C, H/8, W/8), (b, 4C, H/16, W/16),
                                              (b, 8C, H/32, W/32)
      -> UperHead: pyramid pooling on F4, lateral 1x1 + top-down sums, 3x3 per level, concat at stride 4,
         3x3 fuse, 1x1 classifier -> (b, K, H/4, W/4) -> bilinear -> (b, K, H, W)
    training only: FCNHead on F3 (stage index 2), loss weight 0.4.

The recipe is the official mmseg one (svip-lab/AS-MLP-Semantic-Segmentation): 512 head channels, pool scales (1, 2,
3, 6), dropout 0.1, BatchNorm (SyncBatchNorm in distributed CUDA training), cross-entropy with ignore_index 255.
Parameter names follow mmseg (``backbone.*``, ``decode_head.psp_modules.0.1.conv.weight``,
``auxiliary_head.convs.0.bn.bias``, ...), so a full mmseg checkpoint's ``state_dict`` loads with
``load_state_dict``; ``pretrained_backbone=`` loads the backbone alone (official classification ``.pth``, mmseg
checkpoint, or a project checkpoint).

Distributed training: convert the BatchNorms with ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before
wrapping in DistributedDataParallel (the engine does this); single-process runs keep plain BatchNorm.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import MODEL_CONFIGS, check_image_batch
from .checks import is_count, is_int
from .dense_backbone import build_backbone, freeze_stages

# The paper's ADE20K table: UperNet + auxiliary head, 150 ADE20K classes, parameters in millions.
PAPER_PARAMS = {"asmlp_tiny": 60, "asmlp_small": 81, "asmlp_base": 121}
# Backbone settings of the official mmseg configs: more drop path than for ImageNet, shift 3 for S.
SEG_BACKBONE_DEFAULTS = {
    "asmlp_tiny": dict(drop_path_rate=0.3),
    "asmlp_small": dict(shift_size=3, drop_path_rate=0.3),
    "asmlp_base": dict(drop_path_rate=0.5),
}


def variant_setting(model: str, key: str, task: str):
    """A backbone setting of variant ``model`` as ``task`` builds it: with the mmseg defaults above for "seg",
    the variant's own (``MODEL_CONFIGS``) otherwise."""
    own = getattr(MODEL_CONFIGS[model], key)
    return SEG_BACKBONE_DEFAULTS.get(model, {}).get(key, own) if task == "seg" else own


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear, align_corners=False (mmseg's choice for every up-sampling in UperNet)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def class_map(logits: Tensor, size: tuple[int, int] | torch.Size, rows: int = 64) -> Tensor:
    """(b, K, h, w) logits -> (b, H, W) int64 class ids at ``size``: the logits up-sampled by :func:`resize`, then
    the argmax, as mmseg scores an image at its own size after inference at the test scale.

    ``rows`` output rows at a time: each band interpolates along h by hand (PyTorch's source rows and weights) and
    along w by :func:`resize`, so a 12-megapixel photo never holds its 150 (H, W) logit maps (7 GB) at once."""
    (h, w), (H, W) = logits.shape[-2:], tuple(size)
    if (h, w) == (H, W):
        return logits.argmax(1)
    out = torch.empty(logits.shape[0], H, W, dtype=torch.int64, device=logits.device)
    for top in range(0, H, rows):
        y = ((torch.arange(top, min(top + rows, H), device=logits.device) + 0.5) * (h / H) - 0.5).clamp(min=0)
        y0 = y.long()
        weight = (y - y0).to(logits.dtype)[:, None]                          # (n, 1): the lower row's share
        band = logits[:, :, y0] * (1 - weight) + logits[:, :, (y0 + 1).clamp(max=h - 1)] * weight
        out[:, top:top + len(y)] = resize(band, (len(y), W)).argmax(1)     # (b, K, n, w) -> (b, n, W)
    return out


class ConvBNReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, mmcv's ``ConvModule`` layout (``conv``, ``bn``).

    (b, c_in, h, w) -> (b, c_out, h, w). When a training batch holds a single value per channel (batch 1 through
    the 1x1 pyramid-pooling branch) the batch statistics are degenerate: BatchNorm would raise, and even if it did
    not, x - mean(x) is 0 everywhere. We then normalise with the running statistics and leave them unchanged.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule init

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.training and x.numel() == x.shape[1]:
            bn = self.bn
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        else:
            x = self.bn(x)
        return self.activate(x)


class PyramidPooling(nn.ModuleList):
    """PSPNet pooling: average F4 into s x s bins for each scale s, project to ``channels``, up-sample back.

    (b, c, h, w) -> list of (b, channels, h, w), one per scale. Each element is ``Sequential(pool, ConvBNReLU)``,
    mmseg's ``psp_modules.{i}.1`` layout.
    """

    def __init__(self, pool_scales: tuple[int, ...], in_channels: int, channels: int):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels)) for s in pool_scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [resize(branch(x), x.shape[-2:]) for branch in self]


class UperHead(nn.Module):
    """UperNet decode head (Xiao et al. 2018) on the four AS-MLP feature maps.

    feats [(b, C_i, h_i, w_i)] at strides 4, 8, 16, 32 -> logits (b, num_classes, h_1, w_1) at stride 4.
        L4 = bottleneck(cat[F4, PPM_1(F4), PPM_2(F4), PPM_3(F4), PPM_6(F4)])       3x3, context of the whole image
        L_i = lateral_i(F_i) + up(L_{i+1})                 i = 3, 2, 1               1x1 then top-down sums (FPN)
        P_i = fpn_conv_i(L_i) (i < 4),  P4 = L4                                      3x3 per level
        logits = conv_seg(dropout(fpn_bottleneck(cat[P1, up(P2), up(P3), up(P4)])))   fuse at stride 4
    """

    def __init__(self, in_channels: tuple[int, ...] = (96, 192, 384, 768), channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        sizes = (*in_channels, *pool_scales, channels, num_classes)
        if len(in_channels) < 2 or not pool_scales or not all(map(is_count, sizes)):
            raise ValueError(f"UperHead needs >= 2 input levels, pool scales, channels and num_classes, all integers "
                             f">= 1; got {in_channels}, {pool_scales}, {channels!r}, {num_classes!r}")
        self.in_channels = tuple(in_channels)
        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, feats: list[Tensor]) -> Tensor:
        if tuple(f.shape[1] for f in feats) != self.in_channels:
            raise ValueError(f"UperHead expects maps with channels {self.in_channels} (the backbone's feature_info), "
                             f"got {[f.shape[1] for f in feats]}")
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # coarse to fine: each level receives the one above it
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: (b, c_in, h, w) -> 3x3 ConvBNReLU (channels) -> dropout -> 1x1 -> (b, num_classes, h, w).

    Attached to stage index 2 (stride 16) during training only; its loss (weight 0.4) gives the middle of the
    backbone a direct gradient. mmseg ``FCNHead(num_convs=1, concat_input=False)`` layout.
    """

    def __init__(self, in_channels: int = 384, channels: int = 256, num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        if not all(map(is_count, (in_channels, channels, num_classes))):
            raise ValueError(f"FCNHead needs in_channels, channels and num_classes that are integers >= 1; got "
                             f"{in_channels!r}, {channels!r}, {num_classes!r}")
        self.convs = nn.Sequential(ConvBNReLU(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


def segmentation_loss(logits: Tensor, masks: Tensor, ignore_index: int = 255,
                      class_weight: Tensor | None = None) -> Tensor:
    """Pixel-wise cross-entropy averaged over the pixels that are not ``ignore_index``.

    logits (b, K, h, w) at any resolution are up-sampled to the masks' (b, H, W) first, as mmseg does.
    class_weight (K,): pixel i counts w[y_i] times, loss = sum_i w[y_i] CE_i / sum_i w[y_i] (torch's weighted mean).
    A batch with no labelled pixel gives a loss of 0 (not NaN) that still back-propagates. Mask values other than
    ``ignore_index`` must be class ids in [0, K) (ValueError, not torch's IndexError or a CUDA device-side assert).
    """
    num_classes = logits.shape[1]
    labelled = masks != ignore_index
    bad = labelled & ((masks < 0) | (masks >= num_classes))
    if bad.any():
        raise ValueError(f"masks have values {masks[bad].unique()[:5].tolist()} that are neither class ids in [0, "
                         f"num_classes={num_classes}) nor ignore_index={ignore_index}; masks whose 0 means 'no label', "
                         "as ADE20K's, are read with reduce_zero_label=True (0 -> ignore, k -> k - 1)")
    logits = resize(logits, masks.shape[-2:]) if logits.shape[-2:] != masks.shape[-2:] else logits
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, masks, weight=class_weight, ignore_index=ignore_index)


def class_pixel_counts(dataset, num_classes: int, ignore_index: int = 255, max_images: int = 500) -> Tensor:
    """(num_classes,) int64 labelled pixels per class over ``max_images`` evenly spaced ``(image, mask)`` items."""
    n = len(dataset)
    indices = sorted({i * n // min(n, max_images) for i in range(min(n, max_images))})
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for i in indices:
        mask = torch.as_tensor(dataset[i][1]).flatten()
        mask = mask[mask != ignore_index].long()
        if mask.numel() and (mask.min() < 0 or mask.max() >= num_classes):
            raise ValueError(f"item {i}: mask values must be in [0, {num_classes}) or {ignore_index}, got "
                             f"{mask.min().item()}..{mask.max().item()}")
        counts += torch.bincount(mask, minlength=num_classes)
    return counts


def balanced_class_weights(pixel_counts: Tensor) -> Tensor:
    """(K,) pixel counts -> (K,) float32 loss weights w_c = sqrt(n_max / n_c); absent classes get 1.

    The most frequent class (on shapes: the background, 89% of pixels) keeps weight 1 and a class 36x rarer gets 6.
    Without it a small model first learns "everything is background" and a rare class whose logit falls
    behind the background's on every pixel gets no argmax at all (IoU 0) long after it is recognisable.
    """
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if counts.ndim != 1 or (counts < 0).any() or counts.max() <= 0:
        raise ValueError(f"pixel_counts must be a 1-d tensor of counts >= 0 with some pixels, got {pixel_counts}")
    weights = (counts.max() / counts.clamp(min=1)).sqrt()
    return torch.where(counts > 0, weights, torch.ones_like(weights)).float()


class SemanticSegmenter(nn.Module):
    """AS-MLP backbone + UperHead (+ FCNHead during training): the paper's ADE20K model.

    Call convention (the engine relies on it):
      ``model(images)``        images (b, 3, H, W), normalised -> logits (b, num_classes, H, W), whole-image or
                               sliding-window (``inference="slide"``) in eval mode;
      ``model(images, masks)`` masks (b, H, W) int64, ``ignore_index`` = unlabelled -> dict of weighted scalar
                               losses ``{"loss_seg", "loss_aux"}`` (aux only in train mode with ``aux=True``).

    ``backbone``: a variant name; ``backbone_kwargs`` override its config (e.g. ``embed_dim=16, depths=(1,1,1,1)``)
    on top of the mmseg segmentation defaults in ``SEG_BACKBONE_DEFAULTS``. ``channels``/``aux_channels`` shrink
    the heads for small experiments (paper: 512 / 256). ``pretrained_backbone``: path or dict, loaded into the
    ``features_only`` backbone, whose output norms ``norm0..3`` an ImageNet checkpoint lacks; another variant's
    weights are refused (report in ``backbone_load_report``). ``frozen_stages``: see
    :func:`~asmlp_min.dense_backbone.freeze_stages`, kept frozen through ``.train()``. ``class_weight``: (K,)
    loss weights, e.g. ``balanced_class_weights(class_pixel_counts(train_set, K))``; kept out of the state_dict.
    """

    def __init__(self, backbone: str = "asmlp_tiny", num_classes: int = 150,
                 pretrained_backbone: str | os.PathLike | dict | None = None, aux: bool = True,
                 channels: int = 512, aux_channels: int = 256, pool_scales: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1, aux_weight: float = 0.4, aux_index: int = 2, ignore_index: int = 255,
                 inference: str = "whole", crop_size: int | tuple[int, int] = 512,
                 stride: int | tuple[int, int] = 341, class_weight: Tensor | list[float] | None = None,
                 frozen_stages: int = -1, **backbone_kwargs):
        super().__init__()
        if is_int(num_classes) and num_classes == 1:  # UperHead refuses the other counts below 2 (and True)
            raise ValueError("num_classes=1: a softmax over one class is 1 everywhere, so nothing can be learnt; "
                             "object against background is num_classes=2, with masks of 0 and 1")
        self.num_classes, self.ignore_index, self.aux_weight = num_classes, ignore_index, aux_weight
        self.inference, self.crop_size, self.stride = inference, _pair(crop_size), _pair(stride)
        kwargs = {**SEG_BACKBONE_DEFAULTS.get(backbone, {}), **backbone_kwargs}
        self.frozen_stages = frozen_stages
        self.backbone, self.backbone_load_report = build_backbone(  # every stage
            backbone, None, pretrained_backbone, frozen_stages, **kwargs)
        in_channels = tuple(self.backbone.feature_info.channels())
        stages, windows = range(len(in_channels)), self.stride + self.crop_size
        if inference not in ("whole", "slide") or min(windows) < 1 or (aux and aux_index not in stages):
            raise ValueError(f"need inference 'whole' or 'slide', crop_size and stride >= 1 and aux_index in {stages}, "
                             f"got {inference!r}, {crop_size}, {stride}, {aux_index}")
        self.decode_head = UperHead(in_channels, channels, pool_scales, num_classes, dropout)
        self.aux_index = aux_index
        self.auxiliary_head = FCNHead(in_channels[aux_index], aux_channels, num_classes, dropout) if aux else None
        self.register_buffer("class_weight", None, persistent=False)  # not in state_dict: mmseg keys stay exact
        self.set_class_weight(class_weight)

    def train(self, mode: bool = True) -> SemanticSegmenter:
        super().train(mode)
        freeze_stages(self.backbone, self.frozen_stages)
        return self

    def set_class_weight(self, class_weight: Tensor | list[float] | None) -> None:
        """Per-class loss weights (num_classes,) > 0, or None for plain cross-entropy (mmseg ``class_weight``)."""
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.shape != (self.num_classes,) or not (class_weight.isfinite() & (class_weight > 0)).all():
                raise ValueError(f"class_weight gives {class_weight.numel()} weights for {self.num_classes} classes: "
                                 f"it must hold {self.num_classes} positive numbers, one per class, all finite, got "
                                 f"{class_weight.tolist()}")
            device = next(self.parameters()).device
            class_weight = class_weight.to(device)
        self.class_weight = class_weight

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """(b, 3, H, W) -> logits (b, K, H, W); with masks (b, H, W) -> {"loss_seg", "loss_aux"} (weighted)."""
        if masks is None:
            if not self.training and self.inference == "slide":
                return self.slide_inference(images)
            return self.forward_logits(images)
        check_image_batch(images, self.backbone.in_chans, self.backbone.patch_embed.proj.weight.dtype)  # then masks
        _check_masks(images, masks)
        feats = self.backbone(images)
        weight = self.class_weight
        losses = {"loss_seg": segmentation_loss(self.decode_head(feats), masks, self.ignore_index, weight)}
        if self.training and self.auxiliary_head is not None:
            aux_logits = self.auxiliary_head(feats[self.aux_index])
            losses["loss_aux"] = self.aux_weight * segmentation_loss(aux_logits, masks, self.ignore_index, weight)
        return losses

    def forward_logits(self, images: Tensor) -> Tensor:
        """Whole-image inference: (b, 3, H, W) -> (b, K, H, W), the stride-4 logits up-sampled bilinearly."""
        return resize(self.decode_head(self.backbone(images)), images.shape[-2:])

    @torch.no_grad()
    def slide_inference(self, images: Tensor) -> Tensor:
        """Overlapping ``crop_size`` windows every ``stride`` pixels; logits averaged where windows overlap.

        (b, 3, H, W) -> (b, K, H, W). Windows are clamped inside the image (the last one ends at the border), and
        an image smaller than a crop is one window, as mmseg's ``slide_inference``.
        """
        (h, w), (ch, cw), (sh, sw) = images.shape[-2:], self.crop_size, self.stride
        logits = images.new_zeros(images.shape[0], self.num_classes, h, w)
        count = images.new_zeros(1, 1, h, w)
        for top in _window_starts(h, ch, sh):
            for left in _window_starts(w, cw, sw):
                crop = images[..., top:top + ch, left:left + cw]
                logits[..., top:top + ch, left:left + cw] += self.forward_logits(crop)
                count[..., top:top + ch, left:left + cw] += 1
        return logits / count


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Starts of windows of ``crop`` covering [0, size): every ``stride``, the last one moved back inside."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's conv_seg init: small logits, near-uniform start
    nn.init.zeros_(conv.bias)
    return conv


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_masks(images: Tensor, masks: Tensor) -> None:
    if not isinstance(masks, Tensor):
        listed = isinstance(masks, (list, tuple))
        raise TypeError(f"masks must be an int64 tensor (b, H, W) of class ids, got {type(masks).__name__}"
                        + ("; stack a list of (H, W) masks with torch.stack" if listed else ""))
    if masks.dtype != torch.int64:
        raise TypeError(f"masks must be an int64 tensor (b, H, W) of class ids, got {masks.dtype}; use masks.long()")
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"masks must be (b, H, W) = {(images.shape[0], *images.shape[-2:])}, got {tuple(masks.shape)}")
