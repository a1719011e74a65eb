"""``asmlp-min demo`` / ``make demo``: the whole project in one CPU run on synthetic shapes.

    write shapes scenes once (ImageFolder, COCO, ADE20K-style folders under data/shapes/, reused on re-runs)
      -> train a small AS-MLP classifier, FCOS-style detector and UperNet segmenter with the engine
      -> evaluate them -> runs/demo/report.md + figures/ (axial shift, training curves, predictions)

The models are the paper's architectures at a small width (C = 32, one or two blocks per stage) so the
three runs fit in about ten minutes on two cores. Each run is an ordinary engine run folder: a finished
one is reused, an interrupted one (Ctrl-C) is resumed, so a re-run only does what is missing.

The demo scenes keep the generator's shapes, colours, noise and labels but put them on a flat grey
background. Trained from scratch, a small AS-MLP needs far more steps than a CPU demo allows to look past
the textured colour fields of the default scenes: with them, 1000+ steps of classification stayed at
chance (it memorised the backgrounds of the training images instead), whereas the same model learns the
grey-background scenes within a few hundred steps. ``asmlp-min train`` uses the default scenes.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write, load_checkpoint
from .data.shapes import save_png
from .engine import CHECKPOINT_NAME, TASK_DEFAULTS, TrainConfig, Trainer, build_model, predict

# One small backbone for all three tasks: C=32, depths (1, 1, 2, 1), shift 5 (paper default), drop path 0.05.
BACKBONE = dict(model="asmlp_tiny", embed_dim=32, depths=(1, 1, 2, 1), drop_path=0.05)
RUNS = {
    "cls": dict(image_size=64, train_size=3000, val_size=300, epochs=8, batch_size=32, lr=1e-3, eval_every=1),
    "det": dict(image_size=128, train_size=1000, val_size=200, epochs=8, batch_size=16, lr=1e-3, eval_every=2,
                head_channels=64),
    "seg": dict(image_size=64, train_size=1000, val_size=200, epochs=8, batch_size=16, lr=1e-3, eval_every=2,
                head_channels=64, class_weight="balanced"),
}
# Classification scenes hold one large shape ("which shape is it?"; 20-40 px once resized to 64), the
# detection and segmentation scenes the generator's default 1-4 shapes of 16-52 px.
SCENES = {"cls": dict(max_shapes=1, size_range=(40, 80)), "det": {}, "seg": {}}
QUICK = {"cls": dict(train_size=48, val_size=24, epochs=1, batch_size=16),
         "det": dict(train_size=16, val_size=8, epochs=1, batch_size=8),
         "seg": dict(train_size=16, val_size=8, epochs=1, batch_size=8)}
GREY = 128
TITLES = {"cls": "classification", "det": "detection", "seg": "semantic segmentation"}
HEADS = {"cls": "linear head", "det": "FPN + FCOS-style head", "seg": "UperNet + auxiliary FCN head"}


def demo_configs(output: str | os.PathLike, data_root: str | os.PathLike,
                 quick: bool = False) -> dict[str, TrainConfig]:
    """The three engine configs the demo trains (data folders are named by their contents, so they never mix)."""
    configs = {}
    for task, run in RUNS.items():
        run = {**run, **(QUICK[task] if quick else {})}
        scene_tag = "".join(f"_{k}-{'-'.join(map(str, v)) if isinstance(v, tuple) else v}"
                            for k, v in SCENES[task].items())
        data = Path(data_root) / f"grey{scene_tag}_{task}_{run['train_size']}_{run['val_size']}"
        configs[task] = TrainConfig(task=task, data=str(data), output=str(Path(output) / task), augment="light",
                                    num_classes=4 if task == "seg" else None, device="cpu", **BACKBONE, **run)
    return configs


def grey_scene(seed: int, split: str, index: int, **scene_kwargs):
    """Scene ``index`` of the generator with its background pixels set to flat grey (labels unchanged)."""
    from .data.shapes import make_scene, scene_rng
    scene = make_scene(scene_rng(seed, split, index), 128, **scene_kwargs)
    image = np.where(scene.semantic[..., None] > 0, scene.image, np.uint8(GREY))
    return scene, image


def export_data(cfg: TrainConfig) -> Path:
    """Write the grey-background scenes of ``cfg`` in the task's on-disk layout, as ``export_shapes`` does
    for the default scenes; files that exist are kept (same seed, same bytes)."""
    from .data.shapes import CATEGORIES, CLASSES
    root = Path(cfg.data)
    for split, n in (("train", cfg.train_size), ("val", cfg.val_size)):
        ann_file = root / "annotations" / f"instances_{split}.json"
        if cfg.task == "det" and ann_file.exists():
            continue
        coco = {"images": [], "annotations": [], "categories": CATEGORIES}
        for i in range(n):
            scene, image = grey_scene(cfg.seed, split, i, **SCENES[cfg.task])
            if cfg.task == "cls":
                _write_png(image, root / split / CLASSES[scene.label] / f"{i:06d}.png")
            elif cfg.task == "seg":
                _write_png(image, root / "images" / split / f"{i:06d}.png")
                _write_png(scene.semantic, root / "annotations" / split / f"{i:06d}.png")
            else:
                _write_png(image, root / split / f"{i:06d}.png")
                coco["images"].append({"id": i + 1, "file_name": f"{i:06d}.png", "height": 128, "width": 128})
                coco["annotations"] += scene.coco_annotations(i + 1, first_id=len(coco["annotations"]) + 1)
        if cfg.task == "det":
            with atomic_write(ann_file, "w") as f:
                json.dump(coco, f)
    return root


def _write_png(array: np.ndarray, path: Path) -> None:
    """Written all or nothing, so an interrupted demo never leaves half a file to be reused; kept if present."""
    if not path.exists():
        save_png(array, path)


def train_or_reuse(cfg: TrainConfig) -> Trainer:
    """Train ``cfg``; reuse its finished run folder, or resume it if a Ctrl-C left it half done."""
    path = Path(cfg.output) / CHECKPOINT_NAME
    resume = None
    if path.exists():
        saved = load_checkpoint(path)
        config = saved.get("config")
        wanted = {**cfg.resolved().to_dict(), "num_classes": None}
        same = isinstance(config, dict) and {**config, "num_classes": None} == wanted
        resume = path if same else None
    trainer = Trainer(cfg, resume=resume)
    if resume is not None and trainer.epoch < cfg.epochs:
        print(f"  resuming {path} at epoch {trainer.epoch + 1}")
    trainer.fit()
    return trainer


def run_demo(output: str | os.PathLike = "runs/demo", data_root: str | os.PathLike = "data/shapes",
             quick: bool = False) -> Path:
    """Run the three trainings and write ``output/report.md``; returns its path."""
    output = Path(output)
    (output / "figures").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    configs = demo_configs(output, data_root, quick)
    results = {}
    for i, (task, cfg) in enumerate(configs.items(), 1):
        print(f"[{i}/4] {TITLES[task]}: data in {cfg.data}, run folder {cfg.output}", flush=True)
        t0 = time.perf_counter()
        export_data(cfg)
        results[task] = train_or_reuse(cfg)
        if results[task].epoch < cfg.epochs:  # Ctrl-C: the run saved where it was; do not start the next one
            print("demo interrupted; run the same command again to continue where it stopped", flush=True)
            raise KeyboardInterrupt
        print(f"  {TITLES[task]} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("[4/4] figures and report", flush=True)
    figures = write_figures(results, output / "figures")
    report = output / "report.md"
    text = render_report(results, figures, time.perf_counter() - start, quick)
    with atomic_write(report, "w") as f:
        f.write(text)
    return report


# ---------------------------------------------------------------- figures

def write_figures(results: dict[str, Trainer], folder: Path) -> dict[str, str]:
    """axial_shift.png, curves.png and predictions_{cls,det,seg}.png; returns {name: path relative to the report}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz import draw_scenes, plot_curves
    paths = {}

    fig = shift_figure()
    paths["shift"] = _save(fig, folder / "axial_shift.png")

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.6))
    for ax, (task, trainer) in zip(axes, results.items()):
        keep = ("epoch", "train_loss", "val_loss", TASK_DEFAULTS[task]["main_metric"])
        plot_curves([{k: v for k, v in row.items() if k in keep} for row in trainer.history], ax)
        ax.set_title(TITLES[task])
    paths["curves"] = _save(fig, folder / "curves.png")

    for task, trainer in results.items():
        model, cfg = trainer.model.eval(), trainer.cfg
        # the first validation scenes, as the run saw them
        shown, images = zip(*(grey_scene(cfg.seed, "val", i, **SCENES[task]) for i in range(4 if task == "cls" else 3)))
        images = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
        predictions = [predict(model, cfg, image) for image in images]
        if task == "cls":
            names = list(trainer.data.classes)
            fig = draw_scenes(images, [int(p.argmax()) for p in predictions], names)
            for ax, scene, p in zip(fig.axes, shown, predictions):
                ax.set_title(f"pred {names[int(p.argmax())]} {p.max():.2f}\ntrue {names[scene.label]}", fontsize=8)
        elif task == "det":
            truth = [{"boxes": s.boxes_xyxy, "labels": s.kinds + 1} for s in shown]
            fig = draw_scenes(images + images, truth + predictions, ncols=3, score_threshold=0.3,
                              mask_alpha=0.7)
            fig.suptitle("top: ground truth, bottom: predicted boxes (score >= 0.3)", fontsize=10)
        else:
            fig = draw_scenes(images + images, [torch.from_numpy(s.semantic) for s in shown] + predictions,
                              ncols=3, mask_alpha=0.7)
            fig.suptitle("top: ground-truth masks, bottom: predicted masks", fontsize=10)
        paths[f"predictions_{task}"] = _save(fig, folder / f"predictions_{task}.png")
    return {name: str(Path(path).relative_to(folder.parent)) for name, path in paths.items()}


