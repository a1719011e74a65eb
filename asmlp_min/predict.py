"""``asmlp-min predict``: a training run's checkpoint on image files and folders.

For each image: one printed line (top-k classes, boxes, or pixel shares), a picture ``OUTPUT/<name>_<task>.png``,
for segmentation the class ids ``<name>_seg_mask.png``, and with ``--json`` every result in one file. An image
that cannot be read, or that runs out of memory, costs only its own result (exit status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from torch import Tensor


def add_predict_parser(sub) -> None:
    """The ``predict`` subcommand of ``asmlp-min`` (cli.py), beside the function it runs."""
    pr = sub.add_parser("predict", help="run a checkpoint on images: top-k classes, boxes or a mask overlay PNG",
                        description="For each image, print the prediction and write OUTPUT/<name>_<task>.png: the "
                                    "top-k classes as the title (cls), boxes with labels and scores (det), or the "
                                    "class mask blended over the image (seg), which also writes the class ids as "
                                    "<name>_seg_mask.png (8-bit grayscale, the image's size). Images of the same "
                                    "name get <name>_2_<task>.png, ...; a file left by an earlier call is "
                                    "replaced, and the output line says so. Photos are turned upright as their "
                                    "EXIF orientation says. An unreadable image, or one too large for the memory, is "
                                    "skipped with a warning and the others go on (exit status 2 if any was skipped). "
                                    "No input image is overwritten: an output name that is one gets a number.")
    pr.add_argument("images", nargs="+", help="image files (png, jpg, ...) or folders (every image directly in them)")
    pr.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run, or released weights with "
                    "their head: an official classification .pth, an official mmseg UperNet checkpoint")
    pr.add_argument("--output", default="runs/predict", help="folder for the PNGs (default: runs/predict)")
    pr.add_argument("--topk", type=int, default=5, help="cls: classes to list (default: 5)")
    pr.add_argument("--score-threshold", type=float, default=0.3, help="det: hide boxes scored below (default: 0.3)")
    pr.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N "
                    "(default: auto)")
    pr.add_argument("--json", help="also write every image's result to this JSON file (top-k classes, boxes with "
                                   "scores, or pixel shares; unreadable images with their error)")
    pr.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")

    from .files import atomic_write
    from .cli import _load_for, writable_file
    from .data.images import load_image
    from .engine import prepare_output_folder, strict_json
    from .engine.distributed import resolve_device
    from .viz import save_figure
    _check_arguments(args)
    device = resolve_device(args.device)
    images = _image_files(args.images)
    json_path = (writable_file(args.json, "json", "predictions.json", reads=[args.checkpoint, *images]) if args.json
                 else None)
    output = prepare_output_folder(args.output, "output")
    model, cfg, checkpoint = _load_for(args)
    model.to(device)  # a GPU run's --amp stays on the GPU; on the CPU it would be bfloat16, as evaluate drops it there
    cfg = dataclasses.replace(cfg, amp=cfg.amp and device.type == "cuda")
    classes = list(checkpoint["classes"])
    destinations = _output_names(images, output, cfg.task)
    masks = [d.with_name(d.stem + "_mask.png") if cfg.task == "seg" else None for d in destinations]
    folders = [str(d) for d in destinations + masks if d is not None and d.is_dir()]
    if folders:  # found before any image is drawn, not after some
        raise ValueError(f"cannot write {', '.join(folders)}: a folder of that name is in the way; move it or choose "
                         "another --output")
    skipped, records = [], []
    for path, destination, mask_path in zip(images, destinations, masks):
        try:                                         # one bad or huge file in a folder costs only its own result
            image = load_image(path, upright=True)   # as a photo viewer shows it, EXIF orientation applied
            result = _predicted(model, cfg, image, path)
        except ValueError as err:
            print(f"asmlp-min predict: warning: skipped {err}", file=sys.stderr)
            skipped.append(path)
            records.append({"image": str(path), "error": str(err)})
            continue
        lines, fig, record = _describe(cfg.task, result, image, classes, args)
        if mask_path is not None:
            _save_class_mask(result, mask_path)
            record["mask"] = str(mask_path)
        replaced = " (replaced an older file)" if destination.exists() else ""
        save_figure(fig, destination)
        print(f"{path}: " + ("; ".join(lines) if lines else "nothing above the score threshold")
              + f" -> {destination}{replaced}" + (f" and its class ids {mask_path}" if mask_path else ""))
        records.append({"image": str(path), "picture": str(destination), **record})
    if json_path is not None:
        with atomic_write(json_path, "w") as f:
            f.write(strict_json(records, indent=1) + "\n")
    if len(skipped) == len(images):
        raise ValueError(f"none of the {len(images)} image(s) could be predicted (see the warnings above)")
    if skipped:
        print(f"asmlp-min predict: {len(skipped)} of {len(images)} images could not be predicted: "
              + ", ".join(map(str, skipped)), file=sys.stderr)
        return 2
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """The flags' values, refused before any file is read."""
    from .data.images import is_image_file
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    if not 0.0 <= args.score_threshold <= 1.0:  # nan fails both comparisons: it would hide every box
        raise ValueError(f"--score-threshold must be a number in [0, 1], got {args.score_threshold}")
    if args.json and is_image_file(args.json):  # `--json a.png b.png` taken as a switch: a.png would be replaced
        raise ValueError(f"--json {args.json!r} names an image; the file the predictions go to comes right after "
                         "--json, e.g. --json predictions.json IMAGE ...")


