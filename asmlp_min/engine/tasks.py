"""The three tasks behind one interface: ``build_model`` makes the network, and a task adapter says how a batch
moves to the device (``prepare``), what the loss is (``loss``) and how to evaluate (``evaluate``)."""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import create_model
from .config import TrainConfig, _parse_class_weight
from .data import TaskData
from .distributed import DistEnv, _all_reduce_sum, _broadcast_object, _gather_objects


def build_model(task: str, model: str = "asmlp_tiny", num_classes: int = 3, head_channels: int | None = None,
                pretrained: str | None = None, min_size: int | None = None, max_size: int | None = None,
                **backbone_kwargs) -> nn.Module:
    """The one factory for every task (a checkpoint's config rebuilds the same model through it).

    cls: ``create_model(model, num_classes)``; det: ``SimpleFPNDetector`` (labels 1..num_classes, ``TaskData``);
    seg: ``SemanticSegmenter``. ``backbone_kwargs`` override the variant (embed_dim, depths, shift_size,
    drop_path_rate); ``head_channels`` shrinks the FPN (det) or UperNet (seg; auxiliary head half of it)
    channels; ``pretrained`` is a backbone checkpoint (official ``.pth``, mmdet/mmseg, or ours).
    ``min_size`` / ``max_size`` (det only; None keeps each image's size): the detector resizes every image to short
    side ``min_size``, long side at most ``max_size``; the transforms size cls and seg images.
    """
    if task == "cls":
        net = create_model(model, num_classes=num_classes, **backbone_kwargs)
        if pretrained:
            from ..checkpoint import load_backbone_checkpoint
            # kept on the model, as the detector and segmenter keep theirs
            net.backbone_load_report = load_backbone_checkpoint(net, pretrained, skip_head=True, name=model)
        return net
    if task == "det":
        from ..detection import SimpleFPNDetector
        head = {} if head_channels is None else {"fpn_channels": head_channels}
        return SimpleFPNDetector(backbone=model, num_classes=num_classes, pretrained_backbone=pretrained,
                                 min_size=min_size, max_size=max_size, **head, **backbone_kwargs)
    from ..segmentation import SemanticSegmenter  # seg: the task was checked where the config was read
    head = {} if head_channels is None else {"channels": head_channels, "aux_channels": max(head_channels // 2, 1)}
    return SemanticSegmenter(backbone=model, num_classes=num_classes, pretrained_backbone=pretrained,
                             **head, **backbone_kwargs)


def _to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class ClassificationTask:
    """(image, label) batches; cross-entropy with label smoothing, optional mixup/cutmix; top-1/top-5."""

    collate_fn = None

    def __init__(self, cfg: TrainConfig, data: TaskData):
        self.num_classes, self.label_smoothing = data.num_classes, cfg.label_smoothing
        self.mix = None
        if cfg.mixup or cfg.cutmix:
            from torchvision.transforms import v2
            mixers = [mixer(alpha=alpha, num_classes=self.num_classes)
                      for mixer, alpha in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if alpha > 0]
            self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)  # per batch, 50/50 as timm

    def prepare(self, batch, device: torch.device, channels_last: bool):
        images, labels = batch
        return _to_device(images, device, channels_last), labels.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return len(batch[1])

    def loss(self, model: nn.Module, batch) -> Tensor:
        images, targets = batch
        if self.mix is not None:  # targets become class probabilities; smoothing is linear, so it commutes with mixing
            images, targets = self.mix(images, targets)
        return F.cross_entropy(model(images).float(), targets, label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module, batches: Iterable, env: DistEnv, autocast) -> dict[str, float]:
        from ..metrics import topk_accuracy
        sums = torch.zeros(4, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits, n
        for images, labels in batches:
            with autocast():
                logits = model(images).float()
            n, accuracy = len(labels), topk_accuracy(logits, labels)
            sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(), round(accuracy["top1"] * n),
                                  round(accuracy["top5"] * n), n], dtype=torch.float64)
        loss, top1, top5, n = _all_reduce_sum(sums, env).tolist()
        return {"val_loss": loss / n, "top1": top1 / n, "top5": top5 / n}


