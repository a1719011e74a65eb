"""What ``asmlp-min bench`` reports: the target ratios (:func:`summarise`), the markdown table of a run
(:func:`format_table`) and its JSON file (:func:`write_json`)."""
from __future__ import annotations

import json
import os

from ..files import atomic_write


# The issues' targets: name -> (json path of the ratio, threshold, "min" = ratio must be >= threshold, issue).
# Issue 20 raised issue 7's inference targets against the peers; the others stand as issue 7 set them.
TARGETS = {
    "shift <= 1.3x clone at every stage": ("shift_vs_clone_worst", 1.3, "max", 7),
    "shift >= 4x faster than Algorithm 1 at every stage": ("shift_speedup_worst", 4.0, "min", 7),
    "inference >= 1.5x official configuration": ("inference_vs_official", 1.5, "min", 7),
    "inference >= 1.5x swin_t": ("inference_vs_swin_t", 1.5, "min", 20),
    "inference >= 1.2x convnext_tiny": ("inference_vs_convnext_tiny", 1.2, "min", 20),
    "inference >= 85% of matmul GFLOP/s": ("matmul_fraction", 0.85, "min", 20),
    "training step >= 1.3x official configuration": ("training_vs_official", 1.3, "min", 20),
    "training peak memory <= official configuration": ("training_memory_vs_official", 1.0, "max", 7),
}


def summarise(results: dict) -> dict:
    """The ratios the targets are stated in, and whether each target is met."""
    inference = results["inference"]["models"]
    training = results["training"]["models"]
    ours = inference["asmlp_min"]["images_per_s"]
    ratios = dict(
        shift_vs_clone_worst=max(row["vs_clone"] for row in results["shift"]),
        shift_speedup_worst=min(row["speedup_vs_algorithm1"] for row in results["shift"]),
        inference_vs_official=ours / inference["official configuration"]["images_per_s"],
        matmul_fraction=inference["asmlp_min"]["matmul_fraction"],
        training_vs_official=training["asmlp_min"]["images_per_s"]
        / training["official configuration"]["images_per_s"],
        training_memory_vs_official=training["asmlp_min"]["peak_memory_mib"]
        / training["official configuration"]["peak_memory_mib"],
    )
    for peer in ("swin_t", "convnext_tiny"):
        if peer in inference:
            ratios[f"inference_vs_{peer}"] = ours / inference[peer]["images_per_s"]
    targets = {}
    for text, (key, threshold, kind, issue) in TARGETS.items():
        if key in ratios:
            value = ratios[key]
            targets[text] = dict(value=value, met=value >= threshold if kind == "min" else value <= threshold,
                                 issue=issue)
    return dict(ratios=ratios, targets=targets)


# ---------------------------------------------------------------- the markdown table

def compile_label(settings: dict) -> str:
    """How the tables name the compiled candidates' ``torch.compile`` call (``settings``: the run's, as in JSON)."""
    if settings["compile_backend"] != "inductor":
        return f"torch.compile(backend={settings['compile_backend']!r})"
    return f"torch.compile ({settings['compile_mode']} mode)"