def _predicted(model, cfg, image: Tensor, path: Path):
    """``engine.predict(model, cfg, image)``; running out of memory becomes a ValueError naming the image, so that
    the caller skips it as it skips an unreadable file."""
    from .cli import out_of_memory
    from .engine import predict
    try:
        return predict(model, cfg, image)
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        h, w = image.shape[-2:]
        raise ValueError(f"{path}: out of memory predicting this {w}x{h} image; scale it down or free "
                         "memory") from err


def _describe(task: str, result, image: Tensor, classes: list[str], args: argparse.Namespace):
    """One image's result as (printed parts, figure, JSON record)."""
    from .viz import draw_scenes
    if task == "cls":
        top = result.topk(min(args.topk, len(classes)))
        found = [{"class": classes[i], "probability": p} for p, i in zip(top.values.tolist(), top.indices.tolist())]
        lines = [f"{f['class']} {f['probability']:.3f}" for f in found]
        fig = draw_scenes([image], [int(top.indices[0])], classes, ncols=1, panel_size=4)
        fig.axes[0].set_title("\n".join(lines), fontsize=9)
        fig.tight_layout()  # again, for the title's lines: the top-1 line was cut off
        return lines, fig, {"top": found}
    if task == "det":
        keep = result["scores"] >= args.score_threshold
        result = {k: v[keep] for k, v in result.items()}
        found = [{"class": classes[label - 1] if 1 <= label <= len(classes) else label, "score": score,
                  "box_xyxy": box} for box, score, label in
                 zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist())]
        lines = [f"{f['class']} {f['score']:.3f} box xyxy {[round(v, 1) for v in f['box_xyxy']]}" for f in found]
        return lines, draw_scenes([image], [result], classes, ncols=1, panel_size=4), {"detections": found}
    background = bool(classes) and classes[0] == "background"
    counts = result.flatten().bincount(minlength=len(classes))
    share = {classes[c]: n / result.numel() for c, n in enumerate(counts.tolist()) if n}
    lines = [f"{'class ' * name.isdigit()}{name} {value:.1%} of pixels" for name, value in share.items()]  # 'class 2'
    # the overlay leaves value 0 uncoloured: the background, or nothing where class 0 is an object (ADE20K's wall)
    fig = draw_scenes([image], [result if background else result + 1], classes[background:], ncols=1, panel_size=4)
    return lines, fig, {"pixel_share": share}


def _save_class_mask(mask: Tensor, path: Path) -> None:
    """The (h, w) class map as a grayscale PNG of class ids (8-bit, 16-bit past 255 classes), written atomically."""
    import numpy as np
    from PIL import Image

    from .files import atomic_write
    values = mask.numpy()
    pixels = Image.fromarray(values.astype(np.uint8 if values.max() < 256 else np.uint16))
    with atomic_write(path) as f:
        pixels.save(f, format="PNG")


def _image_files(paths: list[str]) -> list[Path]:
    """The files given, with a folder standing for the images directly in it (sorted by name). A folder's hidden
    files are left out, as ImageFolder leaves them: macOS writes a '._x.jpg' of metadata beside each copied x.jpg."""
    from .data.images import IMAGE_EXTENSIONS, is_image_file
    if "" in paths:  # Path("") is the current folder
        raise ValueError("an image path is empty: give a file or a folder (was a shell variable unset?)")
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if is_image_file(p) and p.is_file())
            if not found:
                raise FileNotFoundError(f"folder {str(path)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return files


def _output_names(images: list[Path], output: Path, task: str) -> list[Path]:
    """``<name>_<task>.png`` per image, numbered ``<name>_2_<task>.png``, ... where names repeat (a/x.jpg, b/x.png)
    or would be one of the input images (``--output`` the input folder), so that no result of this call overwrites
    another or an image it reads. Names compare in any case (X.jpg and x.jpg), as macOS and Windows file systems
    do. Segmentation also writes ``<name>_<task>_mask.png`` beside each."""
    inputs, names, used = {str(image.resolve()).casefold() for image in images}, [], set()

    def taken(name: str) -> bool:
        mine = [name, name.removesuffix(".png") + "_mask.png"] if task == "seg" else [name]
        return any(m.casefold() in used or str((output / m).resolve()).casefold() in inputs for m in mine)

    for image in images:
        name, n = f"{image.stem}_{task}.png", 1
        while taken(name):
            n += 1
            name = f"{image.stem}_{n}_{task}.png"
        names.append(name)
        used.add(name.casefold())
    return [output / name for name in names]
