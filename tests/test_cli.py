"""``asmlp-min``: every subcommand on tiny data, --help for every flag, and one-line errors for user mistakes."""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import torch

from asmlp_min.checkpoint import CheckpointError, load_checkpoint
from asmlp_min import cli
from asmlp_min.cli import build_parser, main
from asmlp_min.engine.config import SIZE_FIELD, TrainConfig
from asmlp_min.data.shapes import make_scene, scene_rng
from tests.test_engine import assert_same_state, gap_coco, without_times

TINY = ["--epochs=1", "--batch-size=4", "--train-size=8", "--val-size=4", "--embed-dim=8", "--depths=1,1,1,1",
        "--image-size=32", "--device=cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_for(task: str, folder: bool = False) -> list[str]:
    """TINY with the task's own input-size flag (cls --image-size, det --min-size, seg --crop-size); for a data
    folder without the scene counts, which apply to --data shapes only."""
    sized = [a.replace("--image-size", "--" + SIZE_FIELD[task].replace("_", "-")) for a in TINY]
    return [a for a in sized if not (folder and a.startswith(("--train-size", "--val-size")))]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run per task, shared by the tests below (cls, det, seg: a few seconds each)."""
    root = tmp_path_factory.mktemp("runs")
    for task, extra in (("cls", []), ("det", ["--head-channels=16", "--min-size=64"]),
                        ("seg", ["--head-channels=16"])):
        assert main(["train", task, *tiny_for(task), *extra, f"--output={root / task}"]) == 0
    return root


@pytest.fixture
def reads(monkeypatch):
    """The paths torch.load is called with during the test: each read of a checkpoint file, in order."""
    paths, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: paths.append(path) or torch_load(path, *args,
                                                                                                       **kwargs))
    return paths


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(make_scene(scene_rng(7, "test", 0), 64).image).save(path)
    return path


def test_every_subcommand_and_flag_has_help(capsys):
    commands = subparsers()
    assert set(commands) == {"demo", "train", "evaluate", "predict", "info", "export", "bench"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: asmlp-min {name}")


@pytest.mark.parametrize("depths", ["0,2", "two", ""])
def test_depths_that_are_not_block_counts_are_refused_by_argparse(depths, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--depths", depths])
    assert exit_info.value.code == 2
    assert f"expected block counts >= 1 separated by commas, e.g. 2,2,6,2, got {depths!r}" in capsys.readouterr().err


def test_train_help_states_task_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "cls 0.001" in text and "--nproc_per_node" in text and "shapes" in text


def test_image_size_help_gives_the_shapes_and_the_folder_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())              # argparse wraps lines anywhere
    assert "cls 64, det 128, seg 128 on shapes" in text
    assert "cls 224, det 800, seg 512 on a folder" in text


def test_every_train_setting_has_exactly_one_flag_generated_from_its_field():
    """The train flags are TrainConfig's fields (name -> --kebab-name, help from the field), plus --resume and
    --overwrite, which concern the command, not the run."""
    train = subparsers()["train"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    dests = {a.dest for a in train._actions if a.dest not in (argparse.SUPPRESS, "help")}
    assert dests == set(fields) | {"resume", "overwrite"}
    for action in train._actions:
        if action.dest in fields and action.dest != "task":
            assert action.option_strings[0] == "--" + action.dest.replace("_", "-")
            assert action.help.startswith(fields[action.dest].metadata["help"])


@pytest.mark.parametrize("argv, drop_path, shift_size", [
    (["train", "cls"], "asmlp_tiny: 0.2", "asmlp_tiny: 5"),
    (["train", "seg"], "asmlp_tiny: 0.3", "asmlp_tiny: 5"),                    # mmseg's drop path for T
    (["train", "seg", "--model=asmlp_small"], "asmlp_small: 0.3", "asmlp_small: 3"),   # and shift 3 for S
    (["train"], "asmlp_tiny: cls 0.2, det 0.2, seg 0.3", "asmlp_tiny: 5"),
])
def test_train_help_shows_the_default_of_the_task_and_variant_given(argv, drop_path, shift_size, capsys):
    from asmlp_min.segmentation import SEG_BACKBONE_DEFAULTS
    assert SEG_BACKBONE_DEFAULTS["asmlp_small"] == dict(shift_size=3, drop_path_rate=0.3)   # the oracle
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"stochastic depth rate (default: the variant's, {drop_path})" in text
    assert f"the axial shift size (odd) (default: the variant's, {shift_size})" in text


def test_train_help_gives_each_task_its_own_size_flag(capsys):
    for task, shown in (("cls", "--image-size IMAGE_SIZE cls: the square input size in pixels (the paper's crop) "
                                "(default: 64 on shapes, 224 on a folder)"),
                        ("det", "(default: 128 on shapes, 800 on a folder)"),
                        ("seg", "--crop-size CROP_SIZE seg: the square training crop in pixels (default: 128 on "
                                "shapes, 512 on a folder)")):
        with pytest.raises(SystemExit):
            main(["train", task, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert shown in text and "(not a " + task + " setting)" in text


@pytest.mark.parametrize("task, flag, applies_to", [
    ("det", "--label-smoothing=0.2", "cls"), ("seg", "--cutmix=1", "cls"), ("cls", "--head-channels=64", "det/seg"),
    ("det", "--class-weight=balanced", "seg")])
def test_a_setting_of_another_task_is_refused_and_the_tasks_help_says_so(task, flag, applies_to, capsys, tmp_path,
                                                                         monkeypatch):
    """Set, it would change nothing in this task's run yet be saved in its checkpoint as if it had."""
    monkeypatch.chdir(tmp_path)  # where the run folder would go
    name = flag.split("=")[0]
    with pytest.raises(SystemExit):
        main(["train", task, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    described = re.search(re.escape(name) + r" [A-Z_]+ (.*?) --[a-z]", help_text)[1]   # its help, not the usage line
    assert described.endswith(f"(not a {task} setting)")
    size = {"cls": "--image-size=32", "det": "--min-size=32", "seg": "--crop-size=32"}[task]
    assert main(["train", task, flag, *TINY[:-2], size, "--device=cpu"]) == 2
    field = name[2:].replace("-", "_")
    assert f"{task}: {field} ({name}) applies to {applies_to} only; leave it out for {task}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task, new_flag", [("det", "--min-size"), ("seg", "--crop-size")])
def test_image_size_on_det_or_seg_is_refused_naming_the_tasks_own_flag(task, new_flag, capsys):
    assert main(["train", task, "--image-size=64", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{task}: image_size (--image-size) applies to cls only; {task} sets its input size with {new_flag}" in err


def test_train_writes_a_run_folder_and_refuses_to_overwrite_it(runs, capsys):
    for task in ("cls", "det", "seg"):
        assert {p.name for p in (runs / task).iterdir()} == {"checkpoint.pt", "metrics.jsonl", "curves.png"}
    row = json.loads((runs / "seg" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["mIoU"] <= 1
    assert main(["train", "cls", *TINY, f"--output={runs / 'cls'}"]) == 2
    assert "exists: continue it with --resume" in capsys.readouterr().err


def test_a_suggested_command_pastes_back_whole_when_its_path_has_a_space(tmp_path, capsys, monkeypatch):
    import shlex

    import asmlp_min.files
    from asmlp_min.files import shell_word
    out = tmp_path / "my runs" / "été"
    assert main(["train", "cls", *TINY, f"--output={out}"]) == 0
    assert main(["train", "cls", *TINY, f"--output={out}"]) == 2
    suggested = capsys.readouterr().err.split("continue it with ", 1)[1].split(", or start over")[0]
    assert shlex.split(suggested) == ["--resume", str(out / "checkpoint.pt")]
    assert shell_word("runs/cls/checkpoint.pt") == "runs/cls/checkpoint.pt"      # no quotes where none are needed
    monkeypatch.setattr(asmlp_min.files, "WINDOWS", True)
    assert shell_word(r"C:\my runs\checkpoint.pt") == r'"C:\my runs\checkpoint.pt"'  # cmd.exe and PowerShell


def test_resume_reuses_the_checkpoint_settings_and_reads_the_checkpoint_once(runs, tmp_path, capsys, reads):
    assert main(["train", "cls", *TINY[1:], "--epochs=2", "--stop-at-epoch=1", f"--output={tmp_path}"]) == 0
    reads.clear()
    assert main(["train", "--resume", str(tmp_path / "checkpoint.pt")]) == 0   # no other flag needed
    assert [Path(read) for read in reads] == [tmp_path / "checkpoint.pt"]     # by the flags' check, not again
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    for task in ("det", "seg"):
        assert main(["train", task, "--resume", str(tmp_path / "checkpoint.pt")]) == 2
        assert f"it was trained for task 'cls', now '{task}'" in capsys.readouterr().err


def test_resume_into_another_run_folder_is_refused_and_leaves_that_run(runs, tmp_path, capsys):
    assert main(["train", "cls", *TINY[1:], "--epochs=2", "--stop-at-epoch=1", f"--output={tmp_path / 'a'}"]) == 0
    other = runs / "cls" / "checkpoint.pt"
    before = hashlib.sha256(other.read_bytes()).hexdigest()
    assert main(["train", "--resume", str(tmp_path / "a" / "checkpoint.pt"), f"--output={runs / 'cls'}"]) == 2
    assert f"already holds a run ({other}); resuming" in capsys.readouterr().err
    assert hashlib.sha256(other.read_bytes()).hexdigest() == before
    # an empty folder is fine, and so is the checkpoint's own folder named explicitly
    assert main(["train", "--resume", str(tmp_path / "a" / "checkpoint.pt"), f"--output={tmp_path / 'b'}"]) == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    assert main(["train", "--resume", str(tmp_path / "a" / "checkpoint.pt"), f"--output={tmp_path / 'a'}"]) == 0
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["epoch"] == 2


def test_resume_with_another_recipe_is_refused_and_the_checkpoint_kept(tmp_path, capsys):
    """The checkpoint's schedule would win over the flag, or regularisation and augmentation would change midway,
    while the saved config recorded the flag for the whole run: refused. So is a switch between --workers 0 and 1+,
    whose augmentation draws from another random stream."""
    assert main(["train", "cls", *TINY[1:], "--epochs=2", "--stop-at-epoch=1", f"--output={tmp_path}"]) == 0
    path = tmp_path / "checkpoint.pt"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for flag, value, shown in (("--lr", "1e30", "1e+30"), ("--warmup-epochs", "0", "0.0"),
                               ("--drop-path", "0.5", "0.5"), ("--augment", "none", "none"), ("--mixup", "0.8", "0.8"),
                               ("--clip-grad", "0.1", "0.1"), ("--label-smoothing", "0.5", "0.5"),
                               ("--workers", "1", "1")):
        assert main(["train", "--resume", str(path), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"with {flag} {shown} (the checkpoint's: " in err and "Leave the flag out" in err, flag
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert main(["train", "--resume", str(path), "--lr", "1e-3"]) == 0          # the value it has: resumes
    assert load_checkpoint(path)["config"]["lr"] == 1e-3 and load_checkpoint(path)["epoch"] == 2


def test_resume_does_not_need_the_pretrained_file_and_continues_bit_for_bit(runs, image, tmp_path):
    """A resume overwrites every weight from its checkpoint: the --pretrained file is not read again (it may be gone),
    nor by evaluate and predict."""
    start = tmp_path / "start.pt"
    shutil.copy(runs / "cls" / "checkpoint.pt", start)
    pretrained = ["train", "cls", *TINY[1:], "--epochs=2", f"--pretrained={start}"]
    assert main([*pretrained, f"--output={tmp_path / 'straight'}"]) == 0
    assert main([*pretrained, "--stop-at-epoch=1", f"--output={tmp_path / 'split'}"]) == 0
    start.unlink()
    checkpoint = tmp_path / "split" / "checkpoint.pt"
    assert main(["train", "--resume", str(checkpoint)]) == 0
    resumed, straight = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    assert_same_state(resumed["model"], straight["model"])
    assert without_times(resumed["metrics"]) == without_times(straight["metrics"])
    assert main(["evaluate", "--checkpoint", str(checkpoint)]) == 0
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), f"--output={tmp_path / 'predicted'}"]) == 0


def cls_folder(root: Path) -> Path:
    from asmlp_min.data.shapes import export_shapes
    for split in ("train", "val"):
        export_shapes(root, task="cls", n=8, split=split, seed=4)
    return root


def test_a_relative_data_folder_is_stored_absolute_for_evaluate_and_resume_from_another_folder(tmp_path, monkeypatch,
                                                                                              capsys):
    cls_folder(tmp_path / "ifold")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "cls", *tiny_for("cls", folder=True)[1:], "--epochs=2", "--stop-at-epoch=1", "--data=ifold",
            "--output=runs/rel"]
    assert main(argv) == 0
    assert load_checkpoint(tmp_path / "runs" / "rel" / "checkpoint.pt")["config"]["data"] == str(tmp_path / "ifold")
    (tmp_path / "elsewhere" / "ifold").mkdir(parents=True)    # a folder of the same name here is not the data
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", "../runs/rel/checkpoint.pt"]) == 0
    assert f"cls asmlp_tiny (embed_dim 8, depths 1,1,1,1) on {tmp_path / 'ifold'} (8 images)" in capsys.readouterr().out
    assert main(["train", "--resume", "../runs/rel/checkpoint.pt"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "rel" / "checkpoint.pt")["epoch"] == 2


def test_a_checkpoint_holding_a_relative_data_folder_says_where_it_came_from(tmp_path, monkeypatch, capsys):
    """Checkpoints written before data folders were stored absolute hold the path as typed."""
    cls_folder(tmp_path / "ifold")
    path = tmp_path / "run" / "checkpoint.pt"
    assert main(["train", "cls", *tiny_for("cls", folder=True)[1:], "--epochs=2", "--stop-at-epoch=1",
                 f"--data={tmp_path / 'ifold'}", f"--output={path.parent}"]) == 0
    checkpoint = load_checkpoint(path)
    checkpoint["config"]["data"] = "ifold"                     # as typed in tmp_path
    torch.save(checkpoint, path)
    monkeypatch.chdir(path.parent)
    for argv in (["evaluate", "--checkpoint", "checkpoint.pt"], ["train", "--resume", "checkpoint.pt"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert ("checkpoint.pt was trained on the data folder 'ifold', which is relative to the folder that training "
                f"ran in, and {path.parent} has no such folder: pass --data with the folder's path") in err, argv
        assert main([*argv, "--data=../ifold"]) == 0
    assert load_checkpoint(path)["epoch"] == 2
    checkpoint["config"]["data"] = r"C:\Users\me\ifold"      # trained on Windows: absolute there, not relative
    torch.save(checkpoint, path)
    assert main(["evaluate", "--checkpoint", "checkpoint.pt"]) == 2
    assert "data folder 'C:\\\\Users\\\\me\\\\ifold', which does not exist here: pass --data" in capsys.readouterr().err


def test_a_checkpoint_trained_on_a_gpu_is_evaluated_without_one_and_resumes_where_asked(runs, image, tmp_path,
                                                                                        monkeypatch, capsys):
    """evaluate and predict run on the device of this machine (or --device); a resume keeps the run's device unless
    --device says otherwise, and says so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # this machine has no GPU
    path = tmp_path / "run" / "checkpoint.pt"
    assert main(["train", "cls", *TINY[1:], "--epochs=2", "--stop-at-epoch=1", f"--output={path.parent}"]) == 0
    checkpoint = load_checkpoint(path)
    checkpoint["config"]["device"] = "cuda"                    # as trained on a GPU machine
    torch.save(checkpoint, path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 0
    assert main(["predict", "--checkpoint", str(path), str(image), f"--output={tmp_path / 'predicted'}"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} was trained on cuda, which a resume keeps" in err and "pass --device cpu" in err
    assert main(["train", "--resume", str(path), "--device=cpu"]) == 0
    assert load_checkpoint(path)["epoch"] == 2


def test_a_resume_of_a_device_auto_run_keeps_the_device_the_run_trained_on(tmp_path, monkeypatch, capsys):
    """--device auto is resolved when a run starts; its resume on a machine with other devices continues on the
    run's own (the generator states saved show which), not on what auto would pick there."""
    path = tmp_path / "run" / "checkpoint.pt"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "cls", *TINY[1:-1], "--epochs=3", "--stop-at-epoch=1", f"--output={path.parent}"]) == 0
    checkpoint = load_checkpoint(path)
    assert TINY[-1] == "--device=cpu" and checkpoint["config"]["device"] == "auto" and set(checkpoint["rng"]) == {"cpu"}
    gpu_run = tmp_path / "gpu" / "checkpoint.pt"
    gpu_run.parent.mkdir()
    torch.save({**checkpoint, "rng": {**checkpoint["rng"], "cuda": torch.zeros(1, 16, dtype=torch.uint8)}}, gpu_run)
    capsys.readouterr()
    assert main(["train", "--resume", str(gpu_run)]) == 2              # auto here would be the CPU
    assert f"{gpu_run} was trained on cuda, which a resume keeps" in capsys.readouterr().err
    saved_device = cli._saved_device

    def on_a_gpu_machine(*args):                                       # auto would pick the GPU here
        with monkeypatch.context() as gpu:
            gpu.setattr(torch.cuda, "is_available", lambda: True)
            return saved_device(*args)
    monkeypatch.setattr(cli, "_saved_device", on_a_gpu_machine)
    assert main(["train", "--resume", str(path), "--stop-at-epoch=2"]) == 0
    assert (f"warning: {path} was trained on the CPU (--device auto on a machine without a GPU); the resume continues "
            "there, bit for bit: pass --device cuda to move it to the GPU") in capsys.readouterr().err
    assert load_checkpoint(path)["config"]["device"] == "cpu"


def test_evaluate_on_a_cpu_leaves_a_gpu_runs_mixed_precision_off_unless_asked(runs, tmp_path, monkeypatch):
    """--amp on a CPU means bfloat16, many times slower where the processor has no bfloat16 units: a run trained with
    AMP (float16 on its GPU) evaluates in float32 here unless --amp is passed."""
    import contextlib
    import asmlp_min.engine.inference as inference
    checkpoint = load_checkpoint(runs / "cls" / "checkpoint.pt")
    checkpoint["config"]["amp"] = True
    torch.save(checkpoint, tmp_path / "amp.pt")
    asked = []
    monkeypatch.setattr(inference, "_autocast", lambda device, amp: asked.append(amp) or contextlib.nullcontext())
    assert main(["evaluate", "--checkpoint", str(tmp_path / "amp.pt"), "--device=cpu"]) == 0
    assert set(asked) == {False}
    asked.clear()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "amp.pt"), "--device=cpu", "--amp"]) == 0
    assert set(asked) == {True}


def test_a_run_trained_with_many_workers_evaluates_on_a_smaller_machine(runs, tmp_path, monkeypatch):
    """evaluate has no --workers: a run's 9 workers become the 8 that a 2-CPU machine allows, not a refusal."""
    import asmlp_min.engine.data as engine_data
    import asmlp_min.engine.inference as inference
    checkpoint = load_checkpoint(runs / "cls" / "checkpoint.pt")
    checkpoint["config"]["workers"] = 9
    torch.save(checkpoint, tmp_path / "many.pt")
    monkeypatch.setattr(engine_data, "_usable_cpus", lambda: 2)
    asked, loader = [], inference._loader

    def in_process(dataset, batches, collate_fn, workers, *rest):   # the count asked for, loaded without processes
        asked.append(workers)
        return loader(dataset, batches, collate_fn, 0, *rest)
    monkeypatch.setattr(inference, "_loader", in_process)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "many.pt"), "--device=cpu"]) == 0
    assert asked == [8]


