"""``asmlp-min bench``: speed and memory of asmlp_min beside the official configuration and torchvision peers.

Every figure comes from one run, and the candidates of each table are timed in turns (one call of each, then
the next round), so a busy neighbour slows them all alike and the *ratios* stay meaningful on a shared
machine. A time is the median over ``repeats`` rounds after ``warmup`` untimed rounds.

What is measured for AS-MLP-T at 224x224 (CPU: fp32, inference batch 16, training batch 8;
CUDA: batch 64 with fp16 autocast):

* shift: :func:`~asmlp_min.shift.axial_shift` vs the paper's Algorithm 1 (pad, chunk, roll, cat, narrow)
  vs ``clone()`` (the memory-copy floor) at the four stage shapes, in the layout the model runs in.
* inference: images/s in eval mode without autograd: asmlp_min vs the *official configuration* (the same
  weights run the way the official code runs them: NCHW tensors, ``nn.Conv2d`` 1x1 convs, Algorithm 1)
  vs ``torchvision.models.swin_t`` and ``convnext_tiny``. A square fp32 matmul is timed in the same rounds:
  achieved GFLOP/s (2 x GMACs x images/s) over its GFLOP/s is how close a model gets to the hardware. On CPU,
  the page faults of one more call of each model show what allocating fresh memory costs it.
* training: images/s of one SGD step (forward, cross-entropy, backward, update) and its peak memory, for
  asmlp_min vs the official configuration.

``--compile`` adds every candidate through the same ``torch.compile`` call; ``--batches`` replaces these tables
with a batch sweep (:mod:`asmlp_min.bench_sweep`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .backbone import ASMLP, MODEL_CONFIGS, ASMLPStage, PatchMerging, create_model, pad_to_multiple
from .block import ASMLPBlock, AxialShiftMix
from .fast import GELU, Conv1x1, GroupNorm1, enable
from .checkpoint import atomic_write
from .complexity import count_gmacs, stage_resolutions
from .runtime import freed_memory_kept, keep_freed_memory
from .shift import axial_shift, reference_shift

# The targets (issue 7): name -> (json path of the ratio, threshold, "min" = ratio must be >= threshold).
TARGETS = {
    "shift <= 1.3x clone at every stage": ("shift_vs_clone_worst", 1.3, "max"),
    "shift >= 4x faster than Algorithm 1 at every stage": ("shift_speedup_worst", 4.0, "min"),
    "inference >= 1.5x official configuration": ("inference_vs_official", 1.5, "min"),
    "inference >= 1.4x swin_t": ("inference_vs_swin_t", 1.4, "min"),
    "inference >= convnext_tiny": ("inference_vs_convnext_tiny", 1.0, "min"),
    "inference >= 85% of matmul GFLOP/s": ("matmul_fraction", 0.85, "min"),
    "training step >= 1.3x official configuration": ("training_vs_official", 1.3, "min"),
    "training peak memory <= official configuration": ("training_memory_vs_official", 1.0, "max"),
}


@dataclass(frozen=True)
class BenchSettings:
    """What one ``asmlp-min bench`` run measures; :func:`settings_for` gives the defaults per device."""
    device: str = "cpu"
    model: str = "asmlp_tiny"
    model_kwargs: dict = field(default_factory=dict)  # create_model overrides (tests use tiny widths)
    image_size: int = 224
    batch: int = 16            # inference and shift tensors
    train_batch: int = 8
    amp: bool = False          # fp16 autocast (CUDA)
    warmup: int = 2
    repeats: int = 10
    shift_repeats: int = 30
    matmul_size: int = 2048
    peers: tuple[str, ...] = ("swin_t", "convnext_tiny")
    compile: bool = False      # also time every candidate through torch.compile; never part of the default path
    compile_backend: str = "inductor"  # torch.compile's default; tests pass "eager" to skip code generation
    batches: tuple[int, ...] = ()        # a sweep (bench_sweep.py) instead of the default tables
    train_batches: tuple[int, ...] = ()  # the sweep's training-step batches
    max_seconds: float | None = None     # the sweep's time guard


def settings_for(device: str = "cpu", quick: bool = False, **overrides) -> BenchSettings:
    """CPU: fp32, batch 16 (training 8). CUDA: batch 64 with fp16 autocast, as the paper's throughput protocol.
    ``quick`` trims warm-up and repeats so the whole run takes well under a minute on 2 CPU cores."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    values = dict(device=device)
    if device == "cuda":
        # a GPU idles at a low clock: more warm-up rounds (each is milliseconds) let it reach its working clock
        values.update(batch=64, train_batch=64, amp=True, matmul_size=8192, warmup=10, repeats=20)
    if quick:
        values.update(warmup=1, repeats=3, shift_repeats=10)
    values.update(overrides)
    settings = BenchSettings(**values)
    if settings.model not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {settings.model!r}; choose from {sorted(MODEL_CONFIGS)}")
    sizes = (settings.batch, settings.train_batch, settings.image_size, settings.repeats, settings.shift_repeats,
             *settings.batches, *settings.train_batches)
    if min(sizes) < 1 or settings.warmup < 0:
        raise ValueError("batch sizes, image size and repeats must be >= 1 and warmup >= 0, got batch "
                         f"{settings.batch}, train batch {settings.train_batch}, image size {settings.image_size}, "
                         f"repeats {settings.repeats}/{settings.shift_repeats}, warmup {settings.warmup}, "
                         f"sweep batches {settings.batches}, sweep training batches {settings.train_batches}")
    if settings.max_seconds is not None and (not settings.batches or settings.max_seconds <= 0):
        raise ValueError(f"max_seconds (--max-seconds) must be > 0 and limits a sweep (--batches), got "
                         f"{settings.max_seconds} with batches {settings.batches}")
    return settings