class DetectionTask:
    """(image list, target list) batches; the detector returns its losses; COCO box AP over all ranks."""

    def __init__(self, cfg: TrainConfig, data: TaskData):
        from ..data.datasets import detection_collate
        self.collate_fn, self.coco_gt = detection_collate, data.coco_gt
        self.category_ids = None if data.category_ids is None else torch.tensor([0, *data.category_ids])

    def prepare(self, batch, device: torch.device, channels_last: bool):
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]  # [0, 1]: the detector normalises
        # iscrowd travels with the boxes: the detector ignores crowd regions in training (as mmdet, torchvision)
        targets = [{**{k: t[k].to(device).as_subclass(Tensor) for k in ("boxes", "labels", "iscrowd") if k in t},
                    "image_id": t["image_id"]} for t in targets]
        return images, targets

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def loss(self, model: nn.Module, batch) -> Tensor:
        images, targets = batch
        return sum(model(images, targets).values())

    def evaluate(self, model: nn.Module, batches: Iterable, env: DistEnv, autocast) -> dict[str, float]:
        from ..metrics import coco_evaluate
        detections = []
        for images, targets in batches:
            with autocast():
                outputs = model(images)
            detections += [{"image_id": t["image_id"], "boxes": out["boxes"].float().cpu(),
                            "scores": out["scores"].float().cpu(), "labels": self._category_ids(out["labels"].cpu())}
                           for out, t in zip(outputs, targets)]
        everything = [d for part in _gather_objects(detections, env) for d in part]
        stats = dict(coco_evaluate(self.coco_gt, everything, "bbox")) if env.is_main else None
        return _broadcast_object(stats, env)

    def _category_ids(self, labels: Tensor) -> Tensor:
        """The detector's labels 1..K -> the data's COCO category ids."""
        return labels if self.category_ids is None else self.category_ids[labels]


class SegmentationTask:
    """(image, mask) batches; the segmenter returns its losses; mIoU from one confusion matrix over all ranks."""

    collate_fn = None

    def __init__(self, cfg: TrainConfig, data: TaskData):
        self.num_classes = data.num_classes

    def prepare(self, batch, device: torch.device, channels_last: bool):
        images, masks = batch
        return _to_device(images, device, channels_last), masks.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return len(batch[1])

    def loss(self, model: nn.Module, batch) -> Tensor:
        images, masks = batch
        return sum(model(images, masks).values())

    def evaluate(self, model: nn.Module, batches: Iterable, env: DistEnv, autocast) -> dict[str, float]:
        from ..metrics import SegmentationMeter
        from ..segmentation import class_map
        meter = SegmentationMeter(self.num_classes)
        for images, masks in batches:
            with autocast():
                logits = model(images)
            meter.update(class_map(logits.float(), masks.shape[-2:]), masks)  # at the mask's size, as mmseg
        meter.all_reduce()
        if meter.confusion.sum() == 0:
            raise ValueError(f"the validation masks {_UNLABELLED}")
        return meter.compute()


def make_task(cfg: TrainConfig, data: TaskData):
    """The task adapter: how a batch moves to the device, what the loss is, how to evaluate."""
    return {"cls": ClassificationTask, "det": DetectionTask, "seg": SegmentationTask}[cfg.task](cfg, data)


_UNLABELLED = ("hold no labelled pixel (every value is 255, or 0 with reduce_zero_label): nothing to learn from or "
               "score; check the masks' class ids")


def refuse_unlabelled_masks(cfg: TrainConfig, train, log) -> None:
    """Masks without a labelled pixel train to a loss of exactly 0 and score mIoU nan, without an error: refused,
    judged on 32 evenly spaced masks read without the transform (which would draw random numbers). Masks that label
    one class only, beside ignored pixels, are most likely binary masks saved as 0/255: warned."""
    from ..segmentation import class_pixel_counts
    plain = copy.copy(train)
    plain.transform = lambda image, mask: (image, mask)
    counts, read = class_pixel_counts(plain, cfg.num_classes, max_images=32), min(len(train), 32)
    if counts.sum() == 0:
        raise ValueError(f"{cfg.data}: {read} training masks read evenly through the split {_UNLABELLED}")
    if cfg.num_classes > 1 and (counts > 0).sum() == 1:
        every_value = class_pixel_counts(plain, max(cfg.num_classes, 256), ignore_index=-1, max_images=32)  # + 255
        if every_value[255] > 0:  # else: a rare class, absent from this sample
            log(f"warning: {read} training masks read evenly through the split label class {int(counts.argmax())} "
                f"only, and {every_value[255] / every_value.sum():.0%} of their pixels are 255, which means 'ignore': "
                "if they are binary masks saved as 0/255, save the object as 1")


def class_weights(cfg: TrainConfig, train, log) -> list[float]:
    """seg ``--class-weight`` as numbers: given, or 'balanced' from the training masks' pixel counts."""
    from ..segmentation import balanced_class_weights, class_pixel_counts
    if cfg.class_weight == "balanced":
        counts = class_pixel_counts(train, cfg.num_classes)
        if counts.sum() == 0:
            raise ValueError(f"{cfg.data}: the training masks {_UNLABELLED}")
        absent = [k for k, n in enumerate(counts.tolist()) if n == 0]
        if absent:  # e.g. binary masks saved as 0/255: 255 is "ignored", so class 1 never appears
            log(f"warning: class(es) {absent} have no pixel in the training masks (a mask value of 255 is ignored)")
        weights = balanced_class_weights(counts).tolist()
        share = ", ".join(f"{c / counts.sum():.1%}" for c in counts.tolist())
        log(f"class_weight balanced: pixel shares {share} -> weights {', '.join(f'{w:.2f}' for w in weights)}")
        return weights
    return _parse_class_weight(cfg.class_weight)  # the model checks the count