def test_a_second_training_into_a_busy_run_folder_is_refused_naming_the_process(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "asmlp_min", "train", "cls", *TINY, "--epochs=100000",
                              f"--output={run}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint.pt").exists():             # an epoch done: it is in its training loop
            assert first.poll() is None and time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.2)
        for argv in (["train", "cls", *TINY, "--overwrite", f"--output={run}"],
                     ["train", "--resume", str(run / "checkpoint.pt")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"{run} is in use by another training run (process {first.pid}, lock file" in err, err
            assert "choose another --output" in err
    finally:
        first.kill()
        first.wait()
    assert (run / ".train.lock").read_text() == f"{first.pid}\n"   # left behind by the killed run
    assert main(["train", "cls", *TINY, "--overwrite", f"--output={run}"]) == 0   # a dead process blocks nothing
    assert not (run / ".train.lock").exists()
    assert main(["train", "cls", *TINY, "--overwrite", f"--output={run}"]) == 0   # nor does a run that ended
    assert load_checkpoint(run / "checkpoint.pt")["config"]["epochs"] == 1


def test_detection_on_coco_category_ids_with_gaps_shows_names_and_scores_the_real_ids(runs, image, tmp_path,
                                                                                      capsys):
    """COCO 2017's ids run 1..90 with gaps; with ids {1, 3, 90} the model has 3 classes, prints their names and
    gives COCOeval the ids (it refuses any other). A checkpoint without 'category_ids' (older versions, whose
    labels were the ids) still loads where that holds, and is refused where it does not."""
    data = gap_coco(tmp_path / "coco")
    run = tmp_path / "run"
    assert main(["train", "det", f"--data={data}", *tiny_for("det", folder=True), "--head-channels=16", "--min-size=64",
                 f"--output={run}"]) == 0
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["classes"] == ["circle", "square", "triangle"] and checkpoint["category_ids"] == [1, 3, 90]
    checkpoint["model"]["head.cls_logits.bias"].fill_(8.0)       # every class scores high everywhere
    confident = tmp_path / "confident.pt"
    torch.save(checkpoint, confident)
    capsys.readouterr()
    assert main(["evaluate", "det", "--checkpoint", str(confident)]) == 0
    assert "AP50" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(confident), str(image), f"--output={tmp_path / 'out'}"]) == 0
    assert set(re.findall(r"(\S+) \d\.\d{3} box", capsys.readouterr().out)) == {"circle", "square", "triangle"}

    # older versions gave the detector one class per id up to the largest, and stored no 'category_ids'
    head = checkpoint["model"]["head.cls_logits.weight"]
    checkpoint["model"]["head.cls_logits.weight"] = head.new_zeros(90, *head.shape[1:])
    checkpoint["model"]["head.cls_logits.bias"] = head.new_zeros(90)
    checkpoint["config"]["num_classes"] = 90
    checkpoint["classes"] = [{1: "circle", 3: "square", 90: "triangle"}.get(i, str(i)) for i in range(1, 91)]
    del checkpoint["category_ids"]
    torch.save(checkpoint, tmp_path / "old.pt")
    assert main(["evaluate", "det", "--checkpoint", str(tmp_path / "old.pt")]) == 2
    err = capsys.readouterr().err
    assert "old.pt predicts 90 classes but the data has 3; it was written before COCO category ids were numbered " \
           "1..K, when the detector had one class per id up to the largest: train again on this data" in err
    assert main(["train", "--resume", str(tmp_path / "old.pt")]) == 2
    assert "written before COCO category ids were numbered 1..K" in capsys.readouterr().err
    shapes = load_checkpoint(runs / "det" / "checkpoint.pt")
    del shapes["category_ids"]
    torch.save(shapes, tmp_path / "old_shapes.pt")
    assert main(["evaluate", "det", "--checkpoint", str(tmp_path / "old_shapes.pt")]) == 0
    assert main(["predict", "--checkpoint", str(tmp_path / "old_shapes.pt"), str(image),
                 f"--output={tmp_path / 'out'}"]) == 0