# ---------------------------------------------------------------- the official configuration
# Twins of our modules with the same parameters, whose forward is the official code's: NCHW tensors (no
# channels_last conversion at the stem), nn.Conv2d 1x1 convs, nn.GroupNorm, nn.GELU, the Algorithm 1 shift, a
# concatenating merge, and the whole batch through every stage (ours cuts it into pieces during CPU inference).

class OfficialAxialShiftMix(AxialShiftMix):
    def shift(self, z: Tensor, dim: int) -> Tensor:
        return reference_shift(z, self.shift_size, dim)

    def forward(self, x: Tensor) -> Tensor:
        z = self.actn(self.norm1(self.conv1(x)))
        z_lr = self.actn(self.conv2_1(self.shift(z, -1)))
        if self.connection == "parallel":
            return self.conv3(self.norm2(z_lr + self.actn(self.conv2_2(self.shift(z, -2)))))
        return self.conv3(self.norm2(self.actn(self.conv2_2(self.shift(z_lr, -2)))))


class OfficialASMLPStage(ASMLPStage):
    """The stage's own blocks and merge (official_configuration works on a copy, and _swap_in_twins then puts in
    their twins), run on the whole batch at once."""

    def __init__(self, stage: ASMLPStage):
        nn.Module.__init__(self)  # not ASMLPStage.__init__: the blocks exist already
        self.blocks, self.downsample = stage.blocks, stage.downsample

    def forward_blocks(self, x: Tensor) -> Tensor:
        return self.run_blocks(x)  # the whole batch at once


class OfficialPatchMerging(PatchMerging):
    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(x, 2)
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return self.reduction(self.norm(x))


