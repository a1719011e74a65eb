"""``asmlp-min demo`` / ``make demo``: the whole project in one CPU run on synthetic shapes.

    write shapes scenes once (ImageFolder, COCO, ADE20K-style folders under data/shapes/, reused on re-runs)
      -> train a small AS-MLP classifier, FCOS-style detector and UperNet segmenter with the engine
      -> evaluate them -> runs/demo/report.md + figures/ (axial shift, training curves, predictions)

The models are the paper's architectures at a small width (C = 32, one or two blocks per stage) so the
three runs fit in seven to ten minutes on two cores. Each run is an ordinary engine run folder: a finished
one is reused, an interrupted one (Ctrl-C) is resumed, so a re-run only does what is missing.

Every demo scene holds whole shapes (inside the image, nothing covering them) on a flat grey background
(the generator's ``whole=True, background="flat"``), so every label is well posed: a border-cut square can
read as a triangle. Classification uses the generator's ``CLS_SCENE`` (one shape of 16-40 px in a 64-px
image), as ``asmlp-min train cls`` does. Detection and segmentation use settings of their own, smaller than
the generator's defaults (textured, occluded, border-cut scenes), which a from-scratch model only masters
in far more steps than a CPU demo has.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .files import atomic_write
from .data.shapes import CLS_SCENE, export_shapes, make_scene, scene_rng
from .engine import CHECKPOINT_NAME, TASK_DEFAULTS, TrainConfig, Trainer, build_model, predict

# One small backbone for all three tasks: C=32, depths (1, 1, 2, 1), shift 5 (paper default), drop path 0.05.
BACKBONE = dict(model="asmlp_tiny", embed_dim=32, depths=(1, 1, 2, 1), drop_path=0.05)
RUNS = {
    "cls": dict(image_size=64, train_size=3000, val_size=300, epochs=12, batch_size=32, lr=1e-3, eval_every=3),
    "det": dict(min_size=128, train_size=1000, val_size=200, epochs=8, batch_size=16, lr=1e-3, eval_every=4,
                head_channels=64),
    "seg": dict(crop_size=64, train_size=1500, val_size=200, epochs=10, batch_size=16, lr=2e-3, eval_every=5,
                head_channels=64, class_weight="balanced"),
}
# make_scene settings per task (scenes are drawn at the run's input size, so no resize blurs them).
SCENES = {
    "cls": CLS_SCENE,
    "det": dict(image_size=128, max_shapes=3, size_range=(16, 48), whole=True, background="flat"),
    "seg": dict(image_size=64, max_shapes=3, size_range=(12, 30), whole=True, background="flat"),
}
# What a run must reach on its held-out scenes for the demo to count as a success (issue 16).
TARGETS = {"cls": ("top1", 0.95), "det": ("AP", 0.7), "seg": ("mIoU", 0.6)}
QUICK = {"cls": dict(train_size=48, val_size=24, epochs=1, batch_size=16),
         "det": dict(train_size=16, val_size=8, epochs=1, batch_size=8),
         "seg": dict(train_size=16, val_size=8, epochs=1, batch_size=8)}
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
        data = Path(data_root) / f"{task}{scene_tag}_{run['train_size']}_{run['val_size']}"
        configs[task] = TrainConfig(task=task, data=str(data), output=str(Path(output) / task), augment="light",
                                    num_classes=4 if task == "seg" else None, device="cpu", **BACKBONE, **run)
    return configs


def export_data(cfg: TrainConfig) -> Path:
    """Write the scenes of ``cfg`` in the task's on-disk layout (``export_shapes``); existing files are kept."""
    for split, n in (("train", cfg.train_size), ("val", cfg.val_size)):
        export_shapes(cfg.data, cfg.task, n, split, cfg.seed, **SCENES[cfg.task])
    return Path(cfg.data)


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
             quick: bool = False) -> tuple[Path, list[str]]:
    """Run the three trainings and write ``output/report.md``; returns its path and the targets missed
    (one sentence each; never checked in quick mode, whose numbers mean nothing)."""
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
    return report, [] if quick else missed_targets({task: t.history[-1] for task, t in results.items()})


