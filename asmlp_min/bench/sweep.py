"""``asmlp-min bench --batches 64,128,256,512``: images/s of every candidate over a sweep of batch sizes, eager and
(with ``--compile``) compiled alike, the batch where each saturates, and the training step of asmlp_min beside the
official configuration at the same batches (issue 20). A GPU is far from full at the paper's batch 64.

* At each batch every candidate, eager and compiled, is timed in the same rounds (:func:`.measure.time_in_turns`), so
  the ratios hold on a busy machine. Larger batches get proportionally fewer rounds (:func:`rounds_at`), so each
  batch is timed on about as many images; times are medians.
* Compiled means ``torch.compile(model)`` in ``--compile-mode`` (default: default), the same call for every
  candidate, made once: the input's batch dimension is marked dynamic, so one compilation serves the whole sweep
  instead of one per batch.
  The seconds its first calls take beyond a timed call are reported as its compile time.
* A candidate *saturates* at the smallest batch whose images/s is within 5% of its best over the sweep
  (:func:`saturating_batch`); when that is the largest batch measured, it may still be rising, and the table says so.
* The ratio of two candidates is taken at the first batch where both are saturated, the larger of their two
  saturating batches (:func:`ratio_at_saturation`); the training memory ratio at the same batch as its speed ratio.
* ``max_seconds``: before each batch its time is estimated as the previous batch's (compilation excluded) scaled by
  the images it runs (batch x calls); a batch that would end past the limit is not started, nor any larger one.
  Running out of memory stops the sweep the same way. The table says where and why it stopped.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..backbone import ASMLP
from .measure import (_autocast, _environment, _loadavg, _peer, _sync, build_models, compiled, measure_training,
                      time_in_turns)
from .report import compile_label, shift_path
from .settings import BenchSettings

SATURATION_TOLERANCE = 0.05  # saturated: within 5% of the best images/s over the sweep
MIN_ROUNDS = 3               # a median of fewer says little
TRAINED = ("asmlp_min", "official configuration")

# Issue 20, stated for the GPU in fp16: text -> (where the ratio is in results["sweep"]["ratios"], threshold, kind).
SWEEP_TARGETS = {
    "eager inference >= 1.4x swin_t": (("eager", "swin_t"), 1.4, "min"),
    "compiled inference >= compiled swin_t": (("compiled", "swin_t"), 1.0, "min"),
    "training step >= 1.2x official configuration": (("training", "images_per_s"), 1.2, "min"),
    "training peak memory <= official configuration": (("training", "peak_memory_mib"), 1.0, "max"),
}


def saturating_batch(batches: Sequence[int], images_per_s: Sequence[float],
                     tolerance: float = SATURATION_TOLERANCE) -> int:
    """The smallest batch whose images/s is within ``tolerance`` of the best over the sweep."""
    best = max(images_per_s)
    return min(b for b, speed in zip(batches, images_per_s) if speed >= (1 - tolerance) * best)


def ratio_at_saturation(batches: Sequence[int], ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """ours / theirs at the first batch where both are saturated (the larger of their saturating batches)."""
    at = max(saturating_batch(batches, ours), saturating_batch(batches, theirs))
    i = list(batches).index(at)
    return dict(at_batch=at, ratio=ours[i] / theirs[i])


def rounds_at(count: int, batch: int, first_batch: int) -> int:
    """``count`` rounds at the sweep's first batch, proportionally fewer at larger ones, never fewer than 3 (or
    ``count``): each batch is timed on about as many images."""
    return max(min(count, MIN_ROUNDS), math.ceil(count * first_batch / batch))


def sweep_images(settings: BenchSettings, batch: int) -> Tensor:
    """A random (batch, 3, size, size) input whose batch dimension a compiled model treats as dynamic."""
    images = torch.randn(batch, 3, settings.image_size, settings.image_size, device=settings.device)
    if batch > 1:  # size 1 is always specialised; "maybe": a model that needs the size recompiles, not fails
        torch._dynamo.maybe_mark_dynamic(images, 0)
    return images


def sweep_candidates(settings: BenchSettings, ours: ASMLP, official: ASMLP) -> dict[tuple[str, str], nn.Module]:
    """(mode, name) -> model: asmlp_min, the official configuration and the peers, eager and, with
    ``settings.compile``, each compiled by the same ``torch.compile`` call."""
    eager = {"asmlp_min": ours, "official configuration": official}
    eager.update({name: _peer(name).to(settings.device).eval() for name in settings.peers})
    candidates = {("eager", name): model for name, model in eager.items()}
    if settings.compile:
        candidates.update({("compiled", name): compiled(model, settings) for name, model in eager.items()})
    return candidates


def _first_call_seconds(call, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


def measure_batch(settings: BenchSettings, candidates: dict, batch: int, first_batch: int,
                  progress: tqdm | None = None) -> dict:
    """At one batch: (mode, name) -> seconds per call (median) and the seconds of the first, untimed call."""
    images = sweep_images(settings, batch)
    calls = {key: (lambda model=model: model(images)) for key, model in candidates.items()}
    first = {}
    with torch.no_grad(), _autocast(settings):
        for key, call in calls.items():
            first[key] = _first_call_seconds(call, settings.device)  # compiles, at the first batch
            if progress is not None:
                progress.update()
        times = time_in_turns(calls, rounds_at(settings.warmup, batch, first_batch),
                              rounds_at(settings.repeats, batch, first_batch), settings.device, progress)
    return {key: dict(seconds=statistics.median(times[key]), first_call_seconds=first[key]) for key in calls}


def measure_training_at(settings: BenchSettings, ours: ASMLP, official: ASMLP, batch: int, first_batch: int,
                        progress: tqdm | None = None) -> dict:
    """measure.measure_training at ``batch``, with the sweep's rounds."""
    at_batch = dataclasses.replace(settings, train_batch=batch,
                                   warmup=rounds_at(settings.warmup, batch, first_batch),
                                   repeats=rounds_at(settings.repeats, batch, first_batch))
    return measure_training(at_batch, ours, official, progress)["models"]


