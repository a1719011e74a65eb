"""Figures: scenes with their boxes, masks and labels, and training curves.

``draw_scenes`` shows what a dataset or a model sees: images with torchvision-style detection targets
(boxes xyxy, 1-based ``labels``, optional ``masks`` and ``scores``), semantic masks, or class labels.
``plot_curves`` draws the per-epoch history the engine records (losses left, metrics right).
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .files import atomic_write
from .data.shapes import CLASSES, Scene

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128]]) / 255
LEGEND_ENTRIES = 8  # a semantic mask's legend names its largest classes, and how many more there are


def class_colours(n: int) -> np.ndarray:
    """(n, 3) RGB in [0, 1] for labels 0..n-1 (:func:`_colour` of each)."""
    return np.array([_colour(label) for label in range(n)]).reshape(n, 3)


def _colour(label: int) -> np.ndarray:
    """``PALETTE`` first, then hues a golden-ratio turn apart, so that ADE20K's 150 classes get 150 colours instead
    of 10 repeated."""
    from matplotlib.colors import hsv_to_rgb
    if label < len(PALETTE):
        return PALETTE[label]
    return hsv_to_rgb((((label - len(PALETTE)) * 0.618034) % 1, 0.75, 0.95))


def _hwc(image) -> np.ndarray:
    """(3, h, w) tensor (uint8 or float in [0, 1]) or (h, w, 3) array -> (h, w, 3) float array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() / 255 if image.dtype == torch.uint8 else image.float()).permute(1, 2, 0).numpy()
    else:
        image = np.asarray(image)
        image = image / 255 if image.dtype == np.uint8 else image
    return np.clip(image, 0, 1)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def draw_scenes(images: Sequence, targets: Sequence | None = None, class_names: Sequence[str] = CLASSES,
                ncols: int = 4, score_threshold: float = 0.0, mask_alpha: float = 0.45,
                panel_size: float = 2.5) -> Figure:
    """A grid of images, each with its target drawn on top; returns the figure.

    images: ``Scene``s (their own targets are drawn) or (3, h, w) tensors / (h, w, 3) arrays, in [0, 1]
    (undo any normalisation first). targets, one per image: a detection dict (``boxes`` xyxy, ``labels``
    1-based, optional ``masks`` (n, h, w) and ``scores``, boxes below ``score_threshold`` hidden), a (h, w)
    semantic mask (0 = background and 255 = ignore are left clear, class c is coloured and named
    ``class_names[c - 1]``), or an int class label shown as the title.
    """
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        image, target = images[k], None if targets is None else targets[k]
        if isinstance(image, Scene):
            image, target = image.image, {"boxes": image.boxes_xyxy, "labels": image.kinds + 1, "masks": image.masks}
        ax.imshow(_draw_masks(_hwc(image), target, mask_alpha))
        if isinstance(target, (torch.Tensor, np.ndarray)) and np.ndim(target) == 2:
            _legend(ax, _numpy(target).astype(int), class_names)
        if isinstance(target, dict):
            _draw_boxes(ax, target, class_names, score_threshold)
        elif isinstance(target, (int, np.integer)) or (isinstance(target, torch.Tensor) and target.dim() == 0):
            ax.set_title(class_names[int(target)], fontsize=9)
    fig.tight_layout()
    return fig


def _draw_masks(image: np.ndarray, target, alpha: float) -> np.ndarray:
    """Blend instance masks (colour by label) or a semantic mask (colour by class) into the image."""
    if isinstance(target, dict) and target.get("masks") is not None:
        labels = _numpy(target["labels"]).astype(int)
        for mask, label in zip(_numpy(target["masks"]).reshape(len(labels), *image.shape[:2]) > 0.5, labels):
            image = np.where(mask[..., None], (1 - alpha) * image + alpha * _colour(label), image)
    elif isinstance(target, (torch.Tensor, np.ndarray)) and np.ndim(target) == 2:
        semantic = _numpy(target).astype(int)
        coloured = (semantic > 0) & (semantic != 255)
        colours = class_colours(semantic[coloured].max(initial=0) + 1)[np.where(coloured, semantic, 0)]
        image = np.where(coloured[..., None], (1 - alpha) * image + alpha * colours, image)
    return image


def _legend(ax: Axes, semantic: np.ndarray, class_names: Sequence[str]) -> None:
    """Below the panel: the coloured classes of a semantic mask, most pixels first, named as in ``_draw_boxes``."""
    values, counts = np.unique(semantic[(semantic > 0) & (semantic != 255)], return_counts=True)
    order = values[np.argsort(-counts, kind="stable")]
    names = [class_names[c - 1] if c <= len(class_names) else str(c) for c in order[:LEGEND_ENTRIES]]
    handles = [Rectangle((0, 0), 1, 1, facecolor=_colour(c)) for c in order[:LEGEND_ENTRIES]]
    if len(order) > LEGEND_ENTRIES:
        handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="none"))
        names.append(f"+{len(order) - LEGEND_ENTRIES} more")
    if handles:
        ax.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, fontsize=6, frameon=False,
                  handlelength=1, columnspacing=1)


def _draw_boxes(ax: Axes, target: dict, class_names: Sequence[str], score_threshold: float) -> None:
    boxes, labels = _numpy(target["boxes"]).reshape(-1, 4), _numpy(target["labels"]).astype(int)
    scores = _numpy(target["scores"]) if "scores" in target else None
    for i, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels)):
        if scores is not None and scores[i] < score_threshold:
            continue
        colour = _colour(label)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        name = class_names[label - 1] if 1 <= label <= len(class_names) else str(label)
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        ax.text(x1, y1, text, fontsize=7, color="white", va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def plot_curves(history: Sequence[dict], path_or_ax: str | os.PathLike | Axes) -> Path | Axes:
    """Plot every numeric key of ``history`` (one dict per epoch) against ``epoch`` (or the row number).

    Keys containing "loss" go on the left axis, the others (accuracy, AP, mIoU, lr, ...) on a right axis.
    Given a path, writes a PNG atomically and returns the path; given an Axes, draws there and returns it.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    keys = [k for k in dict.fromkeys(k for row in history for k in row)
            if k != "epoch" and all(isinstance(row.get(k, 0.0), numbers.Real) for row in history)]
    if isinstance(path_or_ax, Axes):
        ax, fig = path_or_ax, None
    else:
        fig = Figure(figsize=(6, 3.5))                  # no pyplot: nothing stays open after saving
        ax = fig.add_subplot()
    losses, others = [k for k in keys if "loss" in k], [k for k in keys if "loss" not in k]
    right = ax.twinx() if losses and others else ax
    for axis, group in ((ax, losses), (right, others)):
        for k in group:
            xs = [e for e, row in zip(epochs, history) if k in row]
            axis.plot(xs, [row[k] for row in history if k in row], marker="o", markersize=3, label=k,
                      color=f"C{keys.index(k) % 10}", linestyle="--" if axis is not ax else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss" if losses else "metric")
    if right is not ax:
        right.set_ylabel("metric")
    handles = [h for axis in dict.fromkeys((ax, right)) for h in axis.get_legend_handles_labels()[0]]
    # above the plot: loc="best" weighs one axes' lines only, and put the legend over the twin axes' curves
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncols=min(len(handles), 3), frameon=False)
    if fig is None:
        return ax
    fig.tight_layout()
    return save_figure(fig, path_or_ax)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG all or nothing (:func:`asmlp_min.files.atomic_write`), then close it in pyplot."""
    path = Path(path)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path
