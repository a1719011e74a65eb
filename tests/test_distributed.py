"""torchrun with 2 gloo processes on the CPU trains the same model as 1 process with the same global batch.

Rank r of N reads every N-th index of the same seeded permutation and DDP averages the gradients, so 2 x 4
images per step must give the weights of 1 x 8 images per step up to float summation order. Only rank 0
writes: one checkpoint in the run folder.
"""
import os
import subprocess
import sys

import torch

from asmlp_min.checkpoint import load_checkpoint
from asmlp_min.engine import TrainConfig, Trainer

# no randomness that is drawn per process (drop path, flips, mixup), so both runs are the same computation
SETTINGS = dict(epochs=2, train_size=32, val_size=8, image_size=32, embed_dim=8, depths=(1, 1, 1, 1),
                drop_path=0.0, augment="none")


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in SETTINGS.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "asmlp_min", "train", "cls", "--device=cpu", "--batch-size=4",
               f"--output={tmp_path / 'ddp'}", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 2/2:") == 1                # only rank 0 logs

    single = Trainer(TrainConfig(task="cls", device="cpu", batch_size=8, output=str(tmp_path / "single"), **SETTINGS),
                     log=lambda *a, **k: None)
    single.fit()

    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl"]
    assert len(list(tmp_path.rglob("*.pt"))) == 2            # ddp/checkpoint.pt and single/checkpoint.pt
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert ddp["world_size"] == 2 and ddp["rng"]["cpu"].shape[0] == 2 and ddp["step"] == single.step == 8
    for name, weight in single.model.state_dict().items():
        assert torch.allclose(ddp["model"][name], weight, rtol=1e-4, atol=1e-5), name
    for mine, theirs in zip(ddp["metrics"], single.history):
        assert abs(mine["train_loss"] - theirs["train_loss"]) < 1e-4
        assert mine["top1"] == theirs["top1"]                  # val shards reduced over ranks = whole val set