def _official_twin(module: nn.Module) -> nn.Module | None:
    """The official-style replacement of one of our modules (same parameters), or None to keep it."""
    if isinstance(module, AxialShiftMix) and not isinstance(module, OfficialAxialShiftMix):
        if module.dilation != 1 or module.padding != "zeros":
            raise ValueError("the official code has no dilation and only zero padding: build the model with the "
                             "default shift options to compare it with the official configuration")
        return OfficialAxialShiftMix(module.conv1.in_channels, module.shift_size, connection=module.connection,
                                     bias=module.conv1.bias is not None)
    if isinstance(module, ASMLPStage) and not isinstance(module, OfficialASMLPStage):
        return OfficialASMLPStage(module)
    if isinstance(module, PatchMerging) and not isinstance(module, OfficialPatchMerging):
        return OfficialPatchMerging(module.reduction.in_channels // 4)
    if isinstance(module, GroupNorm1):
        return nn.GroupNorm(1, module.num_channels, module.eps)
    if isinstance(module, Conv1x1):
        return nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
    if isinstance(module, GELU):
        return nn.GELU()
    return None


def official_configuration(model: ASMLP) -> ASMLP:
    """A copy of ``model`` with the same weights, run the way the official code runs it (see the twins above).
    The speed and memory baseline of ``asmlp-min bench``; its outputs equal ours up to float rounding."""
    official = copy.deepcopy(model)
    enable(official, False)  # the reference modules: NCHW, nn.Conv2d, nn.GroupNorm, nn.GELU
    _swap_in_twins(official, next(model.parameters()).device)
    return official


def _swap_in_twins(parent: nn.Module, device: torch.device) -> None:
    for name, child in list(parent.named_children()):
        twin = _official_twin(child)
        if twin is not None:
            twin.load_state_dict(child.state_dict())
            child = twin.to(device).train(child.training)
            setattr(parent, name, child)
        _swap_in_twins(child, device)  # also reaches the modules inside a new twin


# ---------------------------------------------------------------- timing and memory

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def page_faults(fn: Callable[[], object]) -> int | None:
    """Minor page faults of this process during one call of ``fn``: fresh pages the kernel maps and zero-fills,
    which is what allocating a large tensor anew costs. None where the platform does not count them (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def time_in_turns(candidates: dict[Hashable, Callable[[], object]], warmup: int, repeats: int, device: str = "cpu",
                  progress: tqdm | None = None) -> dict[Hashable, list[float]]:
    """Seconds per call of each candidate, measured round-robin: every round calls each candidate once."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
            if progress is not None:
                progress.update()
    return times


@contextlib.contextmanager
def _native_stderr_silenced():
    """The CPU profiler's tracing library prints start/stop and 'no GPU' lines straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Most bytes held at once by tensors allocated while ``fn`` runs (tensors alive before it are not counted).

    CUDA: the caching allocator's peak. CPU: PyTorch keeps no allocator statistics, so the profiler records
    every CPU allocation and free with its size and time; the peak of their running sum is the answer.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with _native_stderr_silenced():
        events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------- the measurements

def stage_shapes(settings: BenchSettings) -> list[tuple[int, int, int, int]]:
    """(b, c, h, w) entering the shifts of each stage, e.g. (16, 96, 56, 56) ... (16, 768, 7, 7) for AS-MLP-T."""
    cfg = MODEL_CONFIGS[settings.model]
    depths = settings.model_kwargs.get("depths", cfg.depths)
    embed_dim = settings.model_kwargs.get("embed_dim", cfg.embed_dim)
    sizes = stage_resolutions(settings.image_size, len(depths), cfg.patch_size)
    return [(settings.batch, embed_dim * 2 ** i, h, w) for i, (h, w) in enumerate(sizes)]


def measure_shift(settings: BenchSettings, progress: tqdm | None = None) -> list[dict]:
    """Per stage: ms of asmlp_min's shift (along w and h), of Algorithm 1 and of clone(), on one tensor."""
    shift_size = settings.model_kwargs.get("shift_size", MODEL_CONFIGS[settings.model].shift_size)
    layout = torch.channels_last if settings.device == "cpu" else torch.contiguous_format  # as the model runs
    rows = []
    for stage, shape in enumerate(stage_shapes(settings)):
        x = torch.randn(shape, device=settings.device).contiguous(memory_format=layout)
        candidates = {
            "clone": x.clone,
            "asmlp_min_w": lambda: axial_shift(x, shift_size, -1),
            "asmlp_min_h": lambda: axial_shift(x, shift_size, -2),
            "algorithm1_w": lambda: reference_shift(x, shift_size, -1),
            "algorithm1_h": lambda: reference_shift(x, shift_size, -2),
        }
        with torch.no_grad():
            times = time_in_turns(candidates, settings.warmup, settings.shift_repeats, settings.device, progress)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        ours = max(ms["asmlp_min_w"], ms["asmlp_min_h"])
        rows.append(dict(stage=stage, shape=list(shape), memory_format=str(layout).split(".")[-1], ms=ms,
                         vs_clone=ours / ms["clone"],
                         speedup_vs_algorithm1=min(ms["algorithm1_w"] / ms["asmlp_min_w"],
                                                   ms["algorithm1_h"] / ms["asmlp_min_h"])))
    return rows


def _peer(name: str) -> nn.Module:
    import torchvision
    return getattr(torchvision.models, name)(weights=None)


def _autocast(settings: BenchSettings):
    if settings.amp:
        return torch.autocast(device_type=settings.device, dtype=torch.float16)
    return contextlib.nullcontext()


def measure_inference(settings: BenchSettings, ours: ASMLP, official: ASMLP,
                      progress: tqdm | None = None) -> dict:
    """Images/s of each model (eval, no autograd) and of a square matmul, timed in the same rounds."""
    device = settings.device
    models = {"asmlp_min": ours, "official configuration": official}
    models.update({name: _peer(name).to(device) for name in settings.peers})
    if settings.compile:  # every candidate compiled the same way, beside its eager self
        models.update({f"{name} + torch.compile": torch.compile(model, backend=settings.compile_backend)
                       for name, model in list(models.items())})
    for model in models.values():
        model.eval()
    images = torch.randn(settings.batch, 3, settings.image_size, settings.image_size, device=device)
    n = settings.matmul_size
    mm_dtype = torch.float16 if settings.amp else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=mm_dtype) for _ in range(2))
    gmacs = {name: count_gmacs(getattr(model, "_orig_mod", model), (3, settings.image_size, settings.image_size))
             for name, model in models.items()}

    def forward(model: nn.Module) -> Callable[[], Tensor]:
        return lambda: model(images)

    candidates = {name: forward(model) for name, model in models.items()}
    candidates["matmul"] = lambda: torch.mm(a, b)
    compile_s = {}
    with torch.no_grad(), _autocast(settings):
        for name in [name for name in models if name.endswith(" + torch.compile")]:
            start = time.perf_counter()
            candidates[name]()  # the first call compiles; not part of any timing
            compile_s[name.removesuffix(" + torch.compile")] = time.perf_counter() - start
        times = time_in_turns(candidates, settings.warmup, settings.repeats, device, progress)
        faults = {name: page_faults(candidates[name]) if device == "cpu" else None for name in models}
    seconds = {name: statistics.median(t) for name, t in times.items()}
    matmul_gflops = 2 * n ** 3 / seconds.pop("matmul") / 1e9
    result = dict(batch=settings.batch, matmul=dict(n=n, dtype=str(mm_dtype).split(".")[-1], gflops=matmul_gflops),
                  models={}, compile_seconds=compile_s)
    for name, s in seconds.items():
        images_per_s = settings.batch / s
        gflops = 2 * gmacs[name] * images_per_s
        result["models"][name] = dict(ms_per_batch=1e3 * s, images_per_s=images_per_s, gmacs=gmacs[name],
                                      gflops=gflops, matmul_fraction=gflops / matmul_gflops,
                                      page_faults=faults[name])
    return result