def _beyond_a_call(measured: dict) -> float:
    """What a first call took beyond a timed call: for a compiled model, compilation (or a recompilation)."""
    return max(0.0, measured["first_call_seconds"] - measured["seconds"])


def _compile_seconds(at_batch: dict) -> float:
    return sum(_beyond_a_call(m) for (mode, _), m in at_batch.items() if mode == "compiled")


def _stop_reason(settings: BenchSettings, batch: int, first_batch: int, last: tuple[int, float] | None,
                 elapsed: float) -> str | None:
    """Why ``batch`` is not started, or None: its estimated time would end the sweep past ``max_seconds``. The
    estimate scales the last batch's time by the images it will run: batch x calls, with fewer rounds at larger
    batches (:func:`rounds_at`)."""
    if settings.max_seconds is None or last is None:
        return None
    last_batch, last_seconds = last
    images = batch * _calls_at(settings, batch, first_batch)
    estimate = last_seconds * images / (last_batch * _calls_at(settings, last_batch, first_batch))
    if elapsed + estimate <= settings.max_seconds:
        return None
    return (f"--max-seconds {settings.max_seconds:g}: {elapsed:.0f} s gone, batch {batch} would take about "
            f"{estimate:.0f} s more")


def _calls_at(settings: BenchSettings, batch: int, first_batch: int) -> int:
    """Calls of each candidate at ``batch``: the first, untimed one, the warm-up rounds and the timed rounds."""
    return 1 + rounds_at(settings.warmup, batch, first_batch) + rounds_at(settings.repeats, batch, first_batch)


def _planned_calls(settings: BenchSettings, plan: list[int], n_candidates: int) -> int:
    """Progress-bar length: every call the sweep makes if nothing stops it."""
    total = 0
    for batch in plan:
        calls = _calls_at(settings, batch, plan[0])
        total += n_candidates * calls if batch in settings.batches else 0
        total += len(TRAINED) * calls if batch in settings.train_batches else 0
    return total


def sweep_batches(settings: BenchSettings, candidates: dict, ours: ASMLP, official: ASMLP,
                  progress: tqdm | None = None) -> tuple[dict, dict, dict | None]:
    """Inference and training at each batch, smallest first, until the batches end or a guard stops the sweep.
    Returns {batch: measure_batch(...)}, {batch: training models}, and None or where and why it stopped."""
    plan = sorted(set(settings.batches) | set(settings.train_batches))
    inference, training, last = {}, {}, None
    started = time.perf_counter()
    for batch in plan:
        measured_once = inference and (training or not settings.train_batches)  # never stop before a first result
        reason = _stop_reason(settings, batch, plan[0], last, time.perf_counter() - started) if measured_once else None
        if reason is not None:
            return inference, training, dict(before_batch=batch, reason=reason)
        batch_started = time.perf_counter()
        try:
            if batch in settings.batches:
                inference[batch] = measure_batch(settings, candidates, batch, plan[0], progress)
            if batch in settings.train_batches:
                training[batch] = measure_training_at(settings, ours, official, batch, plan[0], progress)
        except torch.OutOfMemoryError:
            inference.pop(batch, None)  # keep whole batches only
            if settings.device == "cuda":
                torch.cuda.empty_cache()
            if not (inference or training):
                raise ValueError(f"out of {settings.device} memory at the sweep's first batch {batch}: "
                                 "choose smaller --batches") from None
            return inference, training, dict(before_batch=batch, reason=f"out of {settings.device} memory")
        last = (batch, time.perf_counter() - batch_started - _compile_seconds(inference.get(batch, {})))
    return inference, training, None


