"""``asmlp-min``: every subcommand on tiny data, --help for every flag, and one-line errors for user mistakes."""
import argparse
import json

import numpy as np
import pytest
from PIL import Image

from asmlp_min.cli import build_parser, main
from asmlp_min.data.shapes import make_scene, scene_rng

TINY = ["--epochs=1", "--batch-size=4", "--train-size=8", "--val-size=4", "--embed-dim=8", "--depths=1,1,1,1",
        "--image-size=32", "--device=cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run per task, shared by the tests below (cls, det, seg: a few seconds each)."""
    root = tmp_path_factory.mktemp("runs")
    for task, extra in (("cls", []), ("det", ["--head-channels=16", "--image-size=64"]),
                        ("seg", ["--head-channels=16"])):
        assert main(["train", task, *TINY, *extra, f"--output={root / task}"]) == 0
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(make_scene(scene_rng(7, "test", 0), 64).image).save(path)
    return path


def test_every_subcommand_and_flag_has_help(capsys):
    commands = subparsers()
    assert set(commands) == {"demo", "train", "evaluate", "predict", "info", "bench"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: asmlp-min {name}")


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


def test_train_writes_a_run_folder_and_refuses_to_overwrite_it(runs, capsys):
    for task in ("cls", "det", "seg"):
        assert {p.name for p in (runs / task).iterdir()} == {"checkpoint.pt", "metrics.jsonl", "curves.png"}
    row = json.loads((runs / "seg" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["mIoU"] <= 1
    assert main(["train", "cls", *TINY, f"--output={runs / 'cls'}"]) == 2
    assert "exists: continue it with --resume" in capsys.readouterr().err


def test_resume_reuses_the_checkpoint_settings(runs, tmp_path, capsys):
    assert main(["train", "cls", *TINY[1:], "--epochs=2", "--stop-at-epoch=1", f"--output={tmp_path}"]) == 0
    assert main(["train", "--resume", str(tmp_path / "checkpoint.pt")]) == 0   # no other flag needed
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert main(["train", "det", "--resume", str(tmp_path / "checkpoint.pt")]) == 2
    assert "task: checkpoint 'cls', now 'det'" in capsys.readouterr().err


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


def test_info_prints_the_paper_table(capsys):
    assert main(["info", "asmlp_tiny", "--image-size=64"]) == 0
    assert "| parameters |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--data=/no/such/folder", *TINY], "no such folder"),
    (["evaluate", "--checkpoint=/no/such.pt"], "does not exist"),
    (["predict", "--checkpoint=/no/such.pt", "/no/image.png"], "image '/no/image.png' does not exist"),
    (["train", "seg", "--mixup=0.5", *TINY], "mixup/cutmix apply to classification only"),
    (["train", "--epochs=0"], "epochs must be >= 1"),
])
def test_user_mistakes_give_one_line_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("asmlp-min ")


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
    for needle in ("top-1", "box AP", "mIoU", "| asmlp_tiny | 28.3M | 28M |", "figures/axial_shift.png"):
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