def test_evaluate_and_predict_take_official_classification_weights(tmp_path, image, capsys):
    """An official classification .pth ({"model": state_dict}, head included) is scored on a class-folder tree at
    the paper's 224 eval size; the variant is read off the shapes. Oracle: the same weights in create_model, the
    val images through the eval transform, top-1 counted by hand."""
    from asmlp_min import create_model
    from asmlp_min.data import ImageFolderClassification
    from asmlp_min.data.transforms import classification_transforms
    torch.manual_seed(0)
    official = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 2, 1), num_classes=3).eval()
    path = tmp_path / "asmlp_x_patch4_shift5_224.pth"
    torch.save({"model": official.state_dict()}, path)
    data = cls_folder(tmp_path / "ifold")
    assert main(["evaluate", "--checkpoint", str(path), f"--data={data}", f"--json={tmp_path / 'm.json'}"]) == 0
    val = ImageFolderClassification(data / "val", transform=classification_transforms(False, 224))
    with torch.no_grad():
        logits = torch.cat([official(x[None]) for x, _ in val])
    labels = torch.tensor([label for _, label in val])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["val_loss"] == pytest.approx((logits.logsumexp(-1) - logits[range(8), labels]).mean().item(),
                                                rel=1e-5)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(path), str(image), f"--output={tmp_path / 'out'}"]) == 0
    assert re.search(r"scene.png: class \d 0\.\d{3}; class \d", capsys.readouterr().out)


