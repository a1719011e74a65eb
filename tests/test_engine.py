"""Training engine: schedules, parameter groups, exact resume, Ctrl-C, nan stop, atomic checkpoints, AMP.

Everything runs a tiny AS-MLP (C=8, one block per stage) on a few 32-pixel shapes scenes, so a run is a
second or two on a CPU.
"""
import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import asmlp_min.checkpoint
import asmlp_min.engine.data as engine_data
import asmlp_min.engine.trainer
import asmlp_min.files
from asmlp_min.backbone import MODEL_CONFIGS, create_model
from asmlp_min.checkpoint import CheckpointError, load_checkpoint
from asmlp_min.engine.config import SIZE_FIELD
from asmlp_min.engine.data import _loaded, _worker_death_message
from asmlp_min.files import WriteError
from asmlp_min.engine import (ClassificationTask, DataError, DetectionTask, NonFiniteLossError, TaskData, TrainConfig,
                              Trainer, build_data, build_model, evaluate, load_trained, lr_factor, param_groups,
                              predict, run_folder_lock, WorkerDied)


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    size = SIZE_FIELD.get(overrides.get("task"), "image_size")    # cls image_size, det min_size, seg crop_size
    values = dict(task="cls", output=str(tmp_path / name), epochs=2, batch_size=8, train_size=32, val_size=8,
                  **{size: 32}, embed_dim=8, depths=(1, 1, 1, 1), drop_path=0.1, mixup=0.2, cutmix=1.0,
                  warmup_epochs=0.5, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


KILLED = signal.strsignal(signal.SIGKILL) if hasattr(signal, "SIGKILL") else None  # "Killed: 9" on macOS


def quiet(*args, **kwargs):
    pass


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith(("_time_s", "_per_s"))} for row in history]


# ---------------------------------------------------------------- schedule and optimiser groups

