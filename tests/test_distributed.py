"""torchrun with 2 gloo processes on the CPU trains the same model as 1 process with the same global batch, and a
2-process run stopped after an epoch and resumed ends where the uninterrupted run does.

Rank r of N reads every N-th index of the same seeded permutation and DDP averages the gradients, so 2 x 4
images per step must give the weights of 1 x 8 images per step up to float summation order. Only rank 0
writes: one checkpoint in the run folder.
"""
import os
import subprocess
import sys

import pytest
import torch

from asmlp_min.checkpoint import load_checkpoint
from asmlp_min.engine import TrainConfig, Trainer

# no randomness that is drawn per process (drop path, flips, mixup), so both runs are the same computation
SETTINGS = dict(epochs=2, train_size=32, val_size=8, image_size=32, embed_dim=8, depths=(1, 1, 1, 1),
                drop_path=0.0, augment="none")


def torchrun(cwd, *args: str) -> subprocess.CompletedProcess:
    """``asmlp-min train`` in 2 gloo processes; fails the test with the end of stderr if it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "asmlp_min", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """An uninterrupted 2-process run of SETTINGS: (run folder, stdout)."""
    root = tmp_path_factory.mktemp("ddp")
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in SETTINGS.items()]
    done = torchrun(root, "cls", "--device=cpu", "--batch-size=4", f"--output={root / 'run'}", *flags)
    return root / "run", flags, done.stdout


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    run, _, stdout = ddp_run
    assert stdout.count("epoch 2/2:") == 1                     # only rank 0 logs

    single = Trainer(TrainConfig(task="cls", device="cpu", batch_size=8, output=str(tmp_path / "single"), **SETTINGS),
                     log=lambda *a, **k: None)
    single.fit()

    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl"]
    assert len(list(run.parent.rglob("*.pt"))) == 1          # rank 1 wrote nothing
    ddp = load_checkpoint(run / "checkpoint.pt")
    assert ddp["world_size"] == 2 and ddp["rng"]["cpu"].shape[0] == 2 and ddp["step"] == single.step == 8
    for name, weight in single.model.state_dict().items():
        assert torch.allclose(ddp["model"][name], weight, rtol=1e-4, atol=1e-5), name
    for mine, theirs in zip(ddp["metrics"], single.history):
        assert abs(mine["train_loss"] - theirs["train_loss"]) < 1e-4
        assert mine["top1"] == theirs["top1"]                  # val shards reduced over ranks = whole val set


def test_two_process_run_stopped_after_epoch_1_and_resumed_ends_as_the_uninterrupted_run(ddp_run, tmp_path):
    """Each rank restores its own row of the saved generator states (rank 1's row once crashed torch with SIGSEGV).
    No randomness is drawn in training here, so every rank's generator must end in the state its seed gave it."""
    run, flags, _ = ddp_run
    torchrun(tmp_path, "cls", "--device=cpu", "--batch-size=4", f"--output={tmp_path / 'run'}", "--stop-at-epoch=1",
             *flags)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    resumed = torchrun(tmp_path, "--resume", str(tmp_path / "run" / "checkpoint.pt"))
    assert "epoch 1/2:" not in resumed.stdout and resumed.stdout.count("epoch 2/2:") == 1

    mine, theirs = (load_checkpoint(folder / "checkpoint.pt") for folder in (tmp_path / "run", run))
    assert (mine["epoch"], mine["step"]) == (theirs["epoch"], theirs["step"]) == (2, 8)
    for name, weight in theirs["model"].items():
        assert torch.equal(mine["model"][name], weight), name
    seeded = []
    for rank in range(2):
        torch.manual_seed(rank)                                # seed + rank, seed 0
        seeded.append(torch.get_rng_state())
    assert torch.equal(mine["rng"]["cpu"], theirs["rng"]["cpu"])
    assert torch.equal(mine["rng"]["cpu"], torch.stack(seeded))
    times = ("train_time_s", "eval_time_s", "train_img_per_s")
    assert [{k: v for k, v in r.items() if k not in times} for r in mine["metrics"]] == \
           [{k: v for k, v in r.items() if k not in times} for r in theirs["metrics"]]


RANK_1_DIES_AT_STEP_6 = """
import os, sys
from asmlp_min.cli import main
from asmlp_min.engine import Trainer
step = Trainer._optimizer_step
def dies(trainer):   # a crash, an out-of-memory kill: the process is gone without a word to the others
    step(trainer)
    if trainer.step == 6 and os.environ["RANK"] == "1":
        os._exit(9)
Trainer._optimizer_step = dies
sys.exit(main(sys.argv[1:]))
"""


def test_a_process_that_dies_leaves_the_others_one_line_saying_where_to_resume(ddp_run, tmp_path):
    _, flags, _ = ddp_run
    (tmp_path / "dies.py").write_text(RANK_1_DIES_AT_STEP_6)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dies.py",
               "train", "cls", "--device=cpu", "--batch-size=4", f"--output={run}", *flags]   # 4 steps an epoch
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    said = [line for line in lines if "cannot go on" in line]
    assert len(said) == 1, done.stderr[-3000:]
    assert said[0].startswith("asmlp-min train: stopped: another process of this run stopped, so process 0 cannot")
    assert said[0].endswith(f"the last good checkpoint {run / 'checkpoint.pt'} (epoch 1) is unchanged; once the "
                            f"cause is fixed, continue with --resume {run / 'checkpoint.pt'}")
    assert not any(line.startswith("[rank0]") for line in lines)   # torchrun's prefix of a rank's traceback
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1   # resuming it is the test above's business