def test_released_weights_that_evaluate_cannot_score_are_refused_saying_why(tmp_path, capsys):
    from asmlp_min import create_model
    data = cls_folder(tmp_path / "ifold")
    four = tmp_path / "four.pth"
    torch.save({"model": create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=4).state_dict()},
               four)
    backbone = tmp_path / "backbone.pth"
    torch.save({"model": create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=0).state_dict()},
               backbone)
    for argv, message in [
            ([f"--checkpoint={four}"], "holds released weights, which name no data: pass --data"),
            ([f"--checkpoint={four}", f"--data={data}"], "predicts 4 classes but .* has 3; use data of the same"),
            ([f"--checkpoint={backbone}", f"--data={data}"],
             "neither a training run's checkpoint.pt nor released AS-MLP weights with their head .* asmlp-min train "
             "--pretrained"),
            (["seg", f"--checkpoint={four}", f"--data={data}"], "holds a cls model, not seg")]:
        assert main(["evaluate", *argv]) == 2
        assert re.search(message, capsys.readouterr().err), argv


def test_an_official_mmseg_upernet_is_rebuilt_with_its_shift_and_evaluated(tmp_path):
    """An mmseg checkpoint states its shift only in meta["config"] (AS-MLP-S: 3): the rebuilt segmenter shifts by
    it and computes the file's function; evaluate scores it on a segmentation folder."""
    from asmlp_min.data.shapes import export_shapes
    from asmlp_min.engine import load_released
    from asmlp_min.segmentation import SemanticSegmenter
    torch.manual_seed(0)
    official = SemanticSegmenter("asmlp_small", num_classes=4, embed_dim=16, depths=(1, 1, 2, 1), channels=32,
                                 aux_channels=16).eval()
    path = tmp_path / "upernet_asmlp_s.pth"
    torch.save({"meta": {"config": "model = dict(backbone=dict(embed_dim=16, shift_size=3))"},
                "state_dict": official.state_dict()}, path)
    model, cfg, _ = load_released(path)
    assert (cfg.task, cfg.crop_size, cfg.num_classes) == ("seg", 512, 4)
    assert {m.shift_size for m in model.modules() if hasattr(m, "shift_size")} == {3}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), official(x))
    for split in ("train", "val"):
        export_shapes(tmp_path / "seg", task="seg", n=2, split=split, seed=3, image_size=64)
    assert main(["evaluate", f"--checkpoint={path}", f"--data={tmp_path / 'seg'}",
                 f"--json={tmp_path / 'm.json'}"]) == 0
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["mIoU"] <= 1


@pytest.mark.parametrize("aux_channels", [None, 24])
def test_an_mmseg_upernet_without_its_auxiliary_head_or_with_another_width_loads(tmp_path, image, aux_channels):
    """The auxiliary head only trains: a config with auxiliary_head=None saves none, another one other channels
    than half the decode head's. Both load, and compute the file's function."""
    from asmlp_min.engine import load_released
    from asmlp_min.segmentation import FCNHead, SemanticSegmenter
    torch.manual_seed(0)
    official = SemanticSegmenter("asmlp_tiny", num_classes=4, embed_dim=16, depths=(1, 1, 1, 1), channels=32,
                                 aux=aux_channels is not None, aux_channels=aux_channels or 16).eval()
    path = tmp_path / "upernet.pth"
    torch.save({"state_dict": official.state_dict()}, path)
    model, _, _ = load_released(path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), official(x))
    if aux_channels is None:
        assert model.auxiliary_head is None
    else:
        assert isinstance(model.auxiliary_head, FCNHead)
        assert torch.equal(model.auxiliary_head.conv_seg.weight, official.auxiliary_head.conv_seg.weight)
    assert main(["predict", f"--checkpoint={path}", str(image), f"--output={tmp_path / 'out'}"]) == 0
    state = official.state_dict()
    state["auxiliary_head.convs.0.conv.weight"] = torch.zeros(24, 7, 3, 3)    # not the stage's 64 channels
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="auxiliary_head.convs.0.conv.weight"):
        load_released(path)


def test_evaluate_prints_and_writes_metrics(runs, tmp_path, capsys):
    checkpoint = str(runs / "cls" / "checkpoint.pt")
    assert main(["evaluate", "--checkpoint", checkpoint, "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert f"top1       {metrics['top1']:.4f}" in out
    assert main(["evaluate", "det", "--checkpoint", str(runs / "det" / "checkpoint.pt")]) == 0
    assert "AP50" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_predict_writes_a_png(runs, image, tmp_path, capsys, task):
    assert main(["predict", "--checkpoint", str(runs / task / "checkpoint.pt"), str(image),
                 "--output", str(tmp_path), "--score-threshold=0"]) == 0
    written = tmp_path / f"scene_{task}.png"
    assert written.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert str(written) in out
    if task == "cls":
        assert out.count(" 0.") + out.count(" 1.0") >= 3         # three classes with probabilities
    if task == "seg":
        assert "% of pixels" in out


def test_the_classification_picture_shows_every_line_of_its_title(runs, image):
    """The top-k lines stand above the picture; the first (the top-1 class) was drawn above the figure's edge."""
    import matplotlib
    from asmlp_min.predict import _describe
    matplotlib.use("Agg")
    classes = ["circle", "square", "triangle"]
    lines, fig, _ = _describe("cls", torch.tensor([0.2, 0.3, 0.5]), torch.zeros(3, 64, 64, dtype=torch.uint8),
                              classes, argparse.Namespace(topk=5))
    fig.canvas.draw()
    title = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
    assert lines[0] == "triangle 0.500" and len(lines) == 3
    assert 0 <= title.y0 < title.y1 <= fig.bbox.y1, (title, fig.bbox)


def test_predict_runs_a_gpu_amp_run_in_float32_as_evaluate_does(runs, image, tmp_path):
    """On the CPU a run's --amp would be bfloat16 autocast: slower, and other probabilities than evaluate's."""
    from asmlp_min.checkpoint import load_checkpoint, save_checkpoint
    saved = load_checkpoint(runs / "cls" / "checkpoint.pt")
    amp = tmp_path / "amp" / "checkpoint.pt"
    amp.parent.mkdir()
    save_checkpoint({**saved, "config": {**saved["config"], "amp": True}}, amp)
    for checkpoint, report in ((runs / "cls" / "checkpoint.pt", tmp_path / "plain.json"), (amp, tmp_path / "amp.json")):
        assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--output", str(tmp_path / "out"),
                     f"--json={report}"]) == 0
    assert json.loads((tmp_path / "amp.json").read_text())[0]["top"] == json.loads(
        (tmp_path / "plain.json").read_text())[0]["top"]


@pytest.mark.parametrize("device, says", [("cuda", "no CUDA GPU is visible; use --device cpu"),
                                          ("mps", "--device must be auto, cpu, cuda or cuda:N"),
                                          ("gpu", "--device must be auto, cpu, cuda or cuda:N")])