def test_lr_factor_matches_hand_computed_values():
    cos = dict(schedule="cosine", total_steps=100, min_ratio=0.1)
    assert lr_factor(0, **cos) == pytest.approx(1.0)
    assert lr_factor(50, **cos) == pytest.approx(0.1 + 0.9 * 0.5)          # cos(pi/2) = 0
    assert lr_factor(100, **cos) == pytest.approx(0.1)
    assert lr_factor(25, **cos) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)
    poly = dict(schedule="poly", total_steps=10, power=1.0)
    assert [lr_factor(t, **poly) for t in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    step = dict(schedule="step", total_steps=12, milestones=(8, 11))
    assert [lr_factor(t, **step) for t in (7, 8, 10, 11)] == pytest.approx([1, 0.1, 0.1, 0.01])
    # warm-up scales the main schedule linearly from warmup_ratio to 1 over the first W steps
    warm = dict(schedule="poly", total_steps=10, warmup_steps=4, warmup_ratio=0.2)
    assert lr_factor(0, **warm) == pytest.approx(0.2)
    assert lr_factor(2, **warm) == pytest.approx(0.8 * (0.2 + 0.8 * 0.5))
    assert lr_factor(4, **warm) == pytest.approx(0.6)


@pytest.mark.parametrize("total, warmup", [(300, 40), (30, 10), (12, 0)])
def test_cosine_with_warm_up_is_timms_cosine_lr_scheduler_as_the_official_imagenet_code_steps_it(total, warmup):
    """The official code: CosineLRScheduler(t_initial=T, lr_min, warmup_lr_init, warmup_t=W, t_in_epochs=False).
    Its warm-up is a ramp to the base lr; mmcv's rule times the cosine peaked at 0.75x the lr in a 3-epoch run."""
    from timm.scheduler import CosineLRScheduler
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    official = CosineLRScheduler(optimizer, t_initial=total, lr_min=0.01, warmup_lr_init=1e-3, warmup_t=warmup,
                                 cycle_limit=1, t_in_epochs=False)
    ours = [lr_factor(t, schedule="cosine", total_steps=total, warmup_steps=warmup, warmup_ratio=1e-3,
                      min_ratio=0.01) for t in range(total + 1)]
    assert ours == pytest.approx([official._get_lr(t)[0] for t in range(total + 1)], rel=1e-12, abs=1e-15)
    if warmup:
        assert ours[warmup - 1] == pytest.approx(1e-3 + (1 - 1e-3) * (warmup - 1) / warmup)   # by hand


def test_scheduler_follows_lr_factor_per_iteration(tmp_path):
    trainer = Trainer(tiny(tmp_path, lr=1e-3, warmup_epochs=1.0, schedule="cosine", min_lr_ratio=0.01), log=quiet)
    steps = trainer.steps_per_epoch * 2
    seen = []
    for _ in range(steps):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    want = [1e-3 * lr_factor(t, schedule="cosine", total_steps=steps, warmup_steps=trainer.steps_per_epoch,
                             warmup_ratio=1e-3, min_ratio=0.01) for t in range(steps)]
    assert seen == pytest.approx(want)


@pytest.mark.parametrize("task,want", [
    # svip-lab/AS-MLP config.py: wd 0.05, cosine, clip 5.0, warm-up lr 1e-6 and min lr 1e-5 against lr 1e-3
    ("cls", dict(weight_decay=0.05, schedule="cosine", clip_grad=5.0, warmup_ratio=1e-3, min_lr_ratio=0.01)),
    # AS-MLP-Object-Detection, schedule_1x.py: wd 0.05, step at epochs 8 and 11, warm-up ratio 0.001, no clipping
    ("det", dict(weight_decay=0.05, schedule="step", clip_grad=0.0, warmup_ratio=1e-3, min_lr_ratio=0.0)),
    # AS-MLP-Semantic-Segmentation: wd 0.01, poly power 1 to min lr 0, warm-up ratio 1e-6, no clipping
    ("seg", dict(weight_decay=0.01, schedule="poly", clip_grad=0.0, warmup_ratio=1e-6, min_lr_ratio=0.0)),
])
def test_each_task_defaults_to_its_official_recipe(task, want):
    cfg = TrainConfig(task=task).resolved()
    assert {key: getattr(cfg, key) for key in want} == want


def test_step_schedule_drops_tenfold_after_epochs_8_and_11_of_12(tmp_path):
    """mmdet's 1x: lr x0.1 from the first step of epoch 9 (after 8 epochs) and again from epoch 12."""
    trainer = Trainer(tiny(tmp_path, task="det", epochs=12, warmup_epochs=0.0, schedule="step", lr=1e-3,
                           train_size=16, batch_size=8, mixup=0.0, cutmix=0.0), log=quiet)
    per_epoch = trainer.steps_per_epoch
    seen = []
    for _ in range(12 * per_epoch):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    want = [1e-3] * (8 * per_epoch) + [1e-4] * (3 * per_epoch) + [1e-5] * per_epoch
    assert seen == pytest.approx(want)


def test_weight_decay_groups_are_the_official_ones_per_task():
    """ImageNet (timm/Swin skip list): no decay on 1-D tensors and biases. mmdet/mmseg configs: no decay on names
    with "norm" only, so conv biases and the UperNet's BatchNorms (``bn``) decay. Names picked by hand."""
    segmenter = build_model("seg", "asmlp_tiny", num_classes=3, head_channels=16, embed_dim=8, depths=(1, 1, 1, 1))
    classifier = build_model("cls", "asmlp_tiny", num_classes=3, embed_dim=8, depths=(1, 1, 1, 1))
    for model, task, exempt, decayed in [
            (classifier, "cls", ["patch_embed.proj.bias", "layers.0.blocks.0.norm1.weight", "head.bias",
                                 "layers.0.blocks.0.axial_shift.conv1.bias"],
             ["patch_embed.proj.weight", "layers.0.blocks.0.mlp.fc1.weight", "head.weight"]),
            (segmenter, "seg", ["backbone.norm0.weight", "backbone.layers.0.blocks.0.axial_shift.norm2.bias",
                                "backbone.patch_embed.norm.weight"],
             ["backbone.patch_embed.proj.bias", "backbone.layers.0.blocks.0.axial_shift.conv1.bias",
              "decode_head.bottleneck.bn.weight", "decode_head.conv_seg.bias",
              "backbone.layers.0.blocks.0.mlp.fc1.weight"]),
    ]:
        params = dict(model.named_parameters())
        decay, no_decay = ({id(p) for p in group["params"]} for group in param_groups(model, 0.05, task))
        assert all(id(params[name]) in no_decay for name in exempt), task
        assert all(id(params[name]) in decay for name in decayed), task
        assert len(decay) + len(no_decay) == len(params)


def test_the_first_optimizer_step_is_adamw_by_hand_in_one_fused_pass(tmp_path):
    """Step 1 of AdamW: m and v bias-corrected are g and g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    trainer = Trainer(tiny(tmp_path, lr=1e-3, weight_decay=0.05), log=quiet)
    optimizer = trainer.optimizer
    assert optimizer.defaults["fused"] and all(group["fused"] for group in optimizer.param_groups)
    torch.manual_seed(0)
    want = []
    for group in optimizer.param_groups:
        lr, decay = group["lr"], group["weight_decay"]
        for p in group["params"]:
            p.grad = torch.randn_like(p)
            want.append(p.detach() * (1 - lr * decay) - lr * p.grad / (p.grad.abs() + 1e-8))
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.05, 0.0}
    optimizer.step()
    got = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_no_weight_decay_on_norms_and_biases():
    model = build_model("cls", "asmlp_tiny", 3, embed_dim=8, depths=(1, 1, 1, 1))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters()
                                                         if n.endswith(".bias") or ".norm" in n or n.startswith("norm")}
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_classification_loss_smooths_labels_and_mixed_targets_as_by_hand():
    """loss = mean over images of -sum_k q_k log softmax(logits)_k with q = (1 - eps) y + eps / K, for y a label's
    one-hot vector and for the class probabilities that mixup or cutmix hand over."""
    logits, labels, eps = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2]), 0.1
    task = ClassificationTask(TrainConfig(label_smoothing=eps, mixup=0.2).resolved(), TaskData(None, None, 4))
    mixed = 0.7 * F.one_hot(labels, 4) + 0.3 * F.one_hot(labels.roll(1), 4)
    task.mix = lambda images, targets: (images, mixed)                     # a fixed mix instead of a random one
    for y, mix in [(F.one_hot(labels, 4).float(), None), (mixed, task.mix)]:
        task.mix = mix
        q = (1 - eps) * y + eps / 4
        want = -(q * logits.log_softmax(-1)).sum(-1).mean()
        assert torch.allclose(task.loss(lambda images: logits, (torch.zeros(5, 3, 8, 8), labels)), want)


# ---------------------------------------------------------------- resume, Ctrl-C, nan, atomic writes

def test_resume_continues_bit_for_bit(tmp_path):
    """2 epochs straight == 1 epoch, a new process state from the checkpoint, 1 more epoch (with drop path,
    flips, mixup and cutmix all drawing random numbers)."""
    straight = Trainer(tiny(tmp_path, "straight"), log=quiet)
    straight.fit()
    Trainer(tiny(tmp_path, "split", stop_at_epoch=1), log=quiet).fit()
    first = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert first["epoch"] == 1 and len(first["metrics"]) == 1
    torch.manual_seed(1234)                                    # whatever the RNG holds now must not matter
    resumed = Trainer(tiny(tmp_path, "split"), resume=tmp_path / "split" / "checkpoint.pt", log=quiet)
    resumed.fit()
    assert resumed.epoch == straight.epoch == 2
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    a, b = resumed.optimizer.state_dict()["state"], straight.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert without_times(resumed.history) == without_times(straight.history)


def test_ctrl_c_mid_epoch_saves_and_resumes_bit_for_bit(tmp_path):
    straight = Trainer(tiny(tmp_path, "straight"), log=quiet)
    straight.fit()
    trainer = Trainer(tiny(tmp_path, "interrupted"), log=quiet)
    calls = []

    def press_ctrl_c(module, inputs, output):  # the 6th forward: 4 train + 1 eval in epoch 1, then epoch 2's first
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
    handle = trainer.model.register_forward_hook(press_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a shell's background job
    trainer.fit()                                              # returns instead of raising KeyboardInterrupt
    handle.remove()
    assert signal.getsignal(signal.SIGINT) == before           # our handler was removed, the caller's restored
    saved = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pt")
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (1, 1, 5)
    resumed = Trainer(tiny(tmp_path, "interrupted"), resume=tmp_path / "interrupted" / "checkpoint.pt", log=quiet)
    resumed.fit()
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert without_times(resumed.history) == without_times(straight.history)


def test_ctrl_c_during_validation_stops_after_that_epoch(tmp_path):
    """The signal arrives while epoch 1 is evaluated (the 5th forward): the run saves epoch 1 and stops there, not
    one step into epoch 2."""
    trainer = Trainer(tiny(tmp_path, epochs=3), log=quiet)
    calls = []

    def press_ctrl_c(module, inputs, output):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
    trainer.model.register_forward_hook(press_ctrl_c)
    trainer.fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (1, 0, 4) and len(calls) == 5
    assert trainer.stop_signal == signal.SIGINT


def test_the_trainers_lines_are_one_write_each(tmp_path, monkeypatch):
    """torchrun starts ``python -u``, where print writes a line's text and its newline separately, so process 0's
    "stopping" line could run into another process's line. The Trainer's default log writes each line at once."""
    written = {"stdout": [], "stderr": []}
    for stream, writes in written.items():
        monkeypatch.setattr(sys, stream, argparse.Namespace(write=writes.append, flush=lambda: None))
    trainer = Trainer(tiny(tmp_path, epochs=1))
    trainer._request_stop(signal.SIGTERM)
    trainer.log("epoch", 1, "of", 2)
    assert written["stderr"] == ["\nstopping after this step and saving a checkpoint (SIGTERM received)\n"]
    assert written["stdout"][-1] == "epoch 1 of 2\n"


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    before, files = sha256(path), sorted(os.listdir(tmp_path / "run"))
    trainer = Trainer(tiny(tmp_path), resume=path, log=quiet)
    trainer.model.head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"nan in epoch 2 .*checkpoint.pt \(epoch 1\) is unchanged"):
        trainer.fit()
    assert sha256(path) == before
    assert sorted(os.listdir(tmp_path / "run")) == files
    assert_same_state(trainer.model.state_dict(), load_checkpoint(path)["model"])  # no nan update applied


def test_interrupted_checkpoint_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet)
    trainer.fit()
    path = tmp_path / "run" / "checkpoint.pt"
    before, files = sha256(path), sorted(os.listdir(tmp_path / "run"))

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("simulated: disk full")
    monkeypatch.setattr(asmlp_min.checkpoint.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert sha256(path) == before
    assert sorted(os.listdir(tmp_path / "run")) == files        # no temporary file left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_a_save_that_fails_for_any_reason_stops_training_saying_how_to_go_on(tmp_path, monkeypatch):
    """A disk remounted read-only at the second save: one message naming the file, the first epoch's checkpoint
    kept, and the resume that continues once that is fixed."""
    trainer = Trainer(tiny(tmp_path, epochs=3), log=quiet)
    path = tmp_path / "run" / "checkpoint.pt"
    real_mkstemp = tempfile.mkstemp

    def read_only_after_the_first_save(*args, **kwargs):
        if path.exists() and kwargs["prefix"].startswith(".checkpoint.pt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, **kwargs)
    monkeypatch.setattr(asmlp_min.files.tempfile, "mkstemp", read_only_after_the_first_save)
    with pytest.raises(WriteError) as err:
        trainer.fit()
    assert str(err.value) == (f"{path} was not written: Read-only file system. Any earlier checkpoint.pt is unchanged, "
                              f"no temp file is left; check the disk, or write elsewhere; training stopped: once that "
                              f"is fixed, continue with --resume {path}")
    assert load_checkpoint(path)["epoch"] == 1


def test_a_metrics_file_that_cannot_be_written_says_the_epoch_is_saved(tmp_path, monkeypatch):
    """The checkpoint holds the epoch before metrics.jsonl is rewritten: the message says to resume, and the epoch's
    line is printed first."""
    lines = []
    trainer = Trainer(tiny(tmp_path, epochs=3), log=lines.append)
    path = tmp_path / "run" / "checkpoint.pt"

    def disk_full(run_dir, history):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "metrics.jsonl"))
    monkeypatch.setattr(asmlp_min.engine.trainer, "write_metrics", disk_full)
    with pytest.raises(WriteError, match=r"metrics.jsonl was not written: the disk is full.*training stopped: once "
                                         rf"there is room, continue with --resume {re.escape(str(path))}$"):
        trainer.fit()
    assert load_checkpoint(path)["epoch"] == 1 and lines[-1].startswith("epoch 1/3: train_loss")


def test_a_run_removes_the_temp_files_a_killed_save_left_in_its_folder(tmp_path):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    run = tmp_path / "run"
    stale = [".checkpoint.pt.k2j_x9a1.tmp", ".metrics.jsonl.0abcdefg.tmp", ".curves.png.zzzzzzzz.tmp"]
    kept = [".checkpoint.pt.tmp", "notes.tmp", ".mine.pt.abcdefgh.tmp"]
    for name in stale + kept:
        (run / name).write_bytes(b"PK half a file")
    lines = []
    Trainer(tiny(tmp_path), resume=run / "checkpoint.pt", log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert sorted(os.listdir(run)) == sorted(["checkpoint.pt", "metrics.jsonl", "curves.png", *kept])
    assert any(line.startswith("removed 3 temporary file(s) that a run killed while saving left in") for line in lines)


class _UnreadableOnce(torch.utils.data.Dataset):
    """The wrapped dataset, except that read number ``bad_read`` (counted from 1) fails once, as a truncated image
    that is then replaced by a good copy."""

    def __init__(self, base, bad_read: int):
        self.base, self.reads, self.bad_read = base, 0, bad_read

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.bad_read:
            raise ValueError("/data/train/circle/0042.jpg: unreadable or truncated image (image file is truncated); "
                             "replace it with a readable copy")
        return self.base[index]


def _with_bad_read(cfg, bad_read: int) -> TaskData:
    data = build_data(cfg.resolved())
    return dataclasses.replace(data, train=_UnreadableOnce(data.train, bad_read))


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_training_image_is_one_line_naming_the_file(tmp_path, workers):
    cfg = tiny(tmp_path, workers=workers)
    with pytest.raises(DataError) as err:  # workers: read number 1 of worker 0, which reads batch 1
        Trainer(cfg, data=_with_bad_read(cfg, 1), log=quiet).fit()
    text = str(err.value)
    assert text.startswith("/data/train/circle/0042.jpg: unreadable or truncated image")
    assert "Traceback" not in text and "\n" not in text and "worker" not in text
    assert f"continue with --resume {tmp_path / 'run' / 'checkpoint.pt'}" in text


def assert_saved_after_step_3_and_resumes_to(straight: Trainer, cfg: TrainConfig) -> None:
    """The run in ``cfg.output`` stopped in epoch 2 and saved the state after its first step there (step 3, batch 2
    of 4); resumed, it ends exactly where ``straight``, the run that never stopped, did."""
    checkpoint = Path(cfg.output) / "checkpoint.pt"
    saved = load_checkpoint(checkpoint)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (1, 2, 3)
    resumed = Trainer(cfg, resume=checkpoint, log=quiet)
    resumed.fit()
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    assert without_times(resumed.history) == without_times(straight.history)


def test_an_unreadable_image_mid_epoch_saves_the_epochs_progress_and_resumes_bit_for_bit(tmp_path):
    """Epoch 2 (4 batches of 8, 2 per step) fails reading its 4th batch: the save goes back to the state after its
    first step (batch 2), although batch 3 has drawn random numbers since; with the image replaced, the resumed
    run ends exactly where an uninterrupted one does."""
    straight = Trainer(tiny(tmp_path, "straight", accum_steps=2), log=quiet)
    straight.fit()
    cfg = tiny(tmp_path, accum_steps=2)
    with pytest.raises(DataError, match=r"Saved epoch 2's progress \(2 of 4 batches\) in .*checkpoint.pt"):
        Trainer(cfg, data=_with_bad_read(cfg, 32 + 3 * 8 + 5), log=quiet).fit()
    assert_saved_after_step_3_and_resumes_to(straight, cfg)


class _WorkerKilledOnce(torch.utils.data.Dataset):
    """The wrapped dataset, except that the worker process making read number ``bad_read`` is killed with SIGKILL,
    as the kernel's out-of-memory killer does; the first time only (reads are counted in a file, across processes)."""

    def __init__(self, base, bad_read: int, counter):
        self.base, self.bad_read, self.counter = base, bad_read, counter

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        with open(self.counter, "a+b") as f:
            f.write(b".")
            reads = f.tell()
        if reads == self.bad_read and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.base[index]


def test_a_killed_loader_worker_saves_the_epochs_progress_and_says_why_and_how_to_resume(tmp_path):
    """A worker killed mid-epoch 2 (while it reads the 4th batch, so during the step on the 3rd) is the same kind of
    stop as an unreadable image: the progress up to the last step is saved, the message names the likely cause, and
    --resume ends exactly where an uninterrupted run with two workers does (samples are seeded one by one)."""
    straight = Trainer(tiny(tmp_path, "straight", accum_steps=2, workers=2), log=quiet)
    straight.fit()
    torch_handler = signal.getsignal(signal.SIGCHLD)  # set by PyTorch's first loader with workers
    cfg = tiny(tmp_path, accum_steps=2, workers=1)
    data = build_data(cfg.resolved())
    data = dataclasses.replace(data, train=_WorkerKilledOnce(data.train, 32 + 3 * 8 + 1, tmp_path / "reads"))
    with pytest.raises(WorkerDied) as err:  # a DataError, which the CLI prints as one line
        Trainer(cfg, data=data, log=quiet).fit()
    text = str(err.value)
    # torch names the signal itself ("is killed by signal: Killed") or, when its queue noticed the death first,
    # says "exited unexpectedly", and the worker's exit code names it
    killed = re.escape(KILLED)
    assert re.match(r"a data-loading worker process died \(DataLoader worker \(pid(\(s\))? \d+\) "
                    rf"(is killed by signal: Killed|exited unexpectedly; killed by signal 9 \({killed}\))\); ", text)
    assert "out-of-memory killer" in text and "--workers" in text and "\n" not in text and "Traceback" not in text
    assert "Saved epoch 2's progress (2 of 4 batches)" in text
    assert text.endswith(f"continue with --resume {tmp_path / 'run' / 'checkpoint.pt'}")
    assert signal.getsignal(signal.SIGCHLD) is torch_handler
    assert_saved_after_step_3_and_resumes_to(straight, cfg)


_CTRL_C_AS_WORKERS_START = """
import os, signal
from torch.utils.data import DataLoader
from asmlp_min.engine.data import _loaded
from asmlp_min.engine.distributed import leave_ctrl_c_to_the_main_process

class Started(DataLoader):
    def __iter__(self):
        iterator = super().__iter__()   # the spawned workers are importing torch now
        os.killpg(0, signal.SIGINT)     # a terminal's Ctrl-C reaches every process of its group
        return iterator

if __name__ == "__main__":
    stops = []
    signal.signal(signal.SIGINT, lambda *args: stops.append("stop at the next safe point"))
    loader = Started(list(range(8)), batch_size=2, num_workers=2, multiprocessing_context="spawn",
                     worker_init_fn=leave_ctrl_c_to_the_main_process)
    print([batch.tolist() for batch in _loaded(loader)], stops)
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="Windows cannot block a signal")
def test_ctrl_c_while_spawned_workers_start_stops_the_run_instead_of_killing_them(tmp_path):
    """macOS and Windows spawn workers, which take seconds to import torch before their worker_init_fn ignores
    Ctrl-C: killed by it meanwhile, their deaths were reported as the out-of-memory killer's (exit 2, not 130)."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_AS_WORKERS_START)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[[0, 1], [2, 3], [4, 5], [6, 7]] ['stop at the next safe point']"
    assert "KeyboardInterrupt" not in done.stderr


class _PipeOfADeadWorker:
    """A loader whose next batch fails as the main process's read of a dead worker's pipe can: ECONNRESET, before
    torch's own check has seen the death. ``worker``: a real process, already ended (or None)."""
    num_workers, multiprocessing_context = 1, None   # DataLoader's: one worker, the default start method

    def __init__(self, worker):
        self._workers = [worker] if worker is not None else []

    def __iter__(self):
        return self

    def __next__(self):
        raise ConnectionResetError(104, "Connection reset by peer")


def _killed_process():
    import multiprocessing
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    return worker


def test_a_dead_workers_reset_pipe_is_a_worker_death_and_a_reset_without_one_a_data_error():
    worker = _killed_process()
    with pytest.raises(WorkerDied) as err:
        list(_loaded(_PipeOfADeadWorker(worker)))
    assert str(err.value).startswith(f"a data-loading worker process died (DataLoader worker (pid(s) {worker.pid}) "
                                      f"exited unexpectedly; killed by signal 9 ({KILLED})); ")
    with pytest.raises(DataError) as err:                 # no worker died: a reader's own connection failed
        list(_loaded(_PipeOfADeadWorker(None)))
    assert type(err.value) is DataError and "Connection reset by peer" in str(err.value)


def test_a_pipe_that_resets_before_its_worker_has_ended_is_still_a_worker_death(monkeypatch):
    """The reset comes as the kernel closes a killed worker's files, a moment before the process has an exit code
    (seen under load: the run said 'Connection reset by peer'). Here the moment is 0.3 s; a worker that lives on
    past the wait leaves a reader's own error."""
    import multiprocessing
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
    with pytest.raises(WorkerDied, match=rf"pid\(s\) {worker.pid}\) exited unexpectedly; killed by signal 9"):
        list(_loaded(_PipeOfADeadWorker(worker)))

    monkeypatch.setattr(engine_data, "RESET_WAIT_S", 0.2)
    alive = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    alive.start()
    try:
        with pytest.raises(DataError) as err:
            list(_loaded(_PipeOfADeadWorker(alive)))
        assert type(err.value) is DataError and "Connection reset by peer" in str(err.value)
    finally:
        alive.kill()
        alive.join()


def test_a_worker_death_that_torch_reports_without_its_signal_is_named_by_the_exit_codes():
    torch_says = RuntimeError("DataLoader worker (pid(s) 4577, 4578) exited unexpectedly")
    assert _worker_death_message(torch_says, [None, -9, 0, -15, -9]) == (
        "a data-loading worker process died (DataLoader worker (pid(s) 4577, 4578) exited unexpectedly; killed by "
        f"signal 9 ({KILLED}), signal 15 ({signal.strsignal(15)})); 'Killed' (signal 9) is most often the kernel's "
        "out-of-memory killer")
    named = RuntimeError("DataLoader worker (pid 4577) is killed by signal: Killed.")
    assert _worker_death_message(named, [-9]).startswith(
        "a data-loading worker process died (DataLoader worker (pid 4577) is killed by signal: Killed); ")


def test_an_unreadable_validation_image_keeps_the_trained_epoch(tmp_path):
    cfg = tiny(tmp_path)
    data = build_data(cfg.resolved())
    data = dataclasses.replace(data, val=_UnreadableOnce(data.val, 1))
    with pytest.raises(DataError, match=r"^/data/train/circle/0042.jpg: unreadable .* Saved epoch 1 without its "
                                        r"validation in .*checkpoint.pt; .* continue with --resume"):
        Trainer(cfg, data=data, log=quiet).fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 0) and "top1" not in saved["metrics"][0]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["epoch"] == 1
    resumed = Trainer(cfg, resume=tmp_path / "run" / "checkpoint.pt", log=quiet)
    resumed.fit()
    assert [("top1" in row) for row in resumed.history] == [False, True]