def run_sweep(settings: BenchSettings, progress: bool = True) -> dict:
    """Every measurement of one sweep, as a JSON-ready dict (see :func:`format_sweep_table` for the layout)."""
    ours, official = build_models(settings)
    candidates = sweep_candidates(settings, ours, official)
    plan = sorted(set(settings.batches) | set(settings.train_batches))
    started, load_before = time.perf_counter(), _loadavg()
    with tqdm(total=_planned_calls(settings, plan, len(candidates)), desc="asmlp-min bench --batches",
              file=sys.stderr, disable=None if progress else True, dynamic_ncols=True, leave=False) as bar:
        inference, training, stopped = sweep_batches(settings, candidates, ours, official, bar)
    sweep = collect_sweep(inference, training, stopped)
    results = dict(sweep=sweep, **_environment(settings), loadavg_before=load_before, loadavg_after=_loadavg(),
                   seconds=time.perf_counter() - started)
    results["targets"] = sweep_targets(sweep["ratios"])
    return results


def _inference_table(inference: dict) -> tuple[list[int], dict]:
    """mode -> name -> images/s and ms per batch at each measured batch, and the saturating batch."""
    batches = sorted(inference)
    modes: dict[str, dict] = {}
    for mode, name in (inference[batches[0]] if batches else {}):
        seconds = [inference[b][(mode, name)]["seconds"] for b in batches]
        speeds = [b / s for b, s in zip(batches, seconds)]
        modes.setdefault(mode, {})[name] = dict(images_per_s=speeds, ms_per_batch=[1e3 * s for s in seconds],
                                                saturates_at=saturating_batch(batches, speeds))
    return batches, modes


def _training_table(training: dict) -> tuple[list[int], dict]:
    """name -> images/s, ms per step and peak memory at each measured batch, and the saturating batch."""
    batches = sorted(training)
    models = {}
    for name in TRAINED if batches else ():
        rows = [training[b][name] for b in batches]
        speeds = [row["images_per_s"] for row in rows]
        models[name] = dict(images_per_s=speeds, ms_per_step=[row["ms_per_step"] for row in rows],
                            peak_memory_mib=[row["peak_memory_mib"] for row in rows],
                            saturates_at=saturating_batch(batches, speeds))
    return batches, models


def collect_sweep(inference: dict, training: dict, stopped: dict | None) -> dict:
    """The JSON layout: per mode and candidate, lists aligned with ``batches``; ratios at saturation."""
    batches, modes = _inference_table(inference)
    train_batches, trained = _training_table(training)
    ratios: dict[str, dict] = {}
    for mode, models in modes.items():
        ours = models["asmlp_min"]["images_per_s"]
        ratios[mode] = {name: ratio_at_saturation(batches, ours, m["images_per_s"])
                        for name, m in models.items() if name != "asmlp_min"}
    if trained:
        ours, theirs = (trained[name] for name in TRAINED)
        speed = ratio_at_saturation(train_batches, ours["images_per_s"], theirs["images_per_s"])
        i = train_batches.index(speed["at_batch"])
        memory = ours["peak_memory_mib"][i] / theirs["peak_memory_mib"][i]
        ratios["training"] = dict(images_per_s=speed, peak_memory_mib=dict(at_batch=speed["at_batch"], ratio=memory))
    compile_seconds = {name: sum(_beyond_a_call(inference[b][("compiled", name)]) for b in batches)
                       for name in modes.get("compiled", {})}
    return dict(batches=batches, inference=modes, compile_seconds=compile_seconds,
                training=dict(batches=train_batches, models=trained), ratios=ratios, stopped=stopped)


def sweep_targets(ratios: dict) -> dict:
    """Issue 20's targets that this sweep measured, with the ratio and whether each is met."""
    targets = {}
    for text, ((group, name), threshold, kind) in SWEEP_TARGETS.items():
        if name in ratios.get(group, {}):
            r = ratios[group][name]
            met = r["ratio"] >= threshold if kind == "min" else r["ratio"] <= threshold
            targets[text] = dict(value=r["ratio"], at_batch=r["at_batch"], met=met)
    return targets


