"""What one ``asmlp-min bench`` run measures: the model, the sizes, the rounds, the candidates, and the defaults
per device (CPU: fp32, batch 16, training batch 8; CUDA: batch 64 with fp16 autocast)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbone import model_config


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


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
    compile_mode: str = "default"      # torch.compile's mode; "reduce-overhead" replays CUDA graphs
    batches: tuple[int, ...] = ()        # a sweep (sweep.py) instead of the default tables
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
    if settings.compile_mode not in COMPILE_MODES or (settings.compile_mode != "default" and not settings.compile):
        raise ValueError(f"compile_mode (--compile-mode) must be one of {COMPILE_MODES} and applies with --compile, "
                         f"got {settings.compile_mode!r} with compile={settings.compile}")
    model_config(settings.model)  # an unknown variant: ValueError naming the known ones
    sizes = (settings.batch, settings.train_batch, settings.image_size, settings.repeats, settings.shift_repeats,
             *settings.batches, *settings.train_batches)
    if min(sizes) < 1 or settings.warmup < 0:
        raise ValueError("batch sizes, image size and repeats must be >= 1 and warmup >= 0, got (batch, train batch, "
                         f"image size, repeats, shift repeats, *sweep batches) {sizes} and warmup {settings.warmup}")
    if "convnext_tiny" in settings.peers and settings.image_size < 32:  # its 4x4 stem and three 2x2 downsamplings
        raise ValueError(f"image size (--image-size) must be >= 32 for the peer convnext_tiny, which has no padding "
                         f"to reach its stride of 32, got {settings.image_size}; or leave the peers out (--no-peers)")
    if settings.max_seconds is not None and (not settings.batches or settings.max_seconds <= 0):
        raise ValueError(f"max_seconds (--max-seconds) must be > 0 and limits a sweep (--batches), got "
                         f"{settings.max_seconds} with batches {settings.batches}")
    return settings