def test_resume_errors_say_what_is_wrong(tmp_path):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    good = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny(tmp_path), resume=tmp_path / "nope.pt", log=quiet)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="a corrupt or truncated one"):
        Trainer(tiny(tmp_path), resume=corrupt, log=quiet)
    foreign = tmp_path / "weights.pt"
    torch.save({"model": load_checkpoint(good)["model"]}, foreign)
    with pytest.raises(CheckpointError, match="not written by 'asmlp-min train': --resume continues a run from its "
                                              "checkpoint.pt; to start from official .* use train --pretrained PATH"):
        Trainer(tiny(tmp_path), resume=foreign, log=quiet)     # it said "evaluate and predict need ...": they don't
    with pytest.raises(CheckpointError, match="embed_dim: checkpoint 8, now 16"):
        Trainer(tiny(tmp_path, embed_dim=16), resume=good, log=quiet)
    with pytest.raises(CheckpointError, match="scheduled for 2 epochs, now 3"):
        Trainer(tiny(tmp_path, epochs=3), resume=good, log=quiet)
    with pytest.raises(CheckpointError, match="its epochs had 4 batches per process of 32 training images, this data "
                                              "gives 8 of 64, which would change the data order and the learning-rate "
                                              "schedule"):
        Trainer(tiny(tmp_path, train_size=64), resume=good, log=quiet)    # 32 / 8 = 4 batches, 64 / 8 = 8
    with pytest.raises(CheckpointError, match=r"4 batches per process of 32 training images, this data gives 4 of "
                                              r"33, which would change the data order; .*not removed"):
        Trainer(tiny(tmp_path, train_size=33), resume=good, log=quiet)    # an image more, as many batches