# ---------------------------------------------------------------- output

def _speed(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _saturation(batches: list[int], at: int) -> str:
    return f"{at} (still rising?)" if at == batches[-1] and len(batches) > 1 else str(at)


def _ratio_line(ratios: dict) -> str:
    return "; ".join(f"asmlp_min / {name}: {r['ratio']:.2f}x at batch {r['at_batch']}" for name, r in ratios.items())


def _header(results: dict) -> list[str]:
    s, sweep = results["settings"], results["sweep"]
    load = results.get("loadavg_before")
    first = min(s["batches"] + s["train_batches"])
    return [
        f"## asmlp-min bench --batches: {s['model']} at {s['image_size']}x{s['image_size']} on {s['device']}"
        f" ({results['device_name']})",
        "",
        f"torch {results['torch']}, {results['threads']} threads ({results['cpu_count']} CPUs), "
        f"{'fp16 autocast' if s['amp'] else 'fp32'}; at each batch every candidate"
        + (", eager and compiled," if s["compile"] else "") + " timed in "
        f"turns; median of {s['repeats']} rounds after {s['warmup']} warm-up rounds at batch {first}, "
        f"proportionally fewer at larger batches (at least {MIN_ROUNDS})"
        + (f"; load average {load[0]:.2f} before, {results['loadavg_after'][0]:.2f} after" if load else "")
        + f"; {results['seconds']:.0f} s in all." + shift_path(results),
        "",
        f"*Saturates at*: the smallest batch whose images/s is within {SATURATION_TOLERANCE:.0%} of the model's "
        "best over the sweep (\"still rising?\" when that is the largest batch measured). A ratio is taken at the "
        "first batch where both models are saturated.",
    ] + ([] if sweep["stopped"] is None else
         ["", f"**Stopped before batch {sweep['stopped']['before_batch']}**: {sweep['stopped']['reason']}."])


def _inference_lines(sweep: dict, label: str) -> list[str]:
    batches, lines = sweep["batches"], []
    for mode, models in sweep["inference"].items():
        how = "eager" if mode == "eager" else f"each model through {label}"
        lines += ["", f"### Inference, {how}: images/s, eval, no autograd", "",
                  "| model | " + " | ".join(f"batch {b}" for b in batches) + " | saturates at |",
                  "|---|" + "---|" * (len(batches) + 1)]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(map(_speed, m["images_per_s"]))
                         + f" | {_saturation(batches, m['saturates_at'])} |")
        lines += ["", _ratio_line(sweep["ratios"][mode])]
    if sweep["compile_seconds"]:
        took = ", ".join(f"{name} {s:.0f} s" for name, s in sweep["compile_seconds"].items())
        lines += ["", f"torch.compile, once per model with the batch dimension dynamic: {took} (the first calls "
                      "beyond a timed call; not in any timing)."]
    return lines


def _training_lines(sweep: dict) -> list[str]:
    training = sweep["training"]
    batches = training["batches"]
    if not batches:
        return []
    lines = ["", "### Training step (forward, cross-entropy, backward, SGD update): images/s / peak memory MiB", "",
             "| model | " + " | ".join(f"batch {b}" for b in batches) + " | saturates at |",
             "|---|" + "---|" * (len(batches) + 1)]
    for name, m in training["models"].items():
        cells = [f"{_speed(v)} / {mib:.0f}" for v, mib in zip(m["images_per_s"], m["peak_memory_mib"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_saturation(batches, m['saturates_at'])} |")
    speed, memory = sweep["ratios"]["training"]["images_per_s"], sweep["ratios"]["training"]["peak_memory_mib"]
    return lines + ["", f"asmlp_min / official configuration: {speed['ratio']:.2f}x images/s and "
                        f"{memory['ratio']:.2f}x peak memory at batch {speed['at_batch']}"]


def format_sweep_table(results: dict) -> str:
    """Markdown: settings, one images/s table per mode (rows models, columns batches) with the saturating batch and
    the ratios, the training table, and issue 20's targets."""
    sweep = results["sweep"]
    lines = (_header(results) + _inference_lines(sweep, compile_label(results["settings"]))
             + _training_lines(sweep))
    if results["targets"]:
        lines += ["", "### Targets (issue 20, stated for the GPU in fp16)", "",
                  "| target | measured | at batch | met |", "|---|---|---|---|"]
        lines += [f"| {text} | {t['value']:.2f} | {t['at_batch']} | {'yes' if t['met'] else 'no'} |"
                  for text, t in results["targets"].items()]
    return "\n".join(lines)
