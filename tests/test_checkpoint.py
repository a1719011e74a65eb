"""Loading official-layout checkpoints strictly, refusing bad files, and saving atomically."""
import os
import pickle
import stat

import pytest
import torch

from asmlp_min.backbone import create_model
from asmlp_min.checkpoint import (CheckpointError, atomic_write, load_backbone_checkpoint, load_checkpoint,
                                  load_official_checkpoint, save_checkpoint)


def tiny(**kwargs):
    return create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 2, 1), **kwargs)


def test_official_classification_layout_loads_strictly_and_reproduces_logits(tmp_path):
    torch.manual_seed(0)
    source = tiny(num_classes=10).eval()
    path = tmp_path / "asmlp_tiny_patch4_shift5_224.pth"
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 299}, path)  # as the official trainer does
    target = tiny(num_classes=10).eval()
    report = load_official_checkpoint(target, path)
    assert report.ok and len(report.loaded) == len(source.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(target(x), source(x))


def test_mmdet_checkpoint_loads_into_features_model(tmp_path):
    torch.manual_seed(0)
    source = tiny(features_only=True).eval()
    sd = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 8, 1, 1)  # detector parts are not ours
    sd["rpn_head.rpn_conv.weight"] = torch.zeros(256, 256, 3, 3)
    path = tmp_path / "mask_rcnn_asmlp_tiny.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": sd}, path)
    target = tiny(features_only=True).eval()
    assert load_official_checkpoint(target, path).ok
    x = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(target(x), source(x)))


def test_classification_weights_into_backbone_report_norms(tmp_path):
    cls_sd = tiny().state_dict()
    backbone = tiny(features_only=True)
    with pytest.raises(CheckpointError, match="missing from checkpoint \\(8\\): norm0.weight"):
        load_official_checkpoint(backbone, {"model": cls_sd})
    report = load_official_checkpoint(backbone, {"model": cls_sd}, strict=False)
    assert sorted(report.missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert sorted(report.unexpected) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert torch.equal(backbone.state_dict()["patch_embed.proj.weight"], cls_sd["patch_embed.proj.weight"])


def test_mismatched_keys_raise_with_a_report_and_leave_the_model_untouched():
    model = tiny(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 2, 1), num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch: patch_embed.proj.weight: checkpoint \\(16, 3, 4, 4\\)"):
        load_official_checkpoint(model, other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    renamed = {k.replace("conv2_1", "conv_w"): v for k, v in tiny(num_classes=10).state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(model, renamed)
    assert "layers.0.blocks.0.axial_shift.conv2_1.weight" in str(err.value)
    assert "layers.0.blocks.0.axial_shift.conv_w.weight" in str(err.value)


def test_refused_backbone_checkpoint_copies_nothing():
    model = tiny(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny(num_classes=10, shift_size=3).state_dict()        # same shapes: every tensor would load ...
    other["layers.3.blocks.0.mlp.fc2.weight"] = torch.zeros(64, 7, 1, 1)  # ... but one has the wrong shape
    with pytest.raises(CheckpointError, match="does not fit the tiny model"):
        load_backbone_checkpoint(model, other, name="the tiny model")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no partial load
    report = load_backbone_checkpoint(model, tiny(num_classes=10, shift_size=3).state_dict())
    assert report.loaded and not torch.equal(before["patch_embed.proj.weight"], model.patch_embed.proj.weight)


def test_skip_head_for_fine_tuning():
    imagenet = tiny(num_classes=1000).state_dict()
    model = tiny(num_classes=3)
    head_before = model.head.weight.clone()
    with pytest.raises(CheckpointError, match="head.weight"):
        load_official_checkpoint(model, imagenet)
    report = load_official_checkpoint(model, imagenet, skip_head=True)
    assert report.ok and report.skipped == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.norm.weight, imagenet["norm.weight"])


def test_module_prefix_is_stripped():
    sd = {f"module.{k}": v for k, v in tiny().state_dict().items()}
    assert load_official_checkpoint(tiny(), sd).ok


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(garbage)
    good = tmp_path / "good.pth"
    torch.save({"model": tiny().state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_official_checkpoint(tiny(), truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_official_checkpoint(tiny(), {"epoch": 3})


class _Exploit:
    """A pickle payload that would create a file if it were ever executed."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the hand-made pickle
def test_a_pickle_that_runs_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "tampered.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit(str(marker))}, f)
    with pytest.raises(CheckpointError, match="NOT executed") as refused:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # no advice to retry with weights_only=False
    torch.save({"model": _Exploit(str(marker))}, tmp_path / "tampered_zip.pth")  # the zip format too
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="(?i)unsupported global.*open") as refused:  # names what it refused
        load_checkpoint(tmp_path / "tampered_zip.pth")
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temp file left behind
    monkeypatch.undo()
    assert load_checkpoint(path)["step"].item() == 1


def test_wrong_argument_types():
    with pytest.raises(TypeError, match="path or a dict"):
        load_official_checkpoint(tiny(), 42)


def test_atomic_write_gives_normal_permissions_and_removes_its_temp_file_on_failure(tmp_path):
    umask = os.umask(0o027)
    try:
        save_checkpoint({"step": torch.tensor(1)}, tmp_path / "ckpt.pth")
        with atomic_write(tmp_path / "sub" / "notes.txt", "w") as f:
            f.write("all or nothing")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt.pth").st_mode) == 0o640        # 0o666 minus the umask
    assert (tmp_path / "sub" / "notes.txt").read_text() == "all or nothing"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "sub" / "notes.txt", "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "sub") == ["notes.txt"]
    assert (tmp_path / "sub" / "notes.txt").read_text() == "all or nothing"


def test_non_finite_weights_are_refused_and_nothing_is_copied():
    source = tiny(num_classes=10).state_dict()
    source["head.weight"][0, 0] = float("nan")
    source["layers.0.blocks.0.norm1.bias"][0] = float("inf")
    model = tiny(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for load in (load_official_checkpoint, load_backbone_checkpoint):
        with pytest.raises(CheckpointError, match="2 tensor\\(s\\) hold NaN or inf: .*norm1.bias.*head.weight"):
            load(model, {"model": source})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