def measure_training(settings: BenchSettings, ours: ASMLP, official: ASMLP,
                     progress: tqdm | None = None) -> dict:
    """Images/s of one SGD step (momentum 0.9) and the step's peak memory, for the two AS-MLP configurations."""
    device = settings.device
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(settings.train_batch, 3, settings.image_size, settings.image_size, generator=generator)
    labels = torch.randint(0, ours.num_classes, (settings.train_batch,), generator=generator)
    images, labels = images.to(device), labels.to(device)
    steps = {}
    for name, model in (("asmlp_min", ours), ("official configuration", official)):
        model = copy.deepcopy(model).train()  # the update must not touch the models of the inference table
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device, enabled=settings.amp)

        def step(model=model, optimizer=optimizer, scaler=scaler) -> None:
            with _autocast(settings):
                loss = F.cross_entropy(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times = time_in_turns(steps, settings.warmup, settings.repeats, device, progress)
    result = dict(batch=settings.train_batch, models={})
    for name, step in steps.items():
        s = statistics.median(times[name])
        result["models"][name] = dict(ms_per_step=1e3 * s, images_per_s=settings.train_batch / s,
                                      peak_memory_mib=peak_memory_bytes(step, device) / 2 ** 20)
        if progress is not None:
            progress.update()
    return result


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
    for text, (key, threshold, kind) in TARGETS.items():
        if key in ratios:
            value = ratios[key]
            targets[text] = dict(value=value, met=value >= threshold if kind == "min" else value <= threshold)
    return dict(ratios=ratios, targets=targets)


def run_bench(settings: BenchSettings, progress: bool = True) -> dict:
    """Every measurement of one run, as a JSON-ready dict (see :func:`format_table` for the layout)."""
    torch.manual_seed(0)
    ours = create_model(settings.model, **settings.model_kwargs).to(settings.device).eval()
    official = official_configuration(ours)
    n_shift = len(stage_shapes(settings)) * 5 * (settings.warmup + settings.shift_repeats)
    n_models = (2 + len(settings.peers)) * (1 + settings.compile) + 1  # + the matmul
    total = n_shift + (n_models + 2) * (settings.warmup + settings.repeats) + 2
    started = time.perf_counter()
    load_before = _loadavg()
    with tqdm(total=total, desc="asmlp-min bench", file=sys.stderr, disable=None if progress else True,
              dynamic_ncols=True, leave=False) as bar:
        results = dict(shift=measure_shift(settings, bar),
                       inference=measure_inference(settings, ours, official, bar),
                       training=measure_training(settings, ours, official, bar))
    results.update(_environment(settings), loadavg_before=load_before, loadavg_after=_loadavg(),
                   seconds=time.perf_counter() - started)
    results.update(summarise(results))
    return results


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:  # not available on this platform
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        return platform.processor() or platform.machine()


def _environment(settings: BenchSettings) -> dict:
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else _cpu_name()
    return dict(settings=asdict(settings), torch=torch.__version__, device_name=device_name,
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), python=platform.python_version(),
                freed_memory_kept=freed_memory_kept())