def test_predict_refuses_a_device_this_machine_lacks_before_reading_anything(runs, image, tmp_path, capsys,
                                                                             monkeypatch, device, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("the checkpoint was read"))
    assert main(["predict", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), str(image),
                 f"--output={tmp_path / 'out'}", f"--device={device}"]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_on_the_cpu_asked_for_gives_what_auto_gives_without_a_gpu(runs, image, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("auto", "cpu"):
        assert main(["predict", "--checkpoint", str(runs / "seg" / "checkpoint.pt"), str(image), f"--device={device}",
                     f"--output={tmp_path / device}", f"--json={tmp_path / device}.json"]) == 0
    auto, cpu = (json.loads((tmp_path / f"{d}.json").read_text())[0]["pixel_share"] for d in ("auto", "cpu"))
    assert auto == cpu and sum(cpu.values()) == pytest.approx(1.0)


def test_predict_json_and_the_seg_class_mask_hold_what_the_model_predicts(runs, image, tmp_path, capsys):
    from asmlp_min.data.images import load_image
    from asmlp_min.engine import load_trained, predict
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for task in ("det", "seg"):
        checkpoint = runs / task / "checkpoint.pt"
        out, report = tmp_path / task, tmp_path / f"{task}.json"
        assert main(["predict", "--checkpoint", str(checkpoint), str(image), str(tmp_path / "broken.png"),
                     "--output", str(out), "--score-threshold=0", f"--json={report}"]) == 2
        records = json.loads(report.read_text())
        assert records[1]["image"] == str(tmp_path / "broken.png") and "unreadable" in records[1]["error"]
        model, cfg, saved = load_trained(checkpoint)
        want = predict(model, cfg, load_image(image))
        if task == "det":
            got = records[0]["detections"]
            assert [d["score"] for d in got] == want["scores"].tolist() and len(got) > 0
            assert [d["box_xyxy"] for d in got] == want["boxes"].tolist()
            assert [d["class"] for d in got] == [saved["classes"][label - 1] for label in want["labels"].tolist()]
        else:
            mask = np.asarray(Image.open(records[0]["mask"]))
            assert mask.dtype == np.uint8 and torch.equal(torch.from_numpy(mask.astype(np.int64)), want)
            shares = {saved["classes"][c]: float((want == c).float().mean()) for c in want.unique().tolist()}
            assert records[0]["pixel_share"] == pytest.approx(shares)
            assert f"and its class ids {out / 'scene_seg_mask.png'}" in capsys.readouterr().out


def test_predicted_names_differ_in_more_than_case_as_macos_and_windows_compare_them(tmp_path):
    from asmlp_min.predict import _output_names
    images = [tmp_path / "a" / "X.jpg", tmp_path / "b" / "x.jpg", tmp_path / "out" / "Y_seg.png", tmp_path / "y.png"]
    assert [p.name for p in _output_names(images, tmp_path / "out", "seg")] == [
        "X_seg.png", "x_2_seg.png", "Y_seg_seg.png", "y_2_seg.png"]   # y_seg.png would be the input Y_seg.png


def test_an_output_that_is_a_file_the_command_reads_is_refused_and_the_file_kept(runs, image, tmp_path, capsys,
                                                                                 monkeypatch):
    """`--json p1.png p2.png` reads as a switch; it would have replaced the image (and --json CKPT the run). The
    run's training log beside the checkpoint was replaced by one JSON object, without a word."""
    monkeypatch.chdir(tmp_path)
    checkpoint, log = tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl"
    shutil.copy(runs / "cls" / "checkpoint.pt", checkpoint)
    shutil.copy(runs / "cls" / "metrics.jsonl", log)
    shutil.copy(image, tmp_path / "p1.png")
    kept = {p: p.read_bytes() for p in (checkpoint, tmp_path / "p1.png", log)}
    for argv in (["predict", "--checkpoint", str(checkpoint), "--json", str(tmp_path / "p1.png"), str(image)],
                 ["predict", "--checkpoint", str(checkpoint), str(image), "--json", str(checkpoint)],
                 ["evaluate", "--checkpoint", str(checkpoint), "--json", str(checkpoint)],
                 ["export", "--weights", str(checkpoint), "--output", str(checkpoint)],
                 ["evaluate", "--checkpoint", str(checkpoint), "--json", str(log)],
                 ["predict", "--checkpoint", str(checkpoint), str(image), "--json", "metrics.jsonl"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        json_is_an_image = argv[-1] == str(image)
        assert ("names an image; the file the predictions go to comes right after --json" if json_is_an_image
                else "is a file of the run that wrote the checkpoint" if "metrics.jsonl" in argv[-1]
                else "is a file this command reads") in err, err
    assert all(p.read_bytes() == data for p, data in kept.items())


def test_predict_reads_folders_and_never_overwrites_its_own_results(runs, image, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata of a copied x.png")  # hidden: left out
    checkpoint, out = str(runs / "cls" / "checkpoint.pt"), tmp_path / "out"
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "a"), str(tmp_path / "b" / "x.png"),
                 "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(os.listdir(out)) == ["x_2_cls.png", "x_cls.png"]
    assert lines[0].startswith(f"{tmp_path / 'a' / 'x.png'}: ") and lines[0].endswith(f"-> {out / 'x_cls.png'}")
    assert lines[1].startswith(f"{tmp_path / 'b' / 'x.png'}: ") and lines[1].endswith(f"-> {out / 'x_2_cls.png'}")
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "b"), "--output", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"-> {out / 'x_cls.png'} (replaced an older file)")
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "empty"), "--output", str(out)]) == 2
    assert f"folder '{tmp_path / 'empty'}' has no images" in capsys.readouterr().err


def test_predict_skips_an_unreadable_image_keeps_the_others_and_exits_2(runs, image, tmp_path, capsys):
    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    shutil.copy(image, folder / "c.png")
    checkpoint = str(runs / "cls" / "checkpoint.pt")
    assert main(["predict", "--checkpoint", checkpoint, str(folder), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["a_cls.png", "c_cls.png"]
    assert f"warning: skipped {folder / 'b.jpg'}: unreadable or truncated image" in captured.err
    assert f"1 of 3 images could not be predicted: {folder / 'b.jpg'}" in captured.err
    assert main(["predict", "--checkpoint", checkpoint, str(folder / "b.jpg"), "--output", str(out)]) == 2
    assert "none of the 1 image(s) could be predicted" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("a list of photos, given by mistake")    # named, so not left out as in a folder
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "notes.txt"), "--output", str(out)]) == 2
    assert (f"warning: skipped {tmp_path / 'notes.txt'}: not an image file: Pillow cannot read it, and its name has "
            "no image extension; give images (.jpg, .jpeg, .png," in capsys.readouterr().err)


@pytest.mark.parametrize("allocator_says", [  # PyTorch's CPU allocator on Linux and macOS, and on Windows
    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 7315660800 "
    "bytes. Error code 12 (Cannot allocate memory)",
    "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
    "7315660800 bytes."])
def test_predict_skips_an_image_that_runs_out_of_memory_and_writes_the_others_and_the_json(runs, image, tmp_path,
                                                                                            monkeypatch, capsys,
                                                                                            allocator_says):
    import asmlp_min.engine as engine
    folder, out, report = tmp_path / "photos", tmp_path / "out", tmp_path / "r.json"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(image, folder / name)
    calls, real = [], engine.predict

    def predict(model, cfg, img):  # the second image is "too large": the allocator fails as PyTorch's CPU one does
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(allocator_says)
        return real(model, cfg, img)
    monkeypatch.setattr(engine, "predict", predict)
    assert main(["predict", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), str(folder), "--output", str(out),
                 f"--json={report}"]) == 2
    assert sorted(os.listdir(out)) == ["a_cls.png", "c_cls.png"]
    assert f"skipped {folder / 'b.png'}: out of memory predicting this 64x64 image" in capsys.readouterr().err
    records = json.loads(report.read_text())
    assert [("top" in r, "error" in r) for r in records] == [(True, False), (False, True), (True, False)]