def test_a_run_checkpoint_of_a_newer_format_asks_for_an_upgrade(tmp_path):
    newer = tmp_path / "newer.pt"
    torch.save({"format": "asmlp_min.engine/2", "model": {}, "config": {}}, newer)
    with pytest.raises(CheckpointError, match=r"newer\.pt was written by a newer version of asmlp_min \(format "
                                              r"'asmlp_min.engine/2'; this one reads 'asmlp_min.engine/1'\): upgrade"):
        load_trained(newer)
    other = tmp_path / "other.pt"
    torch.save({"format": "somebody.else/2", "model": {}}, other)
    with pytest.raises(CheckpointError, match="not written by 'asmlp-min train': load_trained reads a run's "
                                              "checkpoint.pt; for released weights use load_for_inference"):
        load_trained(other)


# ---------------------------------------------------------------- numerics of the step

def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    exact = dict(augment="none", drop_path=0.0, mixup=0.0, cutmix=0.0, epochs=1)
    big = Trainer(tiny(tmp_path, "big", batch_size=16, **exact), log=quiet)
    accumulated = Trainer(tiny(tmp_path, "accumulated", batch_size=8, accum_steps=2, **exact), log=quiet)
    big.fit()
    accumulated.fit()
    assert big.step == accumulated.step == 2
    for (name, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_channels_last_trains_the_same_model(tmp_path):
    exact = dict(augment="none", drop_path=0.0, mixup=0.0, cutmix=0.0, epochs=1)
    plain = Trainer(tiny(tmp_path, "plain", **exact), log=quiet)
    nhwc = Trainer(tiny(tmp_path, "nhwc", channels_last=True, **exact), log=quiet)
    plain.fit()
    nhwc.fit()
    assert nhwc.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(plain.model.parameters(), nhwc.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_bfloat16_amp_on_cpu_runs_and_overfits(tmp_path):
    trainer = Trainer(tiny(tmp_path, amp=True, train_size=8, epochs=20, lr=3e-3, eval_every=20, augment="none",
                           drop_path=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, warmup_epochs=0), log=quiet)
    dtypes = set()
    trainer.model.head.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    history = trainer.fit()
    assert dtypes == {torch.bfloat16}
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]


# ---------------------------------------------------------------- run folder, evaluation, prediction

def test_run_folder_has_metrics_curves_and_a_loadable_model(tmp_path, capsys, monkeypatch):
    import asmlp_min.viz
    plotted, plot = [], asmlp_min.viz.plot_curves
    monkeypatch.setattr(asmlp_min.viz, "plot_curves", lambda curves, path: plotted.append(curves) or plot(curves, path))
    history = Trainer(tiny(tmp_path), log=quiet).fit()
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    assert {"train_loss", "lr", "val_loss", "top1", "top5", "train_img_per_s"} <= lines[-1].keys()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # losses and metrics, not the lr, which on the metrics' 0-1 axis was a flat line at 0
    assert set(plotted[-1][-1]) == {"epoch", "train_loss", "val_loss", "top1", "top5"}
    assert "it/s" not in capsys.readouterr().err              # no progress bar when stderr is not a terminal
    model, cfg, checkpoint = load_trained(run / "checkpoint.pt")
    assert checkpoint["classes"] == ["circle", "square", "triangle"]
    again = evaluate(model, cfg, build_data(cfg, with_train=False))
    assert again["top1"] == history[-1]["top1"] and again["val_loss"] == pytest.approx(history[-1]["val_loss"])
    probs = predict(model, cfg, torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8))
    assert probs.shape == (3,) and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_bad_settings_raise_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'asmlp_huge'"):
        Trainer(tiny(tmp_path, model="asmlp_huge"), log=quiet)
    with pytest.raises(ValueError, match="task must be one of"):
        Trainer(tiny(tmp_path, task="pose"), log=quiet)
    with pytest.raises(ValueError, match="fewer than one step"):
        Trainer(tiny(tmp_path, batch_size=64), log=quiet)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Trainer(tiny(tmp_path, data=str(tmp_path / "missing")), log=quiet)
    with pytest.raises(ValueError, match="seg: mixup \\(--mixup\\) applies to cls only; leave it out for seg"):
        Trainer(tiny(tmp_path, task="seg"), log=quiet)
    with pytest.raises(ValueError, match="det: min_size must be >= 32, got 16: the detector's coarsest level"):
        Trainer(tiny(tmp_path, task="det", min_size=16, mixup=0.0, cutmix=0.0), log=quiet)
    with pytest.raises(ValueError, match=r"schedule must be one of \('cosine', .*got 'linear-ish'"):
        Trainer(tiny(tmp_path, schedule="linear-ish"), log=quiet)
    with pytest.raises(ValueError, match=r"stop_at_epoch must be in \[1, epochs=2\], got 3"):
        Trainer(tiny(tmp_path, epochs=2, stop_at_epoch=3), log=quiet)
    with pytest.raises(ValueError, match="num_classes=5 but the data has 3 classes"):
        Trainer(tiny(tmp_path, num_classes=5), log=quiet)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda was asked for but no CUDA GPU is visible"):
            Trainer(tiny(tmp_path, device="cuda"), log=quiet)
        with pytest.raises(ValueError, match="--device cuda:7 was asked for but no CUDA GPU is visible"):
            Trainer(tiny(tmp_path, device="cuda:7"), log=quiet)


def test_a_gpu_index_the_machine_does_not_have_is_refused_naming_the_ones_it_has(monkeypatch):
    from asmlp_min.engine import init_distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--device cuda:2 was asked for but this machine has 2 GPU\\(s\\), cuda:0 to "
                                         "cuda:1"):
        init_distributed("cuda:2")
    assert init_distributed("cuda:1").device == torch.device("cuda", 1)


def test_more_than_four_workers_per_usable_cpu_are_refused_before_any_data_is_made(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_data, "_usable_cpus", lambda: 2)   # a 2-CPU machine: at most 8
    with pytest.raises(ValueError, match="--workers 9 would start 9 loader processes .* for the 2 CPU\\(s\\) this "
                                         "process may use; use at most 8"):
        build_data(tiny(tmp_path, workers=9).resolved())
    assert build_data(tiny(tmp_path, workers=8).resolved()).num_classes == 3


def _as_read(*values):
    """A transform (image, mask) and a collate function (samples) that change nothing, picklable for workers."""
    return values if len(values) > 1 else values[0]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="macOS and Windows have no CPU affinity call")
def test_the_usable_cpus_are_the_affinity_of_this_process_not_every_cpu_of_the_machine():
    assert engine_data._usable_cpus() == len(os.sched_getaffinity(0))


def test_a_filled_shapes_cache_stays_out_of_spawned_workers(tmp_path):
    """--class-weight balanced reads every training scene into the cache first. A forkserver worker (spawn: macOS,
    Windows) is sent the dataset pickled, each cached tensor as a file descriptor: 'too many fds' past 256."""
    from torch.utils.data import DataLoader
    train = build_data(tiny(tmp_path, task="seg", mixup=0.0, cutmix=0.0, train_size=160).resolved()).train
    train.transform = _as_read                   # the same tensors in the main process and the worker
    ours = [train[i] for i in range(len(train))]                              # 320 cached tensors
    assert len(train.cache) == 160
    loader = DataLoader(train, batch_size=80, num_workers=1, multiprocessing_context="forkserver",
                        collate_fn=_as_read)
    theirs = [sample for batch in loader for sample in batch]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ours, theirs, strict=True))
    assert len(train.cache) == 160                                            # the main process keeps its own


def test_class_weight_balanced_is_computed_from_the_training_masks(tmp_path):
    seg = dict(task="seg", mixup=0.0, cutmix=0.0, train_size=16, val_size=4, batch_size=4, epochs=1)
    lines = []
    trainer = Trainer(tiny(tmp_path, class_weight="balanced", **seg), log=lines.append)
    counts = torch.zeros(4, dtype=torch.int64)
    for i in range(16):
        counts += torch.bincount(trainer.data.train[i][1].flatten(), minlength=4)
    expected = (counts.max() / counts).sqrt().float()
    torch.testing.assert_close(trainer.model.class_weight, expected)
    assert any(line.startswith("class_weight balanced: pixel shares") for line in lines)
    given = Trainer(tiny(tmp_path, name="given", class_weight="1,2,3,4", **seg), log=quiet)
    assert given.model.class_weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="gives 2 weights for 4 classes"):
        Trainer(tiny(tmp_path, name="short", class_weight="1,2", **seg), log=quiet)
    with pytest.raises(ValueError, match="'balanced' or positive numbers"):
        Trainer(tiny(tmp_path, name="bad", class_weight="1,-2,3,4", **seg), log=quiet)
    with pytest.raises(ValueError, match=r"cls: class_weight \(--class-weight\) applies to seg only"):
        Trainer(tiny(tmp_path, name="cls", class_weight="balanced"), log=quiet)


def test_balanced_weights_refuse_masks_without_labels_and_name_a_class_never_seen():
    """Binary masks saved as 0/255 (a common export) leave class 1 ignored everywhere; all-255 masks teach nothing."""
    from types import SimpleNamespace
    from asmlp_min.engine.tasks import class_weights
    cfg = SimpleNamespace(class_weight="balanced", num_classes=2, data="masks/")
    binary = [(None, torch.tensor([[0, 255], [0, 0]]))] * 3
    lines = []
    assert class_weights(cfg, binary, lines.append) == [1.0, 1.0]
    assert "warning: class(es) [1] have no pixel in the training masks" in lines[0]
    with pytest.raises(ValueError, match=r"^masks/: the training masks hold no labelled pixel"):
        class_weights(cfg, [(None, torch.full((2, 2), 255))] * 3, lines.append)


class _Masks:
    """A segmentation dataset of given masks, read through its ``transform`` as the folder datasets are."""

    def __init__(self, masks):
        self.masks, self.transform = masks, lambda image, mask: (image, mask + 1000)   # a transform not to be used

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return self.transform(None, self.masks[i])