# ---------------------------------------------------------------- output

def _inference_lines(inf: dict) -> list[str]:
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
        lines += ["", f"torch.compile (default mode) took {took} before timing (not included)."]
    return lines


def format_table(results: dict) -> str:
    """Markdown: settings, the three tables, and the targets with their measured ratios."""
    s = results["settings"]
    load = results.get("loadavg_before")
    lines = [
        f"## asmlp-min bench: {s['model']} at {s['image_size']}x{s['image_size']} on {s['device']}"
        f" ({results['device_name']})",
        "",
        f"torch {results['torch']}, {results['threads']} threads ({results['cpu_count']} CPUs), "
        f"{'fp16 autocast' if s['amp'] else 'fp32'}; median of {s['repeats']} rounds "
        f"({s['shift_repeats']} for the shift) after {s['warmup']} warm-up rounds, candidates timed in turns"
        + (f"; load average {load[0]:.2f} before, {results['loadavg_after'][0]:.2f} after" if load else "")
        + f"; {results['seconds']:.0f} s in all. "
        + ("malloc keeps freed memory for reuse (--keep-freed-memory), for every candidate alike."
           if results.get("freed_memory_kept") else "malloc at its defaults."),
        "",
        f"### Shift ({results['shift'][0]['memory_format']}), ms per call",
        "",
        "| stage | (b, c, h, w) | clone | asmlp_min w / h | Algorithm 1 w / h | asmlp_min / clone | speed-up vs Alg. 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["shift"]:
        ms = row["ms"]
        lines.append(f"| {row['stage']} | {tuple(row['shape'])} | {ms['clone']:.3f} | {ms['asmlp_min_w']:.3f} / "
                     f"{ms['asmlp_min_h']:.3f} | {ms['algorithm1_w']:.3f} / {ms['algorithm1_h']:.3f} | "
                     f"{row['vs_clone']:.2f}x | {row['speedup_vs_algorithm1']:.1f}x |")
    lines += _inference_lines(results["inference"])
    tr = results["training"]
    ours_t = tr["models"]["asmlp_min"]["images_per_s"]
    lines += [
        "",
        f"### Training step, batch {tr['batch']} (forward, cross-entropy, backward, SGD update)",
        "",
        "| model | ms / step | images/s | asmlp_min speed-up | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, m in tr["models"].items():
        lines.append(f"| {name} | {m['ms_per_step']:.0f} | {m['images_per_s']:.1f} | "
                     f"{ours_t / m['images_per_s']:.2f}x | {m['peak_memory_mib']:.0f} |")
    lines += ["", "Peak memory: the most bytes held at once by tensors allocated during one step (activations, "
                  "gradients, temporaries; weights and optimizer state excluded)"
              + (", from the profiler's CPU allocation events." if s["device"] == "cpu" else
                 ", from torch.cuda.max_memory_allocated."),
              "", "### Targets (issue 7)", "", "| target | measured | met |", "|---|---|---|"]
    for text, t in results["targets"].items():
        lines.append(f"| {text} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def write_json(results: dict, path: str | os.PathLike) -> None:
    """Write atomically (:func:`asmlp_min.checkpoint.atomic_write`): a temporary file in the same folder, then a
    rename."""
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=2)


# ---------------------------------------------------------------- command line

def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``asmlp-min bench`` on the CLI's subparsers (cli.py calls this)."""
    parser = subparsers.add_parser(
        "bench", help="speed and memory vs the official configuration, swin_t and convnext_tiny",
        description="Time the axial shift, inference and a training step of AS-MLP-T against the official "
                    "configuration (NCHW, nn.Conv2d, Algorithm 1 shift), torchvision's swin_t and convnext_tiny "
                    "and a matmul, all in one run with the candidates timed in turns. Prints a markdown table.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (fp32, batch 16, training batch 8) or cuda (batch 64, fp16 autocast); default: cpu")
    parser.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="asmlp_tiny",
                        help="AS-MLP variant to time (default: asmlp_tiny, the peers' size class)")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up round and 3 timed rounds (under a minute on 2 CPU cores; noisier)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, reported)")
    parser.add_argument("--repeats", type=int, help="timed rounds per table (default: cpu 10, cuda 20; --quick 3)")
    parser.add_argument("--batch", type=int, help="inference and shift batch (default: cpu 16, cuda 64)")
    parser.add_argument("--train-batch", type=int, help="training-step batch (default: cpu 8, cuda 64)")
    parser.add_argument("--image-size", type=int, help="square input side (default: 224)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every candidate through torch.compile (default mode), beside its eager self; "
                             "compilation takes minutes on a small CPU")
    parser.add_argument("--batches", type=_batch_list, metavar="B1,B2,...",
                        help="sweep these inference batches for every candidate (eager, and compiled with --compile), "
                             "report where each saturates, and time the training step of asmlp_min and the official "
                             "configuration at the same batches (only at --train-batch if given); replaces the default "
                             "tables (default: no sweep, the single --batch)")
    parser.add_argument("--max-seconds", type=float,
                        help="with --batches: stop before a batch that would end past this many seconds (estimated "
                             "from the previous batch); the table says where it stopped")
    parser.add_argument("--no-peers", action="store_true", help="skip torchvision's swin_t and convnext_tiny")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run every candidate with asmlp_min.keep_freed_memory() (glibc keeps freed memory for "
                             "reuse: no page faults for re-allocated activations), to see what allocation costs")
    parser.set_defaults(func=bench_command)
    return parser


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        message = f"expected comma-separated batch sizes such as 64,128,256, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if min(batches) < 1:
        raise argparse.ArgumentTypeError(f"every batch size must be >= 1, got {text!r}")
    return batches


def bench_command(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    overrides = {key: value for key in ("repeats", "batch", "train_batch", "image_size", "max_seconds")
                 if (value := getattr(args, key)) is not None}
    if args.no_peers:
        overrides["peers"] = ()
    if args.batches:
        if args.batch is not None:
            raise ValueError("--batch is the single batch of the default tables; with --batches give the sweep only")
        overrides.update(batches=args.batches, train_batches=(args.train_batch,) if args.train_batch else args.batches)
    settings = settings_for(args.device, args.quick, model=args.model, compile=args.compile, **overrides)
    if args.keep_freed_memory and not keep_freed_memory():
        raise ValueError("--keep-freed-memory needs glibc's malloc (Linux); this platform has another")
    if settings.batches:
        from . import bench_sweep  # it builds on this module
        results = bench_sweep.run_sweep(settings)
        print(bench_sweep.format_sweep_table(results))
    else:
        results = run_bench(settings)
        print(format_table(results))
    if args.json:
        write_json(results, args.json)
        print(f"\nJSON: {args.json}")
    return 0
