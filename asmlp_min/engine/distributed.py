"""Where a process sits (rank, world size, device), seeds and generator states, and the collectives the loop uses.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA); losses and metrics are reduced over ranks; only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .config import _DEVICE


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def print_line(*values, file=None) -> None:
    """``print(*values, file=file)`` in one write. torchrun starts ``python -u``, where print writes the text and
    the newline separately, so two processes' lines could run into one."""
    (file or sys.stdout).write(" ".join(map(str, values)) + "\n")


def resolve_device(device: str = "auto") -> torch.device:
    """The device ``--device`` names (auto, cpu, cuda or cuda:N; auto is cuda when a GPU is visible), refused with
    what to pass instead when this machine does not have it."""
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (N a GPU index), got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= (count := torch.cuda.device_count()):
        raise ValueError(f"--device {device} was asked for but this machine has {count} GPU(s), cuda:0 to "
                         f"cuda:{count - 1}; use one of those, or --device cuda")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU and where torch has no
    NCCL, as on Windows); pick the device."""
    resolved = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(0, 1, resolved)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" and dist.is_nccl_available() else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class PeerStopped(RuntimeError):
    """Another process of a torchrun job ended (crash, out of memory, killed), so this one's collectives fail."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a gloo or NCCL collective whose peer went away, not from this process's own code."""
    # torch raises backend errors such as NCCL's as DistError subclasses (DistBackendError); gloo's peer loss as a
    # plain RuntimeError "[.../gloo/transport/tcp/pair.cc] Read error ...: Connection reset by peer"
    return isinstance(err, dist.DistError) or any(word in str(err) for word in ("gloo", "NCCL", "Connection "))


@contextlib.contextmanager
def peer_failures_explained(env: DistEnv, what_now: Callable[[], str]):
    """Under torchrun, a process that dies breaks the others' next collective with gloo's or NCCL's traceback:
    raise :class:`PeerStopped` instead, saying that another process stopped, then ``what_now()`` (the checkpoint)."""
    try:
        yield
    except RuntimeError as err:
        if not (env.distributed and is_collective_failure(err)) or isinstance(err, PeerStopped):
            raise
        cause = " ".join(str(err).split())[:200]
        raise PeerStopped(f"another process of this run stopped, so process {env.rank} cannot go on ({cause}); "
                          f"that process's own output says why. {what_now()}") from None


def run_on_main(env: DistEnv, action: Callable[[], None]) -> None:
    """``action()`` on rank 0, and every rank learns whether it failed: rank 0 raises its error, the others
    :class:`PeerStopped` quoting it, rather than waiting in a collective that rank 0 never joins and ending in gloo's
    or NCCL's traceback."""
    error = None
    if env.is_main:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - raised again below, after the others have heard of it
            error = err
    said = _broadcast_object(None if error is None else str(error), env)
    if error is not None:
        raise error
    if said is not None:
        raise PeerStopped(f"process 0 could not start the run, so process {env.rank} stops too: {said}")


def wrap_distributed(model: nn.Module, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    """(model, the module training calls): DistributedDataParallel over the ranks, the heads' BatchNorms made
    SyncBatchNorm on CUDA (PyTorch has none for the CPU: on gloo each process keeps its own statistics); with one
    process the plain model, twice."""
    if not env.distributed:
        return model, model
    cuda = env.device.type == "cuda"
    if cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None)


def _all_reduce_sum(values: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        values = values.to(env.device)
        dist.all_reduce(values)
    return values.cpu()


def _gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def rng_state(env: DistEnv) -> dict[str, Tensor]:
    """Every rank's torch generator state, stacked (world_size, n) uint8, so each rank resumes its own stream."""
    states = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(env.device)
    return {name: torch.stack([s.cpu() for s in _gather_objects(state, env)]) for name, state in states.items()}


def set_rng_state(states: dict[str, Tensor], env: DistEnv) -> None:
    """This rank's row of :func:`rng_state`, copied: torch 2.14 crashes (SIGSEGV) on a state tensor with a storage
    offset, which every row but the first has."""
    torch.set_rng_state(states["cpu"][env.rank].clone())
    if "cuda" in states and env.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][env.rank].clone(), env.device)


def _broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _autocast(device: torch.device, enabled: bool):
    """bfloat16 on CPU, float16 on CUDA (paired with a GradScaler); a no-op when not enabled."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


_sigterm_held: list[bool] = []  # stop_requests turned SIGTERM off after PeerStopped


def sigterm_back_on() -> None:
    """SIGTERM ends the process again, if :func:`stop_requests` turned it off."""
    if _sigterm_held and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _sigterm_held.clear()


@contextlib.contextmanager
def stop_requests(on_signal: Callable[[int], None]):
    """While the block runs, SIGINT and SIGTERM call ``on_signal(signum)`` instead of ending the process (the loop
    stops at its next safe point); a second Ctrl-C aborts at once. Outside the main thread signals cannot be
    caught, and nothing changes.

    When the block ends with :class:`PeerStopped`, SIGTERM stays off (ignored where it would have ended the process):
    torchrun sends it to the others as soon as one process dies, and this process has yet to say why it stops.
    :func:`sigterm_back_on` undoes that once it has (``cli.main``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        on_signal(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except PeerStopped:
        if previous[signal.SIGTERM] == signal.SIG_DFL:
            previous[signal.SIGTERM] = signal.SIG_IGN
            _sigterm_held.append(True)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def leave_ctrl_c_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``. A terminal's Ctrl-C reaches every process of the group. A forked
    worker would run the main process's stop handler (printing its message again) and die on a second Ctrl-C; the
    main process stops the run at a safe point and ends its workers itself. SIGTERM ends a worker at once again,
    as the DataLoader's shutdown expects."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def ctrl_c_held(start_method: str = "fork"):
    """SIGINT blocked in this thread while the block runs, and delivered when it ends. DataLoader workers started
    inside inherit the block until :func:`leave_ctrl_c_to_the_main_process` ignores Ctrl-C: a spawned worker (macOS;
    forkserver on Linux) takes seconds to import torch and get there, and a Ctrl-C meanwhile killed it, which the
    run then reported as a worker death. Where signals cannot be blocked (Windows) nothing changes.

    For ``start_method`` spawn and forkserver, Python's resource tracker is started first: started beside the first
    worker, it would unblock SIGINT after itself (it holds the signal the same way while it starts, bpo-33613)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    if start_method != "fork":
        from multiprocessing import resource_tracker
        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def process_group_closed_at_exit():
    """Destroy the torch.distributed process group, if one is up, when the block ends. After a block that finished
    on every process, a barrier first: PyTorch 2.11's gloo process group deadlocked at exit (its worker thread
    waited for the GIL to free the last collective's Python-made tensors while the main thread, holding the GIL,
    waited for that thread); after a barrier the last collective holds none. After an error the other processes
    may never reach a barrier, so there is none."""
    finished = False
    try:
        yield
        finished = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