def test_masks_that_label_one_class_beside_ignored_pixels_are_warned_about_as_0_255_binary_masks():
    """Binary masks saved as 0/255 trained a 2-class model on class 0 alone, and scored mIoU 1.0 for a model that
    never finds the object (class 1 is absent from both, so it is left out of the mean), without a word."""
    from types import SimpleNamespace
    from asmlp_min.engine.tasks import refuse_unlabelled_masks
    cfg = SimpleNamespace(num_classes=2, data="masks/")
    for masks, warned in (([torch.tensor([[0, 255], [255, 255]])] * 3, True),      # the 0/255 export: 75% ignored
                          ([torch.tensor([[1, 255], [255, 255]])] * 40, True),
                          ([torch.tensor([[0, 0], [0, 0]])] * 3, False),           # a rare class absent: no 255
                          ([torch.tensor([[0, 255], [1, 0]])] * 3, False)):        # both classes
        lines = []
        refuse_unlabelled_masks(cfg, _Masks(masks), lines.append)
        label, read = masks[0].min().item(), min(len(masks), 32)
        assert lines == ([f"warning: {read} training masks read evenly through the split label class {label} only, "
                          "and 75% of their pixels are 255, which means 'ignore': if they are binary masks saved as "
                          "0/255, save the object as 1"] if warned else [])
    refuse_unlabelled_masks(SimpleNamespace(num_classes=1, data="masks/"), _Masks([torch.tensor([[0, 255]])]),
                            lines.append)
    assert lines == []                                                             # one class: nothing else to label


def _masks_all_ignored(folder: Path, keep: int | None = None) -> None:
    """Every mask of ``folder`` rewritten to 255 (ignored) but the ``keep``-th (in sorted order)."""
    import numpy as np
    for k, path in enumerate(sorted(folder.glob("*.png"))):
        if k != keep:
            Image.fromarray(np.full_like(np.array(Image.open(path)), 255)).save(path)


def test_masks_without_a_labelled_pixel_are_refused_before_training_and_at_evaluation(tmp_path):
    """All-255 masks trained to a loss of exactly 0 and scored mIoU nan, without a word."""
    from asmlp_min.data.shapes import export_shapes
    from asmlp_min.engine.tasks import refuse_unlabelled_masks
    for split in ("train", "val"):
        export_shapes(tmp_path / "data", task="seg", n=8, split=split, seed=3)
    cfg = tiny(tmp_path, task="seg", data=str(tmp_path / "data"), num_classes=4, mixup=0.0, cutmix=0.0,
               batch_size=4, epochs=1, head_channels=16)
    _masks_all_ignored(tmp_path / "data" / "annotations" / "train", keep=5)   # one labelled mask is enough
    trainer = Trainer(cfg, log=quiet)
    transform, state = trainer.data.train.transform, torch.get_rng_state()
    refuse_unlabelled_masks(trainer.cfg, trainer.data.train, quiet)   # reads without the random crop: no draw
    assert torch.equal(torch.get_rng_state(), state) and trainer.data.train.transform is transform
    _masks_all_ignored(tmp_path / "data" / "annotations" / "val")
    with pytest.raises(ValueError, match="^the validation masks hold no labelled pixel"):
        trainer.fit()
    _masks_all_ignored(tmp_path / "data" / "annotations" / "train")
    with pytest.raises(ValueError, match="data: 8 training masks read evenly through the split hold no labelled pixel"):
        Trainer(dataclasses.replace(cfg, output=str(tmp_path / "second")), log=quiet)