def test_output_in_a_code_page_without_a_paths_letters_escapes_them_instead_of_failing(runs, image, tmp_path,
                                                                                       monkeypatch):
    """Windows writes redirected output (asmlp-min predict ... > log.txt) in its ANSI code page, here cp1252: the
    Cyrillic folder name raised UnicodeEncodeError, and the command ended with 'charmap' codec can't encode."""
    import io
    folder = tmp_path / "Фото"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="cp1252", write_through=True))
    assert main(["predict", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), str(folder),
                 f"--output={tmp_path / 'out'}"]) == 0
    assert written.getvalue().decode("cp1252").startswith(str(tmp_path / "\\u0424\\u043e\\u0442\\u043e" / "a.png"))


def test_predict_into_the_input_folder_numbers_its_results_and_leaves_every_input_image(runs, image, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(image, folder / "cat.png")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(folder / "cat_cls.png")   # named like a result
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / "dog_seg_mask.png")
    shutil.copy(image, folder / "dog.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), str(folder / "cat.png"),
                 str(folder / "cat_cls.png"), "--output", str(folder)]) == 0
    assert main(["predict", "--checkpoint", str(runs / "seg" / "checkpoint.pt"), str(folder / "dog.png"),
                 str(folder / "dog_seg_mask.png"), "--output", str(folder)]) == 0
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert sorted(set(os.listdir(folder)) - set(before)) == ["cat_2_cls.png", "cat_cls_cls.png", "dog_2_seg.png",
                                                            "dog_2_seg_mask.png", "dog_seg_mask_seg.png",
                                                            "dog_seg_mask_seg_mask.png"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_run_stopped_by_a_signal_exits_128_plus_it_and_resumes(tmp_path, monkeypatch, capsys, signum):
    """Schedulers read 0 as "finished": a stop by Ctrl-C is 130, by SIGTERM 143; the checkpoint resumes."""
    from asmlp_min.engine import Trainer
    step = Trainer._optimizer_step

    def signal_after_the_first_step(trainer):
        step(trainer)
        if trainer.step == 1:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(Trainer, "_optimizer_step", signal_after_the_first_step)
    assert main(["train", "cls", *TINY, "--train-size=16", f"--output={tmp_path}"]) == 128 + signum
    checkpoint, said = tmp_path / "checkpoint.pt", capsys.readouterr()
    assert f"Continue with: --resume {checkpoint}" in said.out
    reason = "Ctrl-C again to abort at once" if signum == signal.SIGINT else "SIGTERM received"  # a scheduler's
    assert f"stopping after this step and saving a checkpoint ({reason})" in said.err
    saved = load_checkpoint(checkpoint)                       # the flag is read at the next batch, after its step
    assert (saved["epoch"], saved["batch_in_epoch"]) == (0, 2)
    monkeypatch.undo()
    assert main(["train", "--resume", str(checkpoint)]) == 0
    assert load_checkpoint(checkpoint)["epoch"] == 1


CTRL_C_TO_THE_GROUP = """
import os, signal, sys
from asmlp_min.cli import main
from asmlp_min.engine import Trainer
step = Trainer._optimizer_step
def ctrl_c_in_the_terminal(trainer):   # a terminal sends SIGINT to every process of the foreground group
    step(trainer)
    if trainer.step == 2:
        os.killpg(os.getpgid(0), signal.SIGINT)
Trainer._optimizer_step = ctrl_c_in_the_terminal
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_with_loader_workers_is_handled_once_by_the_main_process(tmp_path):
    """Forked workers inherit the main process's handler: each printed the stop message and, on a second Ctrl-C,
    died in the middle of the epoch; they ignore SIGINT, and the main process ends them when it stops."""
    argv = ["train", "cls", *TINY, "--train-size=32", "--workers=2", f"--output={tmp_path}"]
    done = subprocess.run([sys.executable, "-c", CTRL_C_TO_THE_GROUP, *argv], capture_output=True, text=True,
                          start_new_session=True, timeout=300)     # its own process group: pytest's is not signalled
    assert done.returncode == 130, done.stderr
    assert done.stderr.count("stopping after this step") == 1, done.stderr
    assert load_checkpoint(tmp_path / "checkpoint.pt")["batch_in_epoch"] == 3    # read at the batch after that step


def test_a_truncated_image_read_by_a_worker_is_one_line_naming_it(tmp_path, capsys):
    from asmlp_min.data.shapes import export_shapes
    for split in ("train", "val"):
        export_shapes(tmp_path / "data", task="cls", n=8, split=split, seed=4)
    bad = sorted((tmp_path / "data" / "train").rglob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:200])
    assert main(["train", "cls", *tiny_for("cls", folder=True), "--workers=1", f"--data={tmp_path / 'data'}",
                 f"--output={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asmlp-min train: error: {bad}: unreadable or truncated image")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"continue with --resume {tmp_path / 'run' / 'checkpoint.pt'}" in err


def test_a_checkpoint_over_the_file_size_limit_is_one_line_and_damages_nothing(tmp_path):
    """A real limit (ulimit -f) in a child process: the kernel refuses the write with EFBIG; torch alone printed a
    33-line traceback ending in 'unexpected pos ...'."""
    assert main(["train", "cls", *TINY[1:], "--epochs=2", "--stop-at-epoch=1", f"--output={tmp_path}"]) == 0
    checkpoint = tmp_path / "checkpoint.pt"
    before, files = checkpoint.read_bytes(), sorted(os.listdir(tmp_path))
    limit = len(before) // 2
    child = f"""if True:
        import resource, signal, sys
        from asmlp_min.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.exit(main(["train", "--resume", {str(checkpoint)!r}]))"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"asmlp-min train: error: {checkpoint} was not written: the file would be larger "
                                  "than allowed")
    assert f"continue with --resume {checkpoint}" in done.stderr
    assert checkpoint.read_bytes() == before and sorted(os.listdir(tmp_path)) == files


def test_info_prints_the_paper_table(capsys):
    assert main(["info", "asmlp_tiny", "--image-size=64"]) == 0
    out = capsys.readouterr().out
    assert "| parameters |" in out and "| quantity | asmlp_min | paper (at 224x224) |" in out
    assert "the paper's column is for 224x224, ours for 64x64" in out
    assert main(["info", "asmlp_tiny"]) == 0
    assert "ours for" not in capsys.readouterr().out      # at 224 both columns are for the same size