def _inference_lines(inf: dict, label: str) -> list[str]:
    ours = inf["models"]["asmlp_min"]["images_per_s"]
    lines = [
        "",
        f"### Inference, batch {inf['batch']}, eval, no autograd",
        "",
        "| model | ms / batch | images/s | asmlp_min speed-up | GMACs | GFLOP/s | of matmul | page faults / batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in inf["models"].items():
        faults = m.get("page_faults")
        lines.append(f"| {name} | {m['ms_per_batch']:.0f} | {m['images_per_s']:.1f} | "
                     f"{ours / m['images_per_s']:.2f}x | {m['gmacs']:.2f} | {m['gflops']:.0f} | "
                     f"{100 * m['matmul_fraction']:.0f}% | {'n/a' if faults is None else f'{faults:,}'} |")
    mm = inf["matmul"]
    lines.append(f"| matmul {mm['n']}x{mm['n']} {mm['dtype']} (same rounds) | | | | | {mm['gflops']:.0f} | 100% | |")
    if any(m.get("page_faults") is not None for m in inf["models"].values()):
        lines += ["", "Page faults: fresh memory pages the kernel mapped and zero-filled during one more call of each "
                      "model after the timed rounds (getrusage)."]
    if inf.get("compile_seconds"):
        took = ", ".join(f"{name} {s:.0f} s" for name, s in inf["compile_seconds"].items())
        lines += ["", f"{label} took {took} before timing (not included)."]
    return lines


def _header_lines(results: dict) -> list[str]:
    s = results["settings"]
    load = results.get("loadavg_before")
    return [
        f"## asmlp-min bench: {s['model']} at {s['image_size']}x{s['image_size']} on {s['device']}"
        f" ({results['device_name']})",
        "",
        f"torch {results['torch']}, {results['threads']} threads ({results['cpu_count']} CPUs), "
        f"{'fp16 autocast' if s['amp'] else 'fp32'}; median of {s['repeats']} rounds "
        f"({s['shift_repeats']} for the shift) after {s['warmup']} warm-up rounds, candidates timed in turns"
        + (f"; load average {load[0]:.2f} before, {results['loadavg_after'][0]:.2f} after" if load else "")
        + f"; {results['seconds']:.0f} s in all. "
        + ("malloc keeps freed memory for reuse (--keep-freed-memory), for every candidate alike."
           if results.get("freed_memory_kept") else "malloc at its defaults.")
        + shift_path(results),
    ]


def shift_path(results: dict) -> str:
    """The header's note of how asmlp_min's shift ran on CUDA, eager: one Triton kernel or the torch slices."""
    return f" asmlp_min's eager shift: {results['cuda_shift']}." if results.get("cuda_shift") else ""


def _shift_lines(shift: list[dict]) -> list[str]:
    lines = [
        "",
        f"### Shift ({shift[0]['memory_format']}), ms per call",
        "",
        "| stage | (b, c, h, w) | clone | asmlp_min w / h | Algorithm 1 w / h | asmlp_min / clone "
        "| speed-up vs Alg. 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in shift:
        ms = row["ms"]
        lines.append(f"| {row['stage']} | {tuple(row['shape'])} | {ms['clone']:.3f} | {ms['asmlp_min_w']:.3f} / "
                     f"{ms['asmlp_min_h']:.3f} | {ms['algorithm1_w']:.3f} / {ms['algorithm1_h']:.3f} | "
                     f"{row['vs_clone']:.2f}x | {row['speedup_vs_algorithm1']:.1f}x |")
    return lines


def _training_lines(tr: dict, device: str) -> list[str]:
    ours = tr["models"]["asmlp_min"]["images_per_s"]
    lines = [
        "",
        f"### Training step, batch {tr['batch']} (forward, cross-entropy, backward, SGD update)",
        "",
        "| model | ms / step | images/s | asmlp_min speed-up | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, m in tr["models"].items():
        lines.append(f"| {name} | {m['ms_per_step']:.0f} | {m['images_per_s']:.1f} | "
                     f"{ours / m['images_per_s']:.2f}x | {m['peak_memory_mib']:.0f} |")
    return lines + ["", "Peak memory: the most bytes held at once by tensors allocated during one step (activations, "
                        "gradients, temporaries; weights and optimizer state excluded)"
                    + (", from the profiler's CPU allocation events." if device == "cpu" else
                       ", from torch.cuda.max_memory_allocated.")]


def _target_lines(targets: dict) -> list[str]:
    return ["", "### Targets", "", "| target | issue | measured | met |", "|---|---|---|---|"] + [
        f"| {text} | {t['issue']} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} |" for text, t in targets.items()]


def format_table(results: dict) -> str:
    """Markdown: settings, the three tables, and the targets with their measured ratios."""
    lines = (_header_lines(results) + _shift_lines(results["shift"])
             + _inference_lines(results["inference"], compile_label(results["settings"]))
             + _training_lines(results["training"], results["settings"]["device"])
             + _target_lines(results["targets"]))
    return "\n".join(lines)


def write_json(results: dict, path: str | os.PathLike) -> None:
    """Write atomically (:func:`asmlp_min.files.atomic_write`): a temporary file in the same folder, then a
    rename."""
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=2)