def test_pretrained_backbone_is_loaded_and_a_mismatch_refused(tmp_path):
    trainer = Trainer(tiny(tmp_path, epochs=1), log=quiet)
    trainer.fit()
    path = str(tmp_path / "run" / "checkpoint.pt")
    net = build_model("cls", "asmlp_tiny", 5, pretrained=path, embed_dim=8, depths=(1, 1, 1, 1))  # new 5-class head
    trained = trainer.model.state_dict()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items() if not k.startswith("head."))
    with pytest.raises(CheckpointError, match="does not fit asmlp_tiny") as refused:
        build_model("cls", "asmlp_tiny", 3, pretrained=path, embed_dim=16, depths=(1, 1, 1, 1))
    # the code the message gives runs as written, in a fresh interpreter (asmlp_min.engine.load_trained after a
    # plain 'import asmlp_min' did not: the engine is not imported with the package)
    first, second = re.search(r"'([^']*)', then '([^']*)' rebuilds its model", str(refused.value)).groups()
    code = f"{first}\npath = {path!r}\n{second}\nassert _.get('config', {{}}).get('embed_dim') == 8"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_trainer_reports_what_pretrained_loaded(tmp_path):
    Trainer(tiny(tmp_path, epochs=1), log=quiet).fit()
    lines = []
    Trainer(tiny(tmp_path, output=str(tmp_path / "second"), pretrained=str(tmp_path / "run" / "checkpoint.pt")),
            log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    n_backbone = sum(1 for k in build_model("cls", "asmlp_tiny", 3, embed_dim=8, depths=(1, 1, 1, 1)).state_dict()
                     if not k.startswith("head."))
    assert any(f"{n_backbone} backbone tensors loaded" in line for line in lines), lines


def test_pretrained_of_another_depth_is_refused_and_every_key_left_out_is_reported(tmp_path):
    deeper = tmp_path / "small.pth"
    torch.save({"model": build_model("cls", "asmlp_tiny", 3, embed_dim=8, depths=(1, 1, 3, 1)).state_dict()}, deeper)
    with pytest.raises(CheckpointError, match=r"does not fit asmlp_tiny: it is another variant.*layers\.2\.blocks"):
        Trainer(tiny(tmp_path, pretrained=str(deeper)), log=quiet)
    dense = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), features_only=True).state_dict()  # norm0..3
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in dense.items()}}, tmp_path / "upernet.pth")
    lines = []
    Trainer(tiny(tmp_path, name="from_seg", pretrained=str(tmp_path / "upernet.pth")),
            log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    line = next(line for line in lines if "backbone tensors loaded" in line)
    assert "2 new (norm.weight, norm.bias)" in line and "2 skipped (head.bias, head.weight)" in line
    assert "8 unused (norm0.weight, norm0.bias, norm1.weight, norm1.bias, ... (4 more))" in line


# ---------------------------------------------------------------- detection: crowd boxes, the paper's scale on folders

def test_crowd_boxes_reach_the_detector_and_are_not_learned():
    """COCO ``iscrowd`` = 1 regions are ignored in training (mmdet, torchvision): the batch the engine hands
    to the detector must still say which boxes they are."""
    from asmlp_min.detection import SimpleFPNDetector
    torch.manual_seed(0)
    model = SimpleFPNDetector("asmlp_tiny", num_classes=3, embed_dim=8, depths=(1, 1, 1, 1), fpn_channels=16,
                              num_convs=1, drop_path_rate=0.0).train()
    image = torch.rand(3, 64, 64)
    boxes, labels = torch.tensor([[2.0, 2, 62, 62], [8, 8, 40, 40]]), torch.tensor([1, 2])
    task = DetectionTask(TrainConfig(task="det"), TaskData(None, [], 3))
    target = {"boxes": boxes, "labels": labels, "iscrowd": torch.tensor([1, 0]), "image_id": 1}
    batch = task.prepare(([image], [target]), torch.device("cpu"), False)
    assert batch[1][0]["iscrowd"].tolist() == [1, 0]
    loss = task.loss(model, batch)
    only_the_object = sum(model([image], [{"boxes": boxes[1:], "labels": labels[1:]}]).values())
    crowd_as_object = sum(model([image], [{"boxes": boxes, "labels": labels}]).values())
    assert torch.allclose(loss, only_the_object) and not torch.allclose(loss, crowd_as_object)


def test_folders_default_to_the_papers_image_sizes_and_shapes_keeps_its_own():
    """PAPER.md Sec. 8, 11: ImageNet crops 224, COCO short side 800 (long side <= 1333), ADE20K crops 512."""
    for task, on_shapes, on_folder in (("cls", 64, 224), ("det", 128, 800), ("seg", 128, 512)):
        size = SIZE_FIELD[task]                                 # cls image_size, det min_size, seg crop_size
        assert getattr(TrainConfig(task=task).resolved(), size) == on_shapes
        assert getattr(TrainConfig(task=task, data="/datasets/real").resolved(), size) == on_folder
        assert getattr(TrainConfig(task=task, data="/datasets/real", **{size: 96}).resolved(), size) == 96


def test_a_config_saved_when_image_size_meant_every_tasks_size_maps_to_the_new_names():
    """Before min_size/crop_size, det saved its short side and seg its crop as image_size (hand-made old dicts)."""
    old = dict(task="det", model="asmlp_tiny", data="shapes", epochs=2, image_size=96, num_classes=3)
    det = TrainConfig.from_dict(old).resolved()
    assert (det.image_size, det.min_size, det.max_size, det.crop_size) == (None, 96, 160, None)  # 96 * 1333 / 800
    seg = TrainConfig.from_dict({**old, "task": "seg"}).resolved()
    assert (seg.image_size, seg.min_size, seg.crop_size) == (None, None, 96)
    cls = TrainConfig.from_dict({**old, "task": "cls"}).resolved()
    assert (cls.image_size, cls.min_size, cls.crop_size) == (96, None, None)


@pytest.mark.parametrize("task, size", [("det", "min_size"), ("seg", "crop_size")])
def test_an_old_run_checkpoint_with_image_size_loads_evaluates_predicts_and_resumes(tmp_path, task, size):
    cfg = tiny(tmp_path, task=task, mixup=0.0, cutmix=0.0, head_channels=16, train_size=16, val_size=4,
               batch_size=4, epochs=2, **{size: 64})
    Trainer(dataclasses.replace(cfg, stop_at_epoch=1), log=quiet).fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    old = {k: v for k, v in checkpoint["config"].items() if k not in ("min_size", "max_size", "crop_size")}
    checkpoint["config"] = {**old, "image_size": 64}                  # as written before the sizes had names
    path = tmp_path / "old.pt"
    torch.save(checkpoint, path)
    model, saved, _ = load_trained(path)
    assert getattr(saved, size) == 64 and saved.image_size is None
    if task == "det":
        assert (model.min_size, model.max_size) == (64, 107)             # as the old image_size=64 built it
    evaluate(model, saved, build_data(saved, with_train=False))
    predict(model, saved, torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    resumed = Trainer(cfg, resume=path, log=quiet)
    resumed.fit()
    assert resumed.epoch == 2


def test_shapes_classification_scenes_hold_one_whole_shape_on_grey():
    """Issue 16: a border-cut square can read as a triangle, so `train cls --data shapes` draws every scene with
    one shape that lies inside the 64-px image, on a flat background; det and seg keep the 128-px default scenes."""
    data = build_data(TrainConfig(task="cls", train_size=40, val_size=40))
    for split in (data.train, data.val):
        for i in range(len(split)):
            scene = split.base.scene(i)
            assert scene.image.shape == (64, 64, 3) and len(scene.masks) == 1
            assert not (scene.masks[:, [0, -1], :].any() or scene.masks[:, :, [0, -1]].any())  # off the border
            background = scene.image[~scene.masks[0]].astype(int)
            assert background.max() - background.min() <= 2 * 16  # one grey level plus the +-16 noise
    for task in ("det", "seg"):
        assert build_data(TrainConfig(task=task, train_size=1, val_size=1)).val.base.scene(0).image.shape == (
            128, 128, 3)


def miou_by_hand(model, samples, mask_sizes, image_size, classes=4) -> float:
    """The oracle of the folder tests: torch's interpolate of the logits to each mask's size, IoU counted by hand
    (classes in neither the truth nor the guesses left out, as mmseg does). Checks the sizes on the way."""
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    with torch.no_grad():
        for (image, mask), mask_size in zip(samples, mask_sizes, strict=True):
            assert image.shape[-2:] == image_size and mask.shape == mask_size  # the mask keeps its own size
            logits = F.interpolate(model(image[None]), size=mask_size, mode="bilinear", align_corners=False)
            labelled = mask != 255
            for truth, guess in zip(mask[labelled].tolist(), logits.argmax(1)[0][labelled].tolist()):
                confusion[truth, guess] += 1
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    ious = [confusion[k, k].item() / union[k].item() for k in range(classes) if union[k] > 0]
    return sum(ious) / len(ious)


def test_segmentation_folder_with_light_augment_scores_each_mask_at_its_own_size(tmp_path):
    """``--augment light`` resizes the image to crop x crop; evaluation scores the logits at each mask's own size
    (not on a mask stretched to the crop), one image per batch, since a folder's masks need not stack."""
    from asmlp_min.data.shapes import export_shapes
    export_shapes(tmp_path / "ade", task="seg", n=4, split="train", seed=3, image_size=64)
    export_shapes(tmp_path / "ade", task="seg", n=2, split="val", seed=4, image_size=64)
    export_shapes(tmp_path / "small", task="seg", n=1, split="val", seed=5, image_size=48)
    for kind in ("images", "annotations"):  # the small scene second: a batch of 2 would pair it with a larger one
        val = tmp_path / "ade" / kind / "val"
        (val / "000001.png").rename(val / "000002.png")
        shutil.copy(tmp_path / "small" / kind / "val" / "000000.png", val / "000001.png")
    cfg = TrainConfig(task="seg", data=str(tmp_path / "ade"), output=str(tmp_path / "run"), num_classes=4,
                      crop_size=32, augment="light", epochs=1, batch_size=2, embed_dim=8, depths=(1, 1, 1, 1),
                      head_channels=16, drop_path=0.0, mixup=0.0, cutmix=0.0, device="cpu")
    Trainer(cfg, log=quiet).fit()
    model, saved, _ = load_trained(tmp_path / "run" / "checkpoint.pt")
    data = build_data(saved, with_train=False)
    metrics = evaluate(model, saved, data)
    want = miou_by_hand(model, data.val, [(64, 64), (48, 48), (64, 64)], (32, 32))
    assert metrics["mIoU"] == pytest.approx(want, abs=1e-6)


def test_segmentation_folder_evaluates_and_predicts_at_mmsegs_test_scale_scored_at_each_images_size(tmp_path):
    """On a folder (``--augment paper``) evaluation and predict run the model at mmseg's test scale, the image
    rescaled to fit (4 x crop, crop) as (2048, 512) for ADE20K's 512 crop, and score the logits up-sampled to the
    image's own size. The oracle: torch's interpolate of the logits to the mask's size, IoU counted by hand."""
    from asmlp_min.data.shapes import export_shapes
    for split, n in (("train", 4), ("val", 3)):
        export_shapes(tmp_path / "ade", task="seg", n=n, split=split, seed=3, image_size=64)
    cfg = TrainConfig(task="seg", data=str(tmp_path / "ade"), output=str(tmp_path / "run"), num_classes=4,
                      crop_size=32, epochs=1, batch_size=2, embed_dim=8, depths=(1, 1, 1, 1), head_channels=16,
                      drop_path=0.0, mixup=0.0, cutmix=0.0, device="cpu")
    Trainer(cfg, log=quiet).fit()
    model, saved, _ = load_trained(tmp_path / "run" / "checkpoint.pt")
    seen = []
    model.backbone.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    data = build_data(saved, with_train=False)
    metrics = evaluate(model, saved, data)
    assert seen == [(1, 3, 32, 32)] * 3                    # 64 x 64 -> short side 32 (the crop)
    assert metrics["mIoU"] == pytest.approx(miou_by_hand(model, data.val, [(64, 64)] * 3, (32, 32)), abs=1e-6)
    seen.clear()
    assert predict(model, saved, torch.randint(0, 256, (3, 100, 250), dtype=torch.uint8)).shape == (100, 250)
    assert seen == [(1, 3, 32, 80)]                        # factor min(128 / 250, 32 / 100) = 0.32


def test_a_detection_folder_decodes_no_masks_and_keeps_the_annotated_boxes(tmp_path):
    """The detectors here predict boxes: a polygon per object drawn as a full-size mask only cost time and memory
    (200 polygons on a 2000x1500 photo: 572 MiB, 9 s a sample)."""
    from asmlp_min.data.shapes import export_shapes
    for split in ("train", "val"):
        export_shapes(tmp_path / "coco", task="det", n=2, split=split, seed=3, image_size=64)
    data = build_data(TrainConfig(task="det", data=str(tmp_path / "coco"), device="cpu").resolved())
    annotations = json.loads((tmp_path / "coco" / "annotations" / "instances_val.json").read_text())["annotations"]
    assert all(a["segmentation"] for a in annotations)           # polygons were there to decode
    for dataset in (data.train, data.val):
        assert all("masks" not in dataset[i][1] for i in range(len(dataset)))
    _, target = data.val[0]
    boxes = [a["bbox"] for a in annotations if a["image_id"] == target["image_id"]]
    x, y, w, h = torch.tensor(boxes, dtype=torch.float32).unbind(1)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.stack([x, y, x + w, y + h], 1))


@pytest.mark.parametrize("crowd_only", [False, True])
def test_a_detection_training_split_without_annotations_is_refused(tmp_path, recwarn, crowd_only):
    """No annotations, or only crowd regions, which the detectors skip: that trained to a loss near 0 and AP -1."""
    from asmlp_min.data.shapes import export_shapes
    for split in ("train", "val"):
        export_shapes(tmp_path / "coco", task="det", n=2, split=split, seed=3, image_size=64)
    path = tmp_path / "coco" / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    annotations = [{**a, "iscrowd": 1} for a in data["annotations"]] if crowd_only else []
    path.write_text(json.dumps({**data, "annotations": annotations}))
    cfg = TrainConfig(task="det", data=str(tmp_path / "coco"), device="cpu").resolved()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: no annotations to train on .*only crowd regions"):
        build_data(cfg)
    assert not [w for w in recwarn if "AP will be -1" in str(w.message)]   # that is about evaluation
    if crowd_only:                                                           # one object to learn is enough
        annotations[0]["iscrowd"] = 0
        path.write_text(json.dumps({**data, "annotations": annotations}))
        assert len(build_data(cfg).train) == 2


def test_detection_folder_trains_and_evaluates_at_the_papers_scale(tmp_path):
    """On a COCO folder the detector resizes every image to short side 800, long side <= 1333, in training,
    evaluation and prediction alike; the checkpoint's config rebuilds that model, and resume checks the size."""
    from asmlp_min.data.shapes import export_shapes
    for split, n in (("train", 4), ("val", 2)):
        export_shapes(tmp_path / "coco", task="det", n=n, split=split, seed=3, image_size=64)
    cfg = TrainConfig(task="det", data=str(tmp_path / "coco"), output=str(tmp_path / "run"), epochs=1, batch_size=2,
                      embed_dim=8, depths=(1, 1, 1, 1), head_channels=16, drop_path=0.0, device="cpu")
    trainer = Trainer(cfg, log=quiet)
    assert (trainer.cfg.min_size, trainer.cfg.max_size, trainer.cfg.augment) == (800, 1333, "paper")
    seen = []
    record = lambda module, inputs, output: seen.append(tuple(inputs[0].shape))  # noqa: E731
    handle = trainer.model.backbone.register_forward_hook(record)
    trainer.fit()
    handle.remove()
    assert seen == [(2, 3, 800, 800)] * 3                   # 2 training batches, then the validation batch
    path = tmp_path / "run" / "checkpoint.pt"
    model, saved, _ = load_trained(path)
    assert (saved.min_size, model.min_size, model.max_size) == (800, 800, 1333)
    seen.clear()
    model.backbone.register_forward_hook(record)
    evaluate(model, saved, build_data(saved, with_train=False))
    predict(model, saved, torch.randint(0, 256, (3, 100, 250), dtype=torch.uint8))
    assert seen == [(2, 3, 800, 800), (1, 3, 544, 1344)]  # 100x250 -> 533x1333 (long side capped), padded to 32
    Trainer(cfg, resume=path, log=quiet)                    # the default resolves to the same size
    with pytest.raises(CheckpointError, match="min_size: checkpoint 800, now 640"):
        Trainer(dataclasses.replace(cfg, min_size=640), resume=path, log=quiet)


# ---------------------------------------------------------------- non-finite weights and damaged checkpoints

def _break_weights_after_the_epochs_last_step(trainer):
    """Set a weight to inf after the last optimiser step of an epoch: no forward pass sees it before saving."""
    step = trainer._optimizer_step

    def step_then_break():
        step()
        if trainer.batch_in_epoch == trainer.batches_per_epoch:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("inf"))
    trainer._optimizer_step = step_then_break