@pytest.mark.parametrize("argv, message", [
    (["train", "--data=/no/such/folder", *TINY], "no such folder"),
    (["evaluate", "--checkpoint=/no/such.pt"], "does not exist"),
    (["predict", "--checkpoint=/no/such.pt", "/no/image.png"], "image '/no/image.png' does not exist"),
    (["train", "seg", "--mixup=0.5", *TINY], "seg: mixup (--mixup) applies to cls only; leave it out for seg"),
    (["train", "--epochs=0"], "epochs must be >= 1"),
    (["train", *TINY, "--device=gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["train", *TINY, "--image-size=1"], "cls: image_size must be >= 4"),
    (["train", *TINY, "--warmup-epochs=nan"], "warmup_epochs must be a finite number"),
    (["train", *TINY, "--mixup=nan"], "mixup must be a finite number"),
    (["train", *TINY, "--cutmix=nan"], "cutmix must be a finite number"),
    (["train", *TINY, "--workers=-1"], "workers must be >= 0"),
    (["train", *TINY, "--output="], "--output is empty"),
    (["evaluate", "--checkpoint=/no/such.pt", "--json="], "--json is empty"),
    (["predict", "--checkpoint=/no/such.pt", ""], "an image path is empty"),
    (["train", *TINY, "--output=/sys/asmlp_min_run"], "cannot create the folder"),
    (["predict", "--checkpoint=/no/such.pt", "--topk=0", "/no/image.png"], "--topk must be >= 1, got 0"),
    (["predict", "--checkpoint=/no/such.pt", "--score-threshold=nan", "/no/image.png"],
     "--score-threshold must be a number in [0, 1], got nan"),
    (["predict", "--checkpoint=/no/such.pt", "--score-threshold=1.5", "/no/image.png"],
     "--score-threshold must be a number in [0, 1], got 1.5"),
    (["info", "asmlp_tiny", "--image-size=-3"], "--image-size must be >= 1, got -3"),
])
def test_user_mistakes_give_one_line_not_a_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run/predict folders would go
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("asmlp-min ")
    assert list(tmp_path.iterdir()) == []  # no empty runs/cls or runs/predict left behind


def test_a_failed_command_removes_only_the_empty_folders_it_created(image, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    (tmp_path / "runs" / "cls").mkdir(parents=True)  # existed before: stays, and so does its parent
    assert main(["train", "--data=/no/such/folder", *TINY, "--output=runs/cls"]) == 2
    assert main(["predict", "--checkpoint=/no/such.pt", "--output=kept/new/png", str(image)]) == 2
    assert main(["evaluate", "--checkpoint=/no/such.pt", "--json=new/metrics.json"]) == 2
    assert main(["train", "--data=/no/such/folder", *TINY, "--output=a/b"]) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["kept", "runs", "runs/cls"]
    assert capsys.readouterr().err.count("error") == 4


def test_wrong_task_and_corrupt_checkpoint(runs, image, tmp_path, capsys):
    ckpt = str(runs / "seg" / "checkpoint.pt")
    assert main(["evaluate", "cls", "--checkpoint", ckpt]) == 2
    assert "holds a seg model, not cls" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(broken), str(image)]) == 2
    assert "checkpoint error" in capsys.readouterr().err


def test_unknown_model_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model=asmlp_huge"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'asmlp_huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_writes_the_report_and_a_rerun_reuses_data_and_runs(tmp_path, capsys):
    out, data = tmp_path / "demo", tmp_path / "data"
    assert main(["demo", "--quick", f"--output={out}", f"--data-root={data}"]) == 0
    report = (out / "report.md").read_text()
    for needle in ("top-1", "box AP", "mIoU", "| asmlp_tiny | 28.3M | 28M |", "figures/axial_shift.png",
                   "top1 >= 0.95: not checked (quick)", "(random boxes)", "(all background)", "whole=True"):
        assert needle in report
    for name in ("axial_shift", "curves", "predictions_cls", "predictions_det", "predictions_seg"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*.png")}
    checkpoints = {p: p.read_bytes() for p in out.glob("*/checkpoint.pt")}
    assert len(checkpoints) == 3 and len(stamps) > 0
    capsys.readouterr()
    assert main(["demo", "--quick", f"--output={out}", f"--data-root={data}"]) == 0
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.png")} == stamps      # data not rewritten
    assert all(p.read_bytes() == b for p, b in checkpoints.items())              # finished runs not retrained
    assert "nothing to do" in capsys.readouterr().out


def test_demo_that_misses_a_target_exits_1_and_says_which(tmp_path, capsys, monkeypatch):
    import asmlp_min.demo
    report = tmp_path / "report.md"
    missed = ["detection: AP 0.500 < target 0.7"]
    monkeypatch.setattr(asmlp_min.demo, "run_demo", lambda *args, **kwargs: (report, missed))
    assert main(["demo"]) == 1
    assert f"demo: target missed, detection: AP 0.500 < target 0.7 (see {report})" in capsys.readouterr().err
    monkeypatch.setattr(asmlp_min.demo, "run_demo", lambda *args, **kwargs: (report, []))
    assert main(["demo"]) == 0


def test_evaluate_refuses_data_with_other_class_names(runs, image, tmp_path, capsys):
    for name in ("circle", "square", "star"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.open(image).save(tmp_path / "val" / name / "scene.png")
    assert main(["evaluate", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), f"--data={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "only in the checkpoint: triangle; only in the data: star" in err and "Traceback" not in err


def test_evaluate_json_is_checked_first_written_atomically_and_strict(runs, tmp_path, capsys, monkeypatch):
    checkpoint = str(runs / "cls" / "checkpoint.pt")
    monkeypatch.setattr("asmlp_min.engine.evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    assert main(["evaluate", "--checkpoint", checkpoint, "--json", str(tmp_path)]) == 2
    assert f"--json {str(tmp_path)!r} is a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["evaluate", "--checkpoint", checkpoint, "--json", str(tmp_path / "file" / "m.json")]) == 2
    assert "file' is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setattr("asmlp_min.engine.evaluate", lambda *a, **k: {"val_loss": float("nan"), "top1": 0.5})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    assert main(["evaluate", "--checkpoint", checkpoint, "--json", str(tmp_path / "out" / "m.json")]) == 0
    assert json.loads((tmp_path / "out" / "m.json").read_text(), parse_constant=refuse) == {"val_loss": None,
                                                                                           "top1": 0.5}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.json"]


def test_unwritable_outputs_give_one_line_before_any_work(runs, image, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr("asmlp_min.engine.load_trained", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["predict", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), str(image),
                 f"--output={tmp_path / 'file'}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["train", *TINY, f"--output={tmp_path / 'file' / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "a part of the path is a file" in err and "Traceback" not in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, where no file can be created")
def test_a_folder_where_no_file_can_be_created_is_found_before_any_work(runs, image, capsys, monkeypatch):
    """In /proc os.access says yes to root, yet creating a file fails: the check creates one, before the work."""
    checkpoint = str(runs / "cls" / "checkpoint.pt")
    monkeypatch.setattr("asmlp_min.engine.evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    assert main(["evaluate", "--checkpoint", checkpoint, "--json", "/proc/m.json"]) == 2
    err = capsys.readouterr().err
    assert "--json '/proc/m.json' cannot be written: '/proc' is a folder you cannot write to" in err
    assert ".tmp" not in err
    monkeypatch.setattr("asmlp_min.engine.load_trained", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["predict", "--checkpoint", checkpoint, str(image), "--output=/proc"]) == 2
    assert "--output '/proc' is a folder you cannot write to" in capsys.readouterr().err
    monkeypatch.setattr("asmlp_min.export.export_onnx", lambda *a, **k: pytest.fail("exported before checking"))
    assert main(["export", "--embed-dim=8", "--depths=1,1,1,1", "--image-size=32", "--output=/proc/x.onnx"]) == 2
    assert "--output '/proc/x.onnx' cannot be written: '/proc' is a folder you" in capsys.readouterr().err


def test_predict_refuses_a_folder_in_the_way_before_writing_any_image(runs, image, tmp_path, capsys):
    shutil.copy(image, tmp_path / "first.png")
    (tmp_path / "out" / "scene_cls.png").mkdir(parents=True)
    assert main(["predict", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), str(tmp_path / "first.png"),
                 str(image), f"--output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'out' / 'scene_cls.png'}: a folder of that name is in the way" in err
    assert os.listdir(tmp_path / "out") == ["scene_cls.png"]  # first_cls.png was not drawn either


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps a process's memory on Linux")
def test_running_out_of_memory_is_one_line_saying_what_was_asked(runs, tmp_path):
    """In a child capped at 16 GiB (on any machine a larger request fails at once): a 100000-pixel image, and a run
    checkpoint whose config was tampered to embed_dim 10**6 (one 1x1 conv of the first block: 10**12 floats)."""
    checkpoint = load_checkpoint(runs / "cls" / "checkpoint.pt")
    checkpoint["config"]["embed_dim"] = 10**6
    tampered = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, tampered)
    child = f"""if True:
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))
        from asmlp_min.cli import main
        info = main(["info", "asmlp_tiny", "--image-size=100000"])
        sys.exit(10 * info + main(["evaluate", "--checkpoint", {str(tampered)!r}]))"""
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CUDA reserves more address space than the cap allows
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, env=cpu_only)
    assert done.returncode == 11, done.stderr
    tampered_advice = ("use a smaller --batch-size; if it happened while loading a checkpoint, its config looks wrong: "
                       "no AS-MLP variant needs that much")
    assert done.stderr.splitlines() == [  # the (1, 3, h, w) float32 input; a (C, C) 1x1 conv of 10**12 floats
        f"asmlp-min info: error: out of memory: {3 * 100000 ** 2 * 4} bytes were asked for; use a smaller --image-size",
        f"asmlp-min evaluate: error: out of memory: {10**12 * 4} bytes were asked for; {tampered_advice}"]


def test_os_errors_end_in_one_line(monkeypatch, capsys):
    def denied(*args):
        raise PermissionError(13, "Permission denied", "/some/file")
    monkeypatch.setattr("asmlp_min.complexity.info_table", denied)
    assert main(["info", "asmlp_tiny"]) == 2
    assert capsys.readouterr().err.startswith("asmlp-min info: error: cannot use /some/file: Permission denied")


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.pop("optimizer"), "'optimizer' (missing)"),
    (lambda c: c["config"].update(epochs="ten"), "epochs: 'ten' (expected int)"),
    (lambda c: c["model"]["head.weight"].fill_(float("nan")), "hold NaN or inf (head.weight)"),
])
def test_damaged_checkpoint_is_refused_and_a_failed_resume_leaves_it(runs, image, tmp_path, capsys, damage, message):
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = load_checkpoint(runs / "cls" / "checkpoint.pt")
    damage(checkpoint)
    path.parent.mkdir()
    torch.save(checkpoint, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    commands = [["train", "--resume", str(path)], ["evaluate", "--checkpoint", str(path)],
                ["predict", "--checkpoint", str(path), str(image), f"--output={tmp_path}"]]
    if "optimizer" in message:
        commands = commands[:1]                                 # evaluate and predict do not need it
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "checkpoint error" in err and "damaged or inconsistent" in err and message in err, argv
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_bench_ships_with_the_package_and_a_broken_import_is_not_hidden(monkeypatch):
    monkeypatch.setitem(sys.modules, "asmlp_min.bench", None)
    with pytest.raises(ImportError):
        build_parser()


def test_export_of_a_training_run_builds_the_runs_own_architecture_with_its_weights(runs, tmp_path, capsys,
                                                                                    monkeypatch, reads):
    exported = []

    def traced(model, path, image_size):  # stands in for the ~10 s ONNX export: what would be exported
        exported.append(model)
        Path(path).write_bytes(b"onnx")
    monkeypatch.setattr("asmlp_min.export.export_onnx", traced)
    for task, flags in (("cls", []), ("cls", ["--features-only"]), ("det", ["--features-only"]),
                        ("seg", ["--features-only"])):
        path = runs / task / "checkpoint.pt"
        saved = load_checkpoint(path)["model"]
        prefix = "" if task == "cls" else "backbone."
        reads.clear()
        assert main(["export", f"--weights={path}", "--image-size=64", f"--output={tmp_path / task}.onnx",
                     *flags]) == 0, capsys.readouterr().err
        assert reads == [path]                    # the run's file is read once
        state = exported[-1].state_dict()
        assert exported[-1].features_only == bool(flags) and len(state) > 10
        for key, value in state.items():          # every tensor is the run's (the stage norms of det/seg included)
            if task == "cls" and flags and re.match(r"norm\d\.", key):
                continue                          # a classifier run has no per-stage norms
            assert torch.equal(value, saved[prefix + key]), key
        assert "with its trained weights" in capsys.readouterr().err
    assert main(["export", f"--weights={runs / 'det' / 'checkpoint.pt'}", f"--output={tmp_path / 'd.onnx'}"]) == 2
    assert "holds a det model; the ONNX export covers classifiers and backbones: add --features-only" in \
        capsys.readouterr().err
    assert main(["export", f"--weights={runs / 'cls' / 'checkpoint.pt'}", "--embed-dim=16",
                 f"--output={tmp_path / 'c.onnx'}"]) == 2
    assert "which sets the architecture itself: leave out --embed-dim" in capsys.readouterr().err


@pytest.mark.parametrize("splits, num_classes, noted", [(("training", "validation"), 4, True),
                                                       (("train", "val"), 4, False),
                                                       (("training", "validation"), 150, False)])
def test_training_says_how_masks_are_read_where_the_ade20k_layout_meets_another_class_count(
        tmp_path, capsys, splits, num_classes, noted):
    """ADE20K's layout means 0 is unlabelled and class k is value k + 1; with another --num-classes that may not be
    what the masks mean, so the log says it and how to count 0 as a class."""
    for split in splits:
        for folder in ("images", "annotations"):
            (tmp_path / "d" / folder / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / "d/images" / split / f"{i}.png")
            Image.fromarray(np.full((32, 32), i + 1, np.uint8)).save(tmp_path / "d/annotations" / split / f"{i}.png")
    assert main(["train", "seg", *tiny_for("seg", folder=True), "--batch-size=2", f"--data={tmp_path / 'd'}",
                 f"--num-classes={num_classes}", "--head-channels=16", f"--output={tmp_path / 'run'}"]) == 0
    note = ("note: masks read as ADE20K's (images/training, images/validation): value 0 is unlabelled and ignored, "
            f"class k is value k + 1; if 0 is one of your {num_classes} classes, name the folders train and val")
    assert (note in capsys.readouterr().out) is noted
    if splits == ("train", "val"):  # classes named by their mask value: predict says 'class 1', not a bare '1'
        assert main(["predict", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                     str(tmp_path / "d/images/val/0.png"), f"--output={tmp_path / 'out'}"]) == 0
        assert re.search(r": class [0-3] \d+\.\d% of pixels", capsys.readouterr().out)


def test_the_packages_warnings_are_one_line_naming_the_command_and_others_keep_pythons_form(runs, tmp_path, capsys):
    """evaluate on COCO data with a zero-width box: the loader's warning is one line, without Python's file:line
    and source line; a warning from outside the package keeps Python's form."""
    from asmlp_min.data.shapes import export_shapes
    path = export_shapes(tmp_path / "coco", task="det", n=2, split="val", seed=3, image_size=64)
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"][2] = 0
    path.write_text(json.dumps(coco))
    assert main(["evaluate", "det", "--checkpoint", str(runs / "det" / "checkpoint.pt"), f"--data={tmp_path / 'coco'}",
                 "--device=cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"asmlp-min evaluate: warning: {path}: skipped 1 annotation(s) whose 'bbox' has zero or negative "
                   "width/height (for training; evaluation keeps them)"]
    import warnings
    from asmlp_min.cli import _one_line_warnings
    with pytest.warns(UserWarning, match="from elsewhere"):
        with _one_line_warnings("evaluate"):
            warnings.warn("from elsewhere")              # this file is not in the package: Python's own form
    assert capsys.readouterr().err == ""


def test_scene_counts_on_a_folder_are_refused_not_ignored(runs, tmp_path, capsys):
    """--train-size and --val-size count generated scenes; on a folder they were ignored and saved as if used."""
    from asmlp_min.data.shapes import export_shapes
    for split in ("train", "val"):
        export_shapes(tmp_path / "data", task="cls", n=8, split=split, seed=4)
    assert main(["train", "cls", *TINY, f"--data={tmp_path / 'data'}", f"--output={tmp_path / 'run'}"]) == 2
    assert ("--train-size and --val-size applies to --data shapes only (the number of generated scenes); a folder's "
            "splits are used whole: leave them out" in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
    assert main(["evaluate", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), f"--data={tmp_path / 'data'}",
                 "--val-size=2"]) == 2
    assert "--val-size applies to --data shapes only" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(runs / "cls" / "checkpoint.pt"), "--val-size=2"]) == 0   # shapes



def test_every_line_on_stderr_is_one_write(monkeypatch):
    """torchrun starts ``python -u``, where print writes a line's text and its newline separately: two processes'
    lines then ran together ("...write toasmlp-min train: stopped: ...")."""
    writes = []
    monkeypatch.setattr(sys, "stderr", argparse.Namespace(write=writes.append, flush=lambda: None))
    assert main(["train", "cls", "--output", ""]) == 2
    assert writes == ["asmlp-min train: error: --output is empty: give a path (was a shell variable unset?)\n"]