def shift_figure():
    """The axial shift on a scene: 5 channel groups moved by -2..2 (dilation 6 so the offsets are visible)."""
    import matplotlib.pyplot as plt

    from .data.shapes import scenes
    from .shift import axial_shift
    image = torch.from_numpy(scenes(1, seed=3, split="test")[0].image).permute(2, 0, 1).float() / 255
    groups = image.repeat(5, 1, 1)[None]                        # (1, 15, h, w): 5 groups of the 3 RGB channels
    fig, axes = plt.subplots(2, 6, figsize=(13, 4.8))
    for row, (dim, name) in enumerate(((-1, "horizontal"), (-2, "vertical"))):
        shifted = axial_shift(groups, shift_size=5, dim=dim, dilation=6)[0]
        axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
        axes[row, 0].set_title(f"input, {name} shift ->", fontsize=9)
        for g in range(5):
            axes[row, g + 1].imshow(shifted[3 * g:3 * g + 3].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[row, g + 1].set_title(f"group {g}: offset {(g - 2) * 6:+d} px", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Axial shift (shift size 5, dilation 6): each channel group moves by its own offset along one "
                 "axis, zeros fill the gap; a 1x1 conv then mixes the groups", fontsize=10)
    return fig


def _save(fig, path: Path) -> Path:
    from .viz import save_figure
    fig.tight_layout(rect=(0, 0, 1, 0.94) if fig._suptitle is not None else (0, 0, 1, 1))
    return save_figure(fig, path, dpi=90)


# ---------------------------------------------------------------- report

def render_report(results: dict[str, Trainer], figures: dict[str, str], total_s: float, quick: bool) -> str:
    """report.md: what ran, the metrics, model sizes next to the paper's, and the figures."""
    from .complexity import count_gmacs, count_params
    lines = ["# asmlp_min demo: AS-MLP on synthetic shapes", ""]
    if quick:
        lines += ["**Quick mode**: a few steps per task, to check the pipeline. The numbers mean nothing.", ""]
    lines += [f"Generated by `asmlp-min demo` in {total_s / 60:.1f} min on {os.cpu_count()} CPU core(s) "
              f"({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}.", "",
              "## Results on the validation scenes", "",
              "| task | model | data (train / val scenes, side) | epochs | result | time |",
              "|---|---|---|---|---|---|"]
    for task, trainer in results.items():
        cfg, last = trainer.cfg, trainer.history[-1]
        model = trainer.model
        size = (3, cfg.image_size, cfg.image_size)
        gmacs = count_gmacs(model.backbone if task == "det" else model, size)  # detector input is a list
        what = _result_text(task, last)
        lines.append(f"| {TITLES[task]} | AS-MLP C={cfg.embed_dim}, depths {'-'.join(map(str, cfg.depths))} + "
                     f"{HEADS[task]}; {count_params(model) / 1e6:.2f}M params, {gmacs:.3f} GMACs"
                     f"{' (backbone)' if task == 'det' else ''} at {cfg.image_size}x{cfg.image_size} | "
                     f"{len(trainer.data.train)} / {len(trainer.data.val)}, {cfg.image_size} px | {cfg.epochs} | "
                     f"{what} | {_run_seconds(trainer.history):.0f} s ({last['train_img_per_s']:.0f} img/s) |")
    lines += ["", "Scenes: the shapes generator's circles, squares and triangles on a flat grey background instead of "
              "the default textured one (from scratch, the textured scenes need far more steps than a CPU demo has; "
              "see `asmlp_min/demo.py`). Classification scenes hold one shape of 40-80 px (before resizing to 64), "
              "detection and segmentation scenes one to four of 16-52 px. AP is COCO box AP (IoU 0.50:0.95); mIoU "
              "counts the background as a class (4 classes); segmentation weighs each pixel's loss by its class "
              "(`--class-weight balanced`: sqrt(background pixels / class pixels)). Chance is 33% top-1. "
              "These numbers show that the pipeline learns in minutes on a CPU, not how AS-MLP compares with other "
              "models: the paper trains 300 ImageNet epochs before detection and segmentation.", ""]
    lines += complexity_table()
    lines += ["", "## Figures", ""]
    captions = {"shift": "The axial shift, the operation AS-MLP is built on",
                "curves": "Training curves (loss left axis, metric right axis)",
                "predictions_cls": "Classification: predicted and true dominant shape",
                "predictions_det": "Detection", "predictions_seg": "Semantic segmentation"}
    for name, path in figures.items():
        lines += [f"### {captions[name]}", "", f"![{name}]({path})", ""]
    lines += ["## Go further", "",
              "- Every run folder (`cls/`, `det/`, `seg/`) holds `checkpoint.pt`, `metrics.jsonl` and `curves.png`.",
              "- `asmlp-min evaluate --checkpoint runs/demo/det/checkpoint.pt` re-scores a model; "
              "`asmlp-min predict --checkpoint runs/demo/seg/checkpoint.pt image.png` draws its output.",
              "- `asmlp-min train cls --help` lists the training options (AMP, resume, torchrun).", ""]
    return "\n".join(lines)


def _run_seconds(history: list[dict]) -> float:
    """Training plus evaluation time of a run, from its metrics (also right for a reused or resumed run)."""
    return sum(row.get("train_time_s", 0) + row.get("eval_time_s", 0) for row in history)


def _result_text(task: str, metrics: dict) -> str:
    if task == "cls":
        return f"top-1 **{metrics['top1']:.1%}** (val loss {metrics['val_loss']:.3f})"
    if task == "det":
        return f"box AP **{metrics['AP']:.3f}**, AP50 {metrics['AP50']:.3f}"
    return f"mIoU **{metrics['mIoU']:.3f}**, pixel accuracy {metrics['aAcc']:.1%}"


def complexity_table() -> list[str]:
    """Parameters and GMACs of the full-size models beside the paper's table (ImageNet 224x224, 1000 classes)."""
    from .backbone import create_model
    from .complexity import OFFICIAL_ANALYTIC_GMACS, PAPER, analytic_gmacs, count_params
    lines = ["## Full-size models beside the paper", "",
             "| model | params (ours) | params (paper) | GMACs at 224x224 (ours, official formula) | GMACs (paper) | "
             "ImageNet top-1 (paper) |", "|---|---|---|---|---|---|"]
    for name in ("asmlp_tiny", "asmlp_small", "asmlp_base"):
        paper = PAPER[name]
        lines.append(f"| {name} | {count_params(create_model(name)) / 1e6:.1f}M | {paper['params']}M | "
                     f"{analytic_gmacs(name):.2f} | {paper['gmacs']} (official code {OFFICIAL_ANALYTIC_GMACS[name]}) | "
                     f"{paper['top1']}% |")
    from .detection import build_maskrcnn
    from .segmentation import PAPER_PARAMS
    maskrcnn = count_params(build_maskrcnn("asmlp_tiny", num_classes=81))  # 80 COCO classes + background
    upernet = count_params(build_model("seg", "asmlp_tiny", 150))
    lines += ["", "| dense model (AS-MLP-T backbone) | params (ours) | params (paper) |", "|---|---|---|",
              f"| Mask R-CNN, COCO (`detection.build_maskrcnn`) | {maskrcnn / 1e6:.1f}M | 48M |",
              f"| UperNet + auxiliary head, ADE20K (`SemanticSegmenter`) | {upernet / 1e6:.1f}M | "
              f"{PAPER_PARAMS['asmlp_tiny']}M |", "",
              "`asmlp-min info asmlp_tiny` prints the measured GMACs and the stage shapes."]
    return lines