def test_weights_that_become_nan_are_never_saved(tmp_path):
    trainer = Trainer(tiny(tmp_path, eval_every=2), log=quiet)        # no validation loss after epoch 1
    _break_weights_after_the_epochs_last_step(trainer)
    with pytest.raises(NonFiniteLossError,
                       match="weights became nan/inf .*head.weight.*no checkpoint had been written"):
        trainer.fit()
    assert os.listdir(tmp_path / "run") == []


def test_non_finite_weights_keep_the_last_checked_checkpoint_and_never_call_an_unchecked_one_good(tmp_path):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    before = sha256(path)
    resumed = Trainer(tiny(tmp_path), resume=path, log=quiet)
    _break_weights_after_the_epochs_last_step(resumed)
    with pytest.raises(NonFiniteLossError, match=r"the validation loss became nan after step 8 \(epoch 2\); stopped "
                                                 r"without saving.*last good checkpoint .*\(epoch 1\) is unchanged"):
        resumed.fit()
    assert sha256(path) == before
    diverging = Trainer(tiny(tmp_path, epochs=3, lr=1e30, warmup_epochs=0, clip_grad=0.0), log=quiet)
    with pytest.raises(NonFiniteLossError) as stopped:                 # the checkpoint on disk is not its own
        diverging.fit()
    assert "good" not in str(stopped.value) and "not checked by this one, is unchanged" in str(stopped.value)
    assert sha256(path) == before


def _damage(tmp_path, change, name="damaged.pt"):
    """A copy of a good checkpoint with ``change(checkpoint)`` applied, written as torch.save would."""
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    change(checkpoint)
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def _set(key, value):
    def change(checkpoint):
        target = checkpoint
        *parents, last = key.split("/")
        for parent in parents:
            target = target[parent]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


def _nan_weight(checkpoint):
    checkpoint["model"]["head.weight"][0, 0] = float("nan")


def _other_optimizer_moments(checkpoint):
    checkpoint["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)


@pytest.mark.parametrize("change, message", [
    (_set("config", KeyError), "'config' should be a dict of settings, got none"),
    (_set("config", [1, 2]), "'config' should be a dict of settings, got list"),
    (_set("config/embed_dim", "8"), "embed_dim: '8' \\(expected int \\| None\\)"),
    (_set("config/epochs", "ten"), "epochs: 'ten' \\(expected int\\)"),
    (_set("config/depths", "abc"), "depths: 'abc'"),
    (_set("config/embed_dim", 16), "do not match the cls asmlp_tiny model .*shape mismatch: patch_embed.proj.weight"),
    (_set("model/head.bias", KeyError), "missing from checkpoint \\(1\\): head.bias"),
    (_set("classes", ["circle"]), "'classes' should be a list of 3 names"),
    (_nan_weight, "1 weight tensor\\(s\\) hold NaN or inf \\(head.weight\\)"),
    (_set("model", {"head.weight": [1.0]}), "'model' entry is not a state dict"),
    (_set("category_ids", [1, 1, 2]), "'category_ids' should be None or 3 distinct ids >= 0"),
])
def test_damaged_checkpoints_are_refused_by_load_resume_and_say_what_is_wrong(tmp_path, change, message):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    path = _damage(tmp_path, change)
    saved = load_checkpoint(path).get("config")
    same = dict(embed_dim=saved["embed_dim"]) if isinstance(saved, dict) and saved.get("embed_dim") == 16 else {}
    for load in (lambda: load_trained(path), lambda: Trainer(tiny(tmp_path, **same), resume=path, log=quiet)):
        with pytest.raises(CheckpointError, match="(?s)damaged or inconsistent: .*" + message):
            load()


@pytest.mark.parametrize("change, message", [
    (_set("optimizer", KeyError), "'optimizer' \\(missing\\)"),
    (_set("scheduler", KeyError), "'scheduler' \\(missing\\)"),
    (_set("rng", KeyError), "'rng' \\(missing\\)"),
    (_set("rng/cpu", torch.zeros(1, 3, dtype=torch.uint8)), "random generator state does not load"),
    (_set("world_size", "1"), "'world_size' \\(expected int, got str\\)"),
    (_set("batch_in_epoch", 99), "position \\(epoch 1, batch 99\\) does not fit"),
    (_set("step", 10**6), "its step count \\(not 4\\)"),                # 1 epoch of 4 steps
    (_set("epoch_totals", torch.tensor([float("nan"), 0.0, 0.0], dtype=torch.float64)), "3 finite epoch totals"),
    (_other_optimizer_moments, "AdamW exp_avg of shape \\(5,\\)"),
])
def test_resume_from_a_checkpoint_without_usable_training_state_is_refused_and_leaves_it(tmp_path, change, message):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    path = _damage(tmp_path, change, name="run/checkpoint.pt")             # in place, where resume would save
    before = sha256(path)
    with pytest.raises(CheckpointError, match="damaged or inconsistent: .*" + message):
        Trainer(tiny(tmp_path), resume=path, log=quiet).fit()
    assert sha256(path) == before
    load_trained(path)                                                     # evaluate/predict need none of it


def test_metrics_jsonl_is_strict_json_with_null_for_nan(tmp_path):
    trainer = Trainer(tiny(tmp_path), log=quiet)
    trainer.history = [{"epoch": 1, "train_loss": 0.5, "val_loss": float("nan"), "AP": float("inf")}]
    trainer._write_metrics()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows == [{"epoch": 1, "train_loss": 0.5, "val_loss": None, "AP": None}]


@pytest.mark.parametrize("overrides, message", [
    (dict(device="gpu"), "device must be auto, cpu, cuda or cuda:N"),
    (dict(image_size=1), "cls: image_size must be >= 4, got 1: the model cuts the image into 4x4 patches"),
    (dict(task="seg", crop_size=3, mixup=0.0, cutmix=0.0), "seg: crop_size must be >= 4"),
    (dict(warmup_epochs=float("nan")), "warmup_epochs must be a finite number, got nan"),
    (dict(epochs=2, warmup_epochs=2.5), "warmup_epochs must be at most epochs=2, got 2.5: the lr would still be"),
    (dict(mixup=float("nan")), "mixup must be a finite number"),
    (dict(cutmix=float("inf")), "cutmix must be a finite number"),
    (dict(workers=-1), "workers must be >= 0"),
])
def test_more_bad_settings_raise_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny(tmp_path, **overrides), log=quiet)


