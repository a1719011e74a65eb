"""The measurements of ``asmlp-min bench``'s default tables, and the instruments they use (time in turns, peak
memory, page faults).

What is measured for AS-MLP-T at 224x224 (CPU: fp32, inference batch 16, training batch 8;
CUDA: batch 64 with fp16 autocast):

* shift: the model's shift (:func:`~asmlp_min.fast.axial_shift`) vs the paper's Algorithm 1 (pad, chunk, roll,
  cat, narrow) vs ``clone()`` (the memory-copy floor) at the four stage shapes, in the layout the model runs in.
* inference: images/s in eval mode without autograd: asmlp_min vs the *official configuration* (the same
  weights run the way the official code runs them: NCHW tensors, ``nn.Conv2d`` 1x1 convs, Algorithm 1)
  vs ``torchvision.models.swin_t`` and ``convnext_tiny``. A square fp32 matmul is timed in the same rounds:
  achieved GFLOP/s (2 x GMACs x images/s) over its GFLOP/s is how close a model gets to the hardware. On CPU,
  the page faults of one more call of each model show what allocating fresh memory costs it.
* training: images/s of one SGD step (forward, cross-entropy, backward, update) and its peak memory, for
  asmlp_min vs the official configuration.
"""
from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .. import fast
from ..backbone import ASMLP, MODEL_CONFIGS, create_model
from ..complexity import count_gmacs, stage_resolutions
from ..runtime import freed_memory_kept
from ..shift import reference_shift
from .official import official_configuration
from .report import summarise
from .settings import BenchSettings


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
            "asmlp_min_w": lambda: fast.axial_shift(x, shift_size, -1),
            "asmlp_min_h": lambda: fast.axial_shift(x, shift_size, -2),
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


def compiled(model: nn.Module, settings: BenchSettings) -> nn.Module:
    """``torch.compile(model)`` with the run's backend and mode: the one call every compiled candidate goes through."""
    mode = {} if settings.compile_mode == "default" else dict(mode=settings.compile_mode)
    return torch.compile(model, backend=settings.compile_backend, **mode)


def measure_inference(settings: BenchSettings, ours: ASMLP, official: ASMLP,
                      progress: tqdm | None = None) -> dict:
    """Images/s of each model (eval, no autograd) and of a square matmul, timed in the same rounds."""
    device = settings.device
    models = {"asmlp_min": ours, "official configuration": official}
    models.update({name: _peer(name).to(device) for name in settings.peers})
    if settings.compile:  # every candidate compiled the same way, beside its eager self
        models.update({f"{name} + torch.compile": compiled(model, settings) for name, model in list(models.items())})
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


# ---------------------------------------------------------------- one run, and the machine it ran on

def build_models(settings: BenchSettings) -> tuple[ASMLP, ASMLP]:
    """asmlp_min (seed 0, eval mode, on the device) and its official configuration with the same weights."""
    torch.manual_seed(0)
    ours = create_model(settings.model, **settings.model_kwargs).to(settings.device).eval()
    return ours, official_configuration(ours)


def run_bench(settings: BenchSettings, progress: bool = True) -> dict:
    """Every measurement of one run, as a JSON-ready dict (see :func:`.report.format_table` for the layout)."""
    ours, official = build_models(settings)
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
    """The 1, 5 and 15-minute load averages; None where the system keeps none (Windows has no os.getloadavg)."""
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
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
                freed_memory_kept=freed_memory_kept(), cuda_shift=_cuda_shift(settings.device))


def _cuda_shift(device: str) -> str | None:
    """How asmlp_min's zero-padded shift runs in eager CUDA mode (a Triton A/B sets ``fast.triton = None``)."""
    if device != "cuda":
        return None
    if fast.triton is None:
        return "torch slice copies (no Triton)"
    return "one Triton kernel" if fast._kernel["works"] is not False else "torch slice copies (Triton failed to build)"