def missed_targets(metrics: dict[str, dict]) -> list[str]:
    """One sentence per task whose final metrics (``{task: {name: value}}``) miss ``TARGETS`` (nan misses)."""
    return [f"{TITLES[task]}: {name} {metrics[task][name]:.3f} < target {target}"
            for task, (name, target) in TARGETS.items() if task in metrics and not metrics[task][name] >= target]


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
        shown = [make_scene(scene_rng(cfg.seed, "val", i), **SCENES[task]) for i in range(4 if task == "cls" else 3)]
        images = [torch.from_numpy(scene.image).permute(2, 0, 1) for scene in shown]
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
    # '/' on Windows too: markdown viewers read 'figures\x.png' as one file name
    return {name: Path(path).relative_to(folder.parent).as_posix() for name, path in paths.items()}


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
    """report.md: what ran, the metrics against their targets and chance, model sizes next to the paper's,
    and the figures."""
    lines = ["# asmlp_min demo: AS-MLP on synthetic shapes", ""]
    if quick:
        lines += ["**Quick mode**: a few steps per task, to check the pipeline. The numbers mean nothing.", ""]
    lines += [f"Generated by `asmlp-min demo` in {total_s / 60:.1f} min on {os.cpu_count()} CPU core(s) "
              f"({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}.", "",
              "## Results on the validation scenes", "",
              "| task | model | data (train / val scenes, side) | epochs (batch, AdamW lr) | result | target | "
              "chance | time |", "|---|---|---|---|---|---|---|---|"]
    lines += [_result_row(task, trainer, quick) for task, trainer in results.items()]
    lines += ["", "Scenes (`asmlp_min.data.shapes.make_scene` settings; every shape whole, i.e. inside the image and "
              "not covered, on one flat grey level per scene, so no label is ambiguous):", ""]
    lines += [f"- {TITLES[task]}: `{_kwargs_text(SCENES[task])}`" for task in results]
    lines += ["", "Training: from scratch, flips only. AP is COCO box AP (IoU 0.50:0.95); mIoU counts the background "
              "as a class (4 classes); segmentation weighs each pixel's loss by its class (`--class-weight "
              "balanced`: sqrt(background pixels / class pixels)). Chance levels are computed on the same validation "
              "scenes: cls, always answering the most frequent class; det, 100 random boxes per image (random "
              "position, size in the scenes' range, class and score); seg, every pixel background, and every "
              "shape's pixels found exactly but its class guessed at random. These numbers show that the pipeline "
              "learns in minutes on a CPU, not how AS-MLP compares with other models: the paper trains 300 ImageNet "
              "epochs before detection and segmentation.", ""]
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


def _result_row(task: str, trainer: Trainer, quick: bool) -> str:
    """One line of the results table: model, data, schedule, metric against target and chance, time."""
    from .complexity import count_gmacs, count_params
    cfg, last, model = trainer.cfg, trainer.history[-1], trainer.model
    size = cfg.min_size if task == "det" else cfg.input_size
    gmacs = count_gmacs(model.backbone if task == "det" else model, (3, size, size))
    name, target = TARGETS[task]
    met = "not checked (quick)" if quick else ("**met**" if last[name] >= target else "**MISSED**")
    return (f"| {TITLES[task]} | AS-MLP C={cfg.embed_dim}, depths {'-'.join(map(str, cfg.depths))} + {HEADS[task]}; "
            f"{count_params(model) / 1e6:.2f}M params, {gmacs:.3f} GMACs{' (backbone)' if task == 'det' else ''} at "
            f"{size}x{size} | {len(trainer.data.train)} / {len(trainer.data.val)}, "
            f"{size} px | {cfg.epochs} ({cfg.batch_size}, {cfg.lr:g}) | {_result_text(task, last)} | "
            f"{name} >= {target}: {met} | {_chance_text(task, cfg)} | "
            f"{_run_seconds(trainer.history):.0f} s ({last['train_img_per_s']:.0f} img/s) |")


def chance_levels(task: str, seed: int, n: int) -> dict[str, float]:
    """What guessing scores on the demo's first ``n`` validation scenes of ``task`` (same metric code)."""
    from .data.shapes import CLASSES, NUM_SEG_CLASSES, coco_dict
    from .metrics import SegmentationMeter, coco_evaluate
    scenes = [make_scene(scene_rng(seed, "val", i), **SCENES[task]) for i in range(n)]
    rng = np.random.default_rng(0)
    if task == "cls":
        return {"top1": np.bincount([s.label for s in scenes], minlength=len(CLASSES)).max() / n}
    if task == "seg":
        levels = {}
        for name in ("all background", "class guessed"):
            meter = SegmentationMeter(NUM_SEG_CLASSES)
            for s in scenes:
                # instance k (1-based) -> its guessed class; 0 stays background
                guess = np.concatenate([[0], rng.integers(1, NUM_SEG_CLASSES, len(s.kinds))])
                instance = (s.masks * np.arange(1, len(s.kinds) + 1)[:, None, None]).sum(0)
                pred = np.zeros_like(instance) if name == "all background" else guess[instance]
                meter.update(torch.from_numpy(pred), torch.from_numpy(s.semantic.astype(np.int64)))
            levels[name] = meter.compute()["mIoU"]
        return levels
    lo, hi = SCENES[task]["size_range"]
    detections = []
    for i, s in enumerate(scenes):
        h, w = s.semantic.shape
        side = rng.integers(lo, hi + 1, (100, 1))
        corner = rng.random((100, 2)) * (np.array([w, h]) - side)
        detections.append({"image_id": i + 1, "boxes": torch.tensor(np.hstack([corner, corner + side])).float(),
                           "scores": torch.from_numpy(rng.random(100)),
                           "labels": torch.from_numpy(rng.integers(1, len(CLASSES) + 1, 100))})
    return {"AP": coco_evaluate(coco_dict(scenes), detections)["AP"]}


def _chance_text(task: str, cfg: TrainConfig) -> str:
    levels = chance_levels(task, cfg.seed, cfg.val_size)
    if task == "cls":
        return f"top-1 {levels['top1']:.1%} (most frequent class; a uniform guess 33.3%)"
    if task == "det":
        return f"box AP {levels['AP']:.3f} (random boxes)"
    return (f"mIoU {levels['all background']:.3f} (all background), {levels['class guessed']:.3f} "
            "(shapes found, class guessed)")


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


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