def test_unusable_output_folder_is_refused_before_data_and_model_are_built(tmp_path, monkeypatch):
    monkeypatch.setattr("asmlp_min.engine.trainer.build_data", lambda *a, **k: pytest.fail("built data first"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--output .*file' is a file, not a folder"):
        Trainer(tiny(tmp_path, "file"), log=quiet)
    with pytest.raises(ValueError, match="a part of the path is a file"):
        Trainer(tiny(tmp_path, "file/run"), log=quiet)


def test_a_run_folder_lock_names_its_holder_refuses_a_second_run_and_is_removed_after(tmp_path, monkeypatch):
    """Each open of the lock file is its own flock, so one process can play both runs (tests/test_cli.py uses two)."""
    lock = tmp_path / "run" / ".train.lock"
    lock.parent.mkdir()
    with run_folder_lock(lock.parent):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"run is in use by another training run \\(process {os.getpid()}, "
                                             f"lock file .*run/.train.lock\\): wait for it .* choose another --output"):
            with run_folder_lock(lock.parent):
                pass
        monkeypatch.setattr("asmlp_min.engine.trainer.build_data", lambda *a, **k: pytest.fail("built data first"))
        with pytest.raises(ValueError, match="in use by another training run"):
            Trainer(tiny(tmp_path), log=quiet)
        monkeypatch.undo()
    assert not lock.exists()
    lock.write_text("4194305\n")                               # a lock file its process left: nobody holds it
    Trainer(tiny(tmp_path, epochs=1), log=quiet).fit()
    assert sorted(p.name for p in lock.parent.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl"]


def test_coco_category_only_in_training_is_refused_when_the_data_is_built(tmp_path):
    from asmlp_min.data.shapes import export_shapes
    for split in ("train", "val"):
        export_shapes(tmp_path, task="det", n=2, split=split, seed=3, image_size=64)
    ann = tmp_path / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    coco["categories"].append({"id": 7, "name": "star"})
    ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances_train.json and .*instances_val.json list different 'categories' "
                                         r"\(only in train: id 7 'star'; only in val: none\)"):
        build_data(TrainConfig(task="det", data=str(tmp_path)).resolved())


def test_image_folder_with_other_classes_in_train_and_val_names_them(tmp_path):
    from PIL import Image
    for split, classes in (("train", ["circle", "square"]), ("val", ["circle", "star"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    with pytest.raises(ValueError, match="only in train: square; only in val: star"):
        build_data(TrainConfig(task="cls", data=str(tmp_path)).resolved())


# ---------------------------------------------------------------- COCO category ids with gaps

GAP_IDS = {1: 1, 2: 3, 3: 90}                                  # shapes' ids 1, 2, 3 -> 1, 3, 90 (COCO: 1..90, gaps)


def gap_coco(root, categories=GAP_IDS, splits=(("train", 4), ("val", 2))):
    """export_shapes' COCO folder with its category ids renamed by ``categories`` in both JSON files (export_shapes
    keeps files it wrote before, so call it again only with the identity or on a fresh folder)."""
    from asmlp_min.data.shapes import CATEGORIES, export_shapes
    for split, n in splits:
        path = export_shapes(root, task="det", n=n, split=split, seed=3, image_size=64)
        coco = json.loads(path.read_text())
        coco["categories"] = [{**c, "id": categories[c["id"]]} for c in CATEGORIES]
        coco["annotations"] = [{**a, "category_id": categories[a["category_id"]]} for a in coco["annotations"]]
        path.write_text(json.dumps(coco))
    return root


def gap_det_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(task="det", data=str(tmp_path / "coco"), output=str(tmp_path / "run"), epochs=1, batch_size=2,
                  min_size=64, embed_dim=8, depths=(1, 1, 1, 1), head_channels=16, drop_path=0.0, device="cpu")
    return TrainConfig(**{**values, **overrides})


def test_coco_category_ids_with_gaps_are_labels_1_to_k_for_the_detector_and_ids_again_for_cocoeval(tmp_path,
                                                                                                   monkeypatch):
    """With categories {1, 3, 90} the detector has 3 classes, learns labels 1..3, and its labels reach COCOeval as
    1, 3, 90 (not 1..90 classes of which 87 are no category, whose predictions COCOeval refuses)."""
    import asmlp_min.metrics
    gap_coco(tmp_path / "coco")
    trainer = Trainer(gap_det_config(tmp_path), log=quiet)
    assert trainer.cfg.num_classes == 3 and trainer.data.classes == ["circle", "square", "triangle"]
    ann = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    for i in range(len(trainer.data.train)):                  # label k is the k-th smallest id: 1 -> 1, 3 -> 2, 90 -> 3
        ids = [a["category_id"] for a in ann["annotations"] if a["image_id"] == trainer.data.train.ids[i]]
        assert trainer.data.train[i][1]["labels"].tolist() == [{1: 1, 3: 2, 90: 3}[c] for c in ids]
    with torch.no_grad():                                     # every class scores high: detections of all 3 labels
        trainer.model.head.cls_logits.bias.fill_(8.0)
    scored = []
    real = asmlp_min.metrics.coco_evaluate
    monkeypatch.setattr(asmlp_min.metrics, "coco_evaluate",
                        lambda gt, dets, *a: scored.append({int(x) for d in dets for x in d["labels"]}) or
                        real(gt, dets, *a))
    trainer.fit()
    assert scored == [{1, 3, 90}] and 0 <= trainer.history[-1]["AP"] <= 1
    path = tmp_path / "run" / "checkpoint.pt"
    saved = load_checkpoint(path)
    assert saved["classes"] == ["circle", "square", "triangle"] and saved["category_ids"] == [1, 3, 90]
    model, cfg, _ = load_trained(path)
    assert model.num_classes == 3
    evaluate(model, cfg, build_data(cfg, with_train=False))
    assert scored[-1] == {1, 3, 90}
    Trainer(gap_det_config(tmp_path), resume=path, log=quiet)              # the same data resumes


def test_train_and_val_with_other_categories_are_refused_naming_them(tmp_path):
    gap_coco(tmp_path / "coco", splits=(("val", 2),))
    gap_coco(tmp_path / "coco", {1: 1, 2: 3, 3: 91}, splits=(("train", 4),))
    with pytest.raises(ValueError, match="instances_train.json and .*instances_val.json list different 'categories' "
                                         "\\(only in train: id 91 'triangle'; only in val: id 90 'triangle'\\)"):
        build_data(gap_det_config(tmp_path).resolved())


def test_resume_needs_the_same_category_names_label_by_label_not_the_same_ids(tmp_path):
    gap_coco(tmp_path / "coco", {1: 1, 2: 2, 3: 3})
    Trainer(gap_det_config(tmp_path, epochs=2, stop_at_epoch=1), log=quiet).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    before = sha256(path)
    annotations = tmp_path / "coco" / "annotations"
    for split in ("train", "val"):                              # circle and square swap names
        coco = json.loads((annotations / f"instances_{split}.json").read_text())
        for category in coco["categories"][:2]:
            category["name"] = {"circle": "square", "square": "circle"}[category["name"]]
        (annotations / f"instances_{split}.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="label 0 is 'circle' in the checkpoint, 'square' in the data"):
        Trainer(gap_det_config(tmp_path, epochs=2), resume=path, log=quiet)
    assert sha256(path) == before
    gap_coco(tmp_path / "coco")                                 # the same names under ids 1, 3, 90
    Trainer(gap_det_config(tmp_path, epochs=2), resume=path, log=quiet).fit()
    assert load_checkpoint(path)["category_ids"] == [1, 3, 90]


# ---------------------------------------------------------------- the schedule on resume

@pytest.mark.parametrize("change, flag", [
    (dict(lr=1e30), "--lr 1e\\+30 \\(the checkpoint's: 0.001\\)"),
    (dict(warmup_epochs=0.25), "--warmup-epochs 0.25 \\(the checkpoint's: 0.5\\)"),
    (dict(weight_decay=0.5), "--weight-decay 0.5"),
    (dict(schedule="poly"), "--schedule poly"),
])
def test_resume_refuses_a_new_learning_rate_schedule_and_leaves_the_checkpoint(tmp_path, change, flag):
    """The saved optimiser and scheduler state carry lr and weight decay and would win over new values, while the
    config saved next would claim the new ones: refused, with the flag named and what to do."""
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    before = sha256(path)
    with pytest.raises(CheckpointError, match=f"cannot resume from .*checkpoint.pt with {flag}.*--pretrained"):
        Trainer(tiny(tmp_path, **change), resume=path, log=quiet)
    assert sha256(path) == before
    Trainer(tiny(tmp_path, lr=1e-3, warmup_epochs=0.5), resume=path, log=quiet).fit()   # the same values resume
    assert load_checkpoint(path)["epoch"] == 2


def test_resume_takes_the_variants_own_values_spelled_out_and_refuses_a_new_pretrained(tmp_path):
    """Flags equal to what the variant uses anyway (asmlp_tiny's shift size 5, its drop path) change nothing and
    resume; another value is named beside the one in effect. A --pretrained file would be overridden by the
    resumed weights, yet saved as the run's start: refused."""
    def run(**change):
        return tiny(tmp_path, **{"drop_path": None, **change})   # None: the variant's drop path
    Trainer(run(stop_at_epoch=1), log=quiet).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    own = MODEL_CONFIGS["asmlp_tiny"]
    with pytest.raises(CheckpointError, match="shift_size: checkpoint 5, now 3"):
        Trainer(run(shift_size=3), resume=path, log=quiet)
    with pytest.raises(CheckpointError, match=f"with --drop-path 0.5 \\(the checkpoint's: {own.drop_path_rate}\\)"):
        Trainer(run(drop_path=0.5), resume=path, log=quiet)
    with pytest.raises(CheckpointError, match="with --pretrained .*checkpoint.pt \\(the checkpoint's: None\\)"):
        Trainer(run(pretrained=str(path)), resume=path, log=quiet)
    Trainer(run(shift_size=own.shift_size, drop_path=own.drop_path_rate), resume=path, log=quiet).fit()
    assert load_checkpoint(path)["epoch"] == 2


def test_an_ade20k_run_saved_before_its_classes_had_names_still_fits_ade20k():
    from asmlp_min.data import ade20k
    from asmlp_min.engine.runs import _check_classes
    before = {"classes": [str(k) for k in range(150)]}              # how such checkpoints named the classes
    _check_classes(before, list(ade20k.CLASSES), "old.pt")           # accepted: the same 150 labels
    with pytest.raises(ValueError, match="only in the checkpoint: 0, 1, 2") as refused:
        _check_classes({**before, "config": {"task": "seg"}}, [f"class {k}" for k in range(150)], "old.pt")
    assert "10, 11, ... (138 more); only in the data: class 0, class 1" in str(refused.value)   # not 150 names
    assert str(refused.value).endswith("use data with masks of the same classes (ADE20K's 150, or --num-classes with "
                                       "train/val folders)")
    with pytest.raises(ValueError, match="only in the checkpoint: 2; only in the data: wall"):
        _check_classes({"classes": ["0", "1", "2"]}, ["0", "1", "wall"], "old.pt")


class _BadAt(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 5:
            raise ValueError("/data/x.png: unreadable or truncated image")
        return torch.zeros(1)


def test_a_data_error_ends_the_loaders_workers_before_it_is_raised():
    """Left alive, they are stopped at exit after torch's SIGCHLD handler is back, which then prints
    'DataLoader worker ... is killed by signal: Terminated' from an atexit callback after the one-line message."""
    import multiprocessing
    loader = torch.utils.data.DataLoader(_BadAt(), batch_size=2, num_workers=2)
    with pytest.raises(DataError, match="unreadable"):
        for _ in _loaded(loader):
            pass
    assert multiprocessing.active_children() == []


def test_a_classification_folder_of_one_class_is_refused(tmp_path):
    """Its loss is 0 from the first step and its top-1 1.0: a run that looks perfect and learned nothing."""
    for split in ("train", "val"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "one" / split / "cat" / "a.png")
    with pytest.raises(ValueError, match=r"needs two classes or more, and .*train has one folder, 'cat': add a"):
        build_data(tiny(tmp_path, data=str(tmp_path / "one"), train_size=None, val_size=None).resolved())


def test_a_checkpoint_of_another_process_count_is_refused_with_the_ways_on(tmp_path):
    Trainer(tiny(tmp_path, stop_at_epoch=1), log=quiet).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    torch.save({**load_checkpoint(path), "world_size": 2}, path)
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), this run has 1: resume with as many .*, "
                                              rf"or start a new run from these weights with --pretrained "
                                              rf"{re.escape(str(path))}"):
        Trainer(tiny(tmp_path), resume=path, log=quiet)