def test_a_run_folder_that_process_0_refuses_stops_every_process_with_one_line(ddp_run, tmp_path):
    """Only process 0 claims the run folder: the others hear of its refusal instead of failing in their first
    collective with gloo's traceback."""
    _, flags, _ = ddp_run
    (tmp_path / "afile").write_text("not a folder")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "asmlp_min",
               "train", "cls", "--device=cpu", "--batch-size=4", f"--output={tmp_path / 'afile' / 'run'}", *flags]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("asmlp-min train:")]
    assert len(lines) == 2, done.stderr[-3000:]     # (torchrun's own ChildFailedError traceback follows them)
    assert not any(line.startswith("[rank") for line in done.stderr.splitlines()) and "gloo" not in done.stderr
    refusal = next(line for line in lines if "could not start" not in line)
    assert "afile" in refusal
    assert any(line.startswith("asmlp-min train: stopped: process 0 could not start the run, so process 1 stops "
                               "too: ") and "afile" in line for line in lines)


def test_torchruns_sigterm_after_a_peer_died_waits_for_the_line_that_says_why(tmp_path, monkeypatch, capsys):
    """torchrun sends SIGTERM to the surviving processes as soon as one dies. A survivor that has caught the
    dead peer (PeerStopped) keeps SIGTERM off until the CLI has printed why it stops, then puts it back."""
    import signal

    from asmlp_min.cli import main
    from asmlp_min.engine.distributed import PeerStopped, stop_requests

    def fit_that_loses_its_peer(self):
        with stop_requests(lambda signum: None):
            raise PeerStopped("another process of this run stopped, so process 0 cannot go on")

    class Stderr:
        def write(self, text):                              # the CLI's line about to go out
            fit_that_loses_its_peer.seen = signal.getsignal(signal.SIGTERM)
            if fit_that_loses_its_peer.seen != signal.SIG_DFL:   # (with the default it would end pytest)
                os.kill(os.getpid(), signal.SIGTERM)           # torchrun's, before the line is out: survived

        def flush(self):
            pass

    original = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        monkeypatch.setattr(Trainer, "fit", fit_that_loses_its_peer)
        monkeypatch.setattr("asmlp_min.cli.sys.stderr", Stderr())
        assert main(["train", "cls", f"--output={tmp_path / 'run'}", "--epochs=1", "--train-size=8", "--val-size=8",
                     "--batch-size=8", "--image-size=32", "--embed-dim=8", "--depths=1,1,1,1"]) == 1
        assert fit_that_loses_its_peer.seen == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # back once the line was written
        with stop_requests(lambda signum: None):                    # a block that ends well leaves it as it was
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, original)
