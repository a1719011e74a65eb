"""The training loop: one :class:`Trainer` for classification, detection and segmentation.

    config -> seed -> data (shapes or a folder) -> model (cls / det / seg) -> AdamW + warm-up schedule
      -> epochs of: per-iteration lr, autocast, backward (accumulated), clip, step
         -> evaluate -> metrics.jsonl + curves.png + checkpoint.pt (atomic)

Reproducibility. All randomness is torch's global generator (dropout, drop path, augmentation, mixup) plus a
per-epoch seeded data order (``DistributedSampler(seed, epoch)``, used with one process too). A checkpoint holds
every rank's generator state and how many batches of the current epoch are done, so ``--resume`` continues
bit-for-bit on CPU, from an epoch boundary or from a Ctrl-C mid-epoch.

Distributed. Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
nccl on CUDA), each rank reads its own share of the same permutation, so N processes of batch b see exactly the
batches one process of batch N*b would. Losses and metrics are reduced over ranks; only rank 0 writes files.
BatchNorm in the heads becomes SyncBatchNorm on CUDA (PyTorch has no CPU SyncBatchNorm; on gloo each process keeps
its own statistics).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from ..checkpoint import non_finite_keys, save_checkpoint, shown_keys
from ..files import shell_word
from .config import TrainConfig
from .data import DataError, TaskData, _loaded, _loader, build_data
from .distributed import (DistEnv, _all_reduce_sum, _autocast, init_distributed, peer_failures_explained, rng_state,
                          print_line, run_on_main, seed_everything, set_rng_state, stop_requests, wrap_distributed)
from .inference import _progress, evaluate
from .optim import build_optimizer
from .runs import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, _check_compatible, _check_label_set, _check_task, _damaged,
                   _read_engine_checkpoint, check_resume_state, claim_run_folder, format_record,
                   new_folders_removed_on_failure, restore_state, run_folder_lock, stopped_writing, write_metrics)
from .tasks import build_model, class_weights, make_task, refuse_unlabelled_masks


class NonFiniteLossError(RuntimeError):
    """The loss, the validation loss or the weights became nan/inf; training stopped without writing a checkpoint."""


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`fit`; :meth:`evaluate` for one pass.

    ``model`` / ``data`` may be given instead of built (tests, notebooks); the config still describes them.
    ``resume``: a ``checkpoint.pt`` of an earlier run with the same settings, continued exactly; ``loaded``: its
    contents, when the caller has read the file already (it can be large: it holds the optimizer state).
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, data: TaskData | None = None,
                 env: DistEnv | None = None, resume: str | os.PathLike | None = None, loaded: dict | None = None,
                 log: Callable = print_line):
        cfg = config.resolved()
        checkpoint = _read_engine_checkpoint(resume, resume=True, loaded=loaded) if resume else None
        self.env = env or init_distributed(cfg.device)
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.run_dir = Path(cfg.output)
        new_folders = new_folders_removed_on_failure(self.run_dir) if self.env.is_main else contextlib.nullcontext()
        with new_folders:  # a run that fails to start leaves no empty run folder behind
            # before data and model are built: an unusable or busy folder fails at once, on every rank
            run_on_main(self.env, lambda: claim_run_folder(self.run_dir, self.log))
            self.data = data or build_data(cfg)
            self.cfg = self._settle_classes(cfg, checkpoint, resume)
            self._verified_epoch = None  # epoch of the checkpoint on disk whose weights this run checked finite
            self.task = make_task(cfg, self.data)
            self.model = self._build_model(model, resuming=checkpoint is not None)
            self._build_optimizer()
            self.epoch, self.step, self.batch_in_epoch, self.history = 0, 0, 0, []
            self.epoch_totals = torch.zeros(3, dtype=torch.float64)  # loss * images, images, seconds (this epoch)
            if checkpoint is not None:
                self._load_state(checkpoint, resume)
            self.model, self.ddp_model = wrap_distributed(self.model, self.env)
            seed_everything(cfg.seed + self.env.rank)  # per-rank streams for dropout, drop path, augmentation
            if checkpoint is not None:
                try:
                    set_rng_state(checkpoint["rng"], self.env)
                except (RuntimeError, TypeError, IndexError, KeyError, AttributeError) as err:
                    raise _damaged(resume, f"its random generator state does not load ({err})") from None
        self._signal_received = 0      # the number of the signal (Ctrl-C, SIGTERM) this rank received
        self._stopping = False         # agreed by all ranks: stop after this optimiser step
        self.stop_signal = None        # set when a signal stopped fit() before its last epoch

    # -- build steps --------------------------------------------------------------------------------

    def _settle_classes(self, cfg: TrainConfig, checkpoint: dict | None, resume) -> TrainConfig:
        """num_classes from the data (or checked against it), and a resumed run's labels and settings checked."""
        if checkpoint is not None:
            _check_task(checkpoint, cfg, resume)   # before the labels, which differ between tasks anyway
            _check_label_set(checkpoint, self.data, resume)
        if cfg.num_classes is None:
            cfg.num_classes = self.data.num_classes
        elif cfg.num_classes != self.data.num_classes:
            raise ValueError(f"num_classes={cfg.num_classes} but the data has {self.data.num_classes} classes")
        if checkpoint is not None:
            _check_compatible(checkpoint, cfg, resume)
        return cfg

    def _build_model(self, model: nn.Module | None, resuming: bool) -> nn.Module:
        cfg = self.cfg
        seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        if model is None:  # a resume overwrites every weight from its checkpoint: the start weights are not read
            model = build_model(**{**cfg.model_kwargs(), "pretrained": None if resuming else cfg.pretrained})
        report = getattr(model, "backbone_load_report", None)
        if report is not None and not resuming:  # self.log is silent on ranks other than 0
            self.log(f"--pretrained {cfg.pretrained}: {len(report.loaded)} backbone tensors loaded" + "".join(
                f", {len(keys)} {what} ({shown_keys(keys, 4)})"  # every key left out either way, so none is unseen
                for what, keys in (("new", report.missing), ("skipped", report.skipped), ("unused", report.unexpected))
                if keys))
        if cfg.task == "seg" and cfg.class_weight != "balanced":  # balanced counts the pixels itself
            refuse_unlabelled_masks(cfg, self.data.train, self.log)
        if cfg.class_weight is not None:
            model.set_class_weight(class_weights(cfg, self.data.train, self.log))
        model.to(self.env.device)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    def _build_optimizer(self) -> None:
        """Batches per epoch (whole optimiser steps on every rank), AdamW + schedule, and the AMP gradient scaler."""
        cfg, env = self.cfg, self.env
        per_rank = len(self.data.train) // env.world_size
        self.batches_per_epoch = per_rank // cfg.batch_size // cfg.accum_steps * cfg.accum_steps
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.data.train)} training images are fewer than one step of batch_size "
                             f"{cfg.batch_size} x {cfg.accum_steps} accumulation x {env.world_size} processes; "
                             "lower --batch-size or use more data")
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_steps
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.steps_per_epoch)
        use_scaler = cfg.amp and env.device.type == "cuda"  # bf16 on CPU has fp32's range: no scaling
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler)

    # -- pieces -------------------------------------------------------------------------------------

    def autocast(self):
        return _autocast(self.env.device, self.cfg.amp)

    def _train_batches(self) -> DataLoader:
        """This rank's batches of the current epoch, minus the ones a resumed run already trained on.

        Rank r of N takes every N-th index of a (seed, epoch) permutation: one step's N batches are one N-times batch.
        """
        sampler = DistributedSampler(self.data.train, self.env.world_size, self.env.rank, shuffle=True,
                                     seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        batches = list(BatchSampler(sampler, self.cfg.batch_size, drop_last=True))
        batches = batches[self.batch_in_epoch:self.batches_per_epoch]
        return _loader(self.data.train, batches, self.task.collate_fn, self.cfg.workers,
                       self.cfg.seed * 100_003 + self.epoch, self.env.device)

    def evaluate(self) -> dict:
        """One pass over the validation set, reduced over ranks (see :func:`evaluate`)."""
        return evaluate(self.model, self.cfg, self.data, self.env)

    # -- training -----------------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train from the current epoch to ``epochs`` (or ``stop_at_epoch``); returns the metrics history.

        Ctrl-C (SIGINT) or SIGTERM: finish the current optimiser step, save, return with ``stop_signal`` set (a
        second Ctrl-C aborts at once). A training sample that cannot be read stops the same way, then raises
        :class:`DataError`; so does a DataLoader worker that dies (:class:`WorkerDied`). A nan/inf loss raises
        :class:`NonFiniteLossError` before the bad update, without touching the checkpoint on disk.
        """
        last = self.cfg.stop_at_epoch or self.cfg.epochs
        if self.epoch >= last:
            self.log(f"nothing to do: the checkpoint already finished epoch {self.epoch} of {last}")
            return self.history
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = run_folder_lock(self.run_dir) if self.env.is_main else contextlib.nullcontext()  # one writer
        with lock, stop_requests(self._request_stop), peer_failures_explained(self.env, self._after_a_peer_stopped):
            while self.epoch < last:
                try:
                    self._train_epoch()
                except DataError as err:
                    raise self._stopped_by_data_error(err) from None
                if self.batch_in_epoch < self.batches_per_epoch:  # stopped mid-epoch
                    self.stop_signal = self._signal_received or signal.SIGTERM  # or another rank's signal
                    self.save()
                    self.log(f"stopped in epoch {self.epoch + 1} after {self.batch_in_epoch} of "
                             f"{self.batches_per_epoch} batches; saved {self.checkpoint_path}. "
                             f"Continue with: --resume {shell_word(self.checkpoint_path)}")
                    break
                self._end_epoch()
                if (self._stopping or self._signal_since_the_last_step()) and self.epoch < last:
                    self.stop_signal = self._signal_received or signal.SIGTERM
                    self.log(f"stopped after epoch {self.epoch}; continue with: --resume "
                             f"{shell_word(self.checkpoint_path)}")
                    break
        return self.history

    def _train_epoch(self) -> None:
        cfg, env = self.cfg, self.env
        self.model.train()
        loader = self._train_batches()
        bar = _progress((self.batches_per_epoch - self.batch_in_epoch) // cfg.accum_steps,
                        f"epoch {self.epoch + 1}/{cfg.epochs}", env)
        start, micro = time.perf_counter(), 0
        self._remember_step()
        try:
            for batch in _loaded(loader):
                batch = self.task.prepare(batch, env.device, cfg.channels_last)
                boundary = (micro + 1) % cfg.accum_steps == 0
                sync = contextlib.nullcontext() if boundary or not env.distributed else self.ddp_model.no_sync()
                with sync:
                    with self.autocast():
                        loss = self.task.loss(self.ddp_model, batch)
                    # One reduction per micro-batch carries the loss for the log, the nan check and Ctrl-C,
                    # so every rank takes the same decision at the same step.
                    n = self.task.batch_size(batch)
                    reduced = _all_reduce_sum(torch.tensor([loss.item() * n, n, float(self._signal_received)],
                                                           dtype=torch.float64), env)
                    if not math.isfinite(reduced[0].item()):
                        raise NonFiniteLossError(self._non_finite_message(reduced[0].item() / reduced[1].item()))
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                micro += 1
                self.epoch_totals[:2] += reduced[:2]
                if boundary:
                    self._optimizer_step()
                    self._remember_step()
                    self.epoch_totals[2] += time.perf_counter() - start
                    start = time.perf_counter()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self._lr():.2e}",
                                    img_s=f"{self.epoch_totals[1].item() / self.epoch_totals[2].item():.1f}")
                    if reduced[2] > 0:
                        self._stopping = True
                        break
        finally:
            bar.close()

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.batch_in_epoch += self.cfg.accum_steps

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _signal_since_the_last_step(self) -> bool:
        """A Ctrl-C during validation or the save: every rank learns of it in one reduction, and the run stops
        after this epoch rather than one step into the next."""
        return _all_reduce_sum(torch.tensor([float(self._signal_received)], dtype=torch.float64), self.env)[0] > 0

    def _end_epoch(self) -> None:
        loss_sum, images, seconds = self.epoch_totals.tolist()
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.epoch_totals.zero_()
        record = {"epoch": self.epoch, "step": self.step, "lr": self._lr(), "train_loss": loss_sum / max(images, 1),
                  "train_img_per_s": images / max(seconds, 1e-9), "train_time_s": seconds}
        if self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs:
            start = time.perf_counter()
            try:
                record.update(self.evaluate())
            except DataError as err:
                raise self._unevaluated_epoch_saved(record, err) from None
            record["eval_time_s"] = time.perf_counter() - start
            if "val_loss" in record and not math.isfinite(record["val_loss"]):
                raise NonFiniteLossError(self._non_finite_weights_message(f"the validation loss became "
                                                                          f"{record['val_loss']}"))
        self.history.append(record)
        self.save()
        self.log(format_record(record, self.cfg.epochs))
        self._write_metrics()

    def _unevaluated_epoch_saved(self, record: dict, err: DataError) -> DataError:
        """A validation image could not be read: keep the trained epoch (saved without validation metrics) rather than
        lose it; with several processes the others wait in a collective, so nothing is saved."""
        if self.env.distributed:
            return type(err)(f"{err}; stopped without saving, {self._checkpoint_on_disk()}")
        self.history.append(record)
        self.save()
        self._write_metrics()
        return type(err)(f"{err}. Saved epoch {self.epoch} without its validation in {self.checkpoint_path}; "
                         f"{err.fix}continue with --resume {shell_word(self.checkpoint_path)}")

    def _remember_step(self) -> None:
        """What the last optimiser step left (generator state, epoch totals): a save after a data error goes back to
        it, as if the run had stopped there (micro-batches after it drew random numbers and added to the totals)."""
        generators = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            generators["cuda"] = torch.cuda.get_rng_state(self.env.device)
        self._at_last_step = generators, self.epoch_totals.clone()

    def _stopped_by_data_error(self, err: DataError) -> DataError:
        """Stop as Ctrl-C does: save the state after the last optimiser step and say how to continue. With several
        processes the others wait in a collective and cannot join a save: the error ends the run (torchrun stops
        the other processes) and the checkpoint on disk is left as it was."""
        if self.env.distributed:
            return type(err)(f"{err}; stopped without saving, {self._checkpoint_on_disk()}")
        generators, self.epoch_totals = self._at_last_step
        torch.set_rng_state(generators["cpu"])
        if "cuda" in generators:
            torch.cuda.set_rng_state(generators["cuda"], self.env.device)
        self.save()
        return type(err)(f"{err}. Saved epoch {self.epoch + 1}'s progress ({self.batch_in_epoch} of "
                         f"{self.batches_per_epoch} batches) in {self.checkpoint_path}; {err.fix}continue with "
                         f"--resume {shell_word(self.checkpoint_path)}")

    def _non_finite_message(self, value: float) -> str:
        return (f"the training loss became {value} in epoch {self.epoch + 1} (step {self.step + 1}); stopped before "
                f"updating the weights; {self._checkpoint_on_disk()}. {self._advice()}")

    def _non_finite_weights_message(self, what: str) -> str:
        return (f"{what} after step {self.step} (epoch {self.epoch}); stopped without saving a checkpoint; "
                f"{self._checkpoint_on_disk()}. {self._advice()}")

    def _after_a_peer_stopped(self) -> str:
        resume = f"; once the cause is fixed, continue with --resume {shell_word(self.checkpoint_path)}"
        return self._checkpoint_on_disk() + (resume if self._verified_epoch is not None else "")

    def _checkpoint_on_disk(self) -> str:
        """Only a checkpoint whose weights this run checked (written or resumed from) is called good."""
        if self._verified_epoch is not None:
            return f"the last good checkpoint {self.checkpoint_path} (epoch {self._verified_epoch}) is unchanged"
        if self.checkpoint_path.exists():
            return f"{self.checkpoint_path}, from an earlier run and not checked by this one, is unchanged"
        return "no checkpoint had been written yet"

    def _request_stop(self, signum: int) -> None:
        """SIGINT/SIGTERM: the loop stops after this optimiser step and saves (see :func:`stop_requests`)."""
        self._signal_received = signum
        why = "Ctrl-C again to abort at once" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received"
        self.log(f"\nstopping after this step and saving a checkpoint ({why})", file=sys.stderr)

    def _advice(self) -> str:
        return (f"Try a lower --lr (now {self.cfg.lr:g}), gradient clipping (--clip-grad 1), or training "
                "without --amp.")

    # -- checkpoints and logs -----------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict:
        """Everything to continue exactly: tensors and plain containers only (read with weights_only=True)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.env),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "batches_per_epoch": self.batches_per_epoch, "train_images": len(self.data.train),
            "epoch_totals": self.epoch_totals.clone(),
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            "classes": list(self.data.classes),
            "category_ids": self.data.category_ids,
            "metrics": self.history,
        }

    def save(self) -> None:
        """Atomic write by rank 0 (every rank takes part in gathering the generator states), of finite weights
        only: nan/inf weights raise :class:`NonFiniteLossError` and leave the file on disk as it was."""
        state = self.state_dict()
        broken = non_finite_keys(state["model"])
        if broken:
            raise NonFiniteLossError(self._non_finite_weights_message(
                f"the weights became nan/inf ({len(broken)} tensors, e.g. {', '.join(broken[:3])})"))
        if self.env.is_main:
            try:
                save_checkpoint(state, self.checkpoint_path)
            except OSError as err:  # disk full, an I/O error, a disk gone read-only: the last checkpoint is intact
                resume = self.checkpoint_path if self._verified_epoch is not None else None
                raise stopped_writing(err, self.checkpoint_path, resume) from None
        self._verified_epoch = self.epoch

    def _load_state(self, checkpoint: dict, path) -> None:
        check_resume_state(checkpoint, self.model, self.cfg, self.env.world_size, self.batches_per_epoch,
                           len(self.data.train), path)
        restore_state(checkpoint, dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                       scaler=self.scaler), path)
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.batch_in_epoch, self.history = checkpoint["batch_in_epoch"], list(checkpoint["metrics"])
        self.epoch_totals = checkpoint["epoch_totals"].clone()
        self._verified_epoch = self.epoch

    def _write_metrics(self) -> None:
        if self.env.is_main:
            try:
                write_metrics(self.run_dir, self.history)
            except OSError as err:  # the checkpoint holds this epoch already; a resume rewrites both files
                raise stopped_writing(err, self.run_dir / "metrics.jsonl", self.checkpoint_path) from None
