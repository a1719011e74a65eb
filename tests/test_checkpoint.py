"""Loading official-layout checkpoints strictly, refusing bad files, and saving atomically."""
import argparse
import errno
import os
import pickle
import re
import signal
import stat
import subprocess
import sys

import pytest
import torch

from asmlp_min.backbone import create_model
import asmlp_min.files
from asmlp_min.checkpoint import (CheckpointError, load_backbone_checkpoint, load_checkpoint, load_official_checkpoint,
                                  save_checkpoint)
from asmlp_min.files import WriteError, atomic_write, remove_stale_temp_files


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


BLOCK_TENSORS = 20  # weight, bias: norm1, axial_shift.{conv1, norm1, conv2_1, conv2_2, norm2, conv3}, norm2, fc1, fc2


def test_backbone_checkpoint_with_other_blocks_per_stage_is_refused_both_ways(tmp_path):
    """Official tiny and small differ only in stage 2's depth: every shared tensor fits, so only the keys tell.
    The trunk (patch_embed, layers) must match; a classifier's norm/head and a backbone's norm0..3 may differ."""
    deeper = tmp_path / "deeper.pth"
    torch.save({"model": create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 3, 1)).state_dict()}, deeper)
    model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), features_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"another variant.* \(e\.g\. layers\.2\.blocks\.1\.norm1\.weight") as err:
        load_backbone_checkpoint(model, deeper)
    assert f"unexpected in checkpoint ({2 * BLOCK_TENSORS + 4})" in str(err.value)  # 2 blocks, final norm and head
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shallower = {"model": create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1)).state_dict()}
    deep_model = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 3, 1), features_only=True)
    with pytest.raises(CheckpointError, match=r"another variant.* \(e\.g\. layers\.2\.blocks\.1\.") as err:
        load_backbone_checkpoint(deep_model, shallower, name="asmlp_small")
    assert "does not fit asmlp_small" in str(err.value)
    assert f"missing from checkpoint ({2 * BLOCK_TENSORS + 8})" in str(err.value)  # 2 blocks and norm0..3
    # the ends may differ: an mmdet backbone (norm0..3, no final norm) into a classifier, the reverse of ImageNet -> det
    dense = tiny(features_only=True).state_dict()
    model = tiny(num_classes=5)
    report = load_backbone_checkpoint(model, {"state_dict": {f"backbone.{k}": v for k, v in dense.items()}},
                                      skip_head=True)
    assert sorted(report.missing) == ["norm.bias", "norm.weight"]
    assert sorted(report.unexpected) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.skipped == ["head.bias", "head.weight"]
    assert torch.equal(model.layers[2].blocks[1].mlp.fc1.weight, dense["layers.2.blocks.1.mlp.fc1.weight"])


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


def test_compiled_and_wrapped_models_state_dicts_load():
    """torch.compile's wrapper names every key ``_orig_mod.``; under DataParallel too: ``module._orig_mod.``."""
    source = tiny()
    compiled = torch.compile(source).state_dict()                      # compiles nothing until called
    assert next(iter(compiled)).startswith("_orig_mod.")
    for sd in (compiled, {f"module.{k}": v for k, v in compiled.items()}):
        model = tiny()
        assert load_official_checkpoint(model, sd).ok
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_a_state_dict_with_entries_other_than_tensors_is_named_not_called_missing():
    sd = tiny().state_dict()
    with pytest.raises(CheckpointError, match=rf"its 'model' holds {len(sd)} tensors and 1 other entries: "
                                              r"'n_averaged' \(int\); a state dict holds only tensors"):
        load_official_checkpoint(tiny(), {"model": {**sd, "n_averaged": 5}})       # said "no state dict found"
    assert load_official_checkpoint(tiny(), {"model": {"name": "asmlp_tiny"}, "state_dict": sd}).ok  # the weights
    with pytest.raises(CheckpointError, match=r"no state dict found: .*top-level keys were \[0, 'a'\]"):
        load_official_checkpoint(tiny(), {0: 1, "a": 2})             # was a TypeError from sorting 0 with 'a'


def test_a_flipped_byte_that_torch_load_reads_silently_is_refused(tmp_path):
    """torch.load does not check the CRC-32 that torch.save writes for each record: one damaged byte in the weights
    loads, as another number. The file names the record."""
    import zipfile
    good, flipped = tmp_path / "good.pth", tmp_path / "flipped.pth"
    torch.save({"model": tiny().state_dict()}, good)
    with zipfile.ZipFile(good) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
        at = good.read_bytes().index(archive.read(record)) + record.file_size // 2
    data = bytearray(good.read_bytes())
    data[at] ^= 0xFF
    flipped.write_bytes(data)
    silently = torch.load(flipped, weights_only=True)["model"]       # the oracle: torch itself loads other weights
    assert any(not torch.equal(a, b) for a, b in zip(silently.values(), torch.load(good)["model"].values()))
    with pytest.raises(CheckpointError, match=rf"flipped.pth: corrupt: the bytes of '{re.escape(record.filename)}' "
                                              "do not match the checksum torch.save wrote; copy the file again"):
        load_checkpoint(flipped)
    assert load_official_checkpoint(tiny(), load_checkpoint(good)).ok
    if hasattr(torch.serialization, "set_crc32_options"):              # torch >= 2.6: checksums can be turned off
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save({"model": tiny().state_dict()}, tmp_path / "unchecked.pth")
        finally:
            torch.serialization.set_crc32_options(before)
        assert load_official_checkpoint(tiny(), load_checkpoint(tmp_path / "unchecked.pth")).ok


def test_an_empty_file_and_an_unexpanded_tilde_are_named(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth: the file is empty \(0 bytes\)"):   # was "EOFError "
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match=r"'~/no/such.pt' does not exist .*'~' is not expanded here"):
        load_checkpoint("~/no/such.pt")                               # as bash leaves --checkpoint=~/no/such.pt
    with pytest.raises(FileNotFoundError, match=r"does not exist \(or is not a file\)$"):
        load_checkpoint(tmp_path / "no such.pt")


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(garbage)
    garbage.write_bytes(b"hello\n")                  # torch.load: KeyError(101), the byte 'e' read as an opcode
    with pytest.raises(CheckpointError, match=r"garbage.pth: not a file torch.save wrote, .*torch.load: KeyError 101"):
        load_checkpoint(garbage)
    good = tmp_path / "good.pth"
    torch.save({"model": tiny().state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="a corrupt or truncated one"):
        load_official_checkpoint(tiny(), truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_official_checkpoint(tiny(), {"epoch": 3})
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)  # a loadable file that holds no dict
    with pytest.raises(CheckpointError, match=r"list.pth: expected a dict .*got list"):
        load_checkpoint(listed)


@pytest.mark.parametrize("head, kind", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "a PNG image"), (b"\xff\xd8\xff\xe0\0\x10JFIF", "a JPEG image"),
    (b"\x1f\x8b\x08\0", "a gzip archive"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 115\n", "a Git LFS pointer to it"),
    (b"\n  <!DOCTYPE html><html><title>Google Drive - Virus scan warning</title>", "a web page"),
    (b'{"epoch": 3}', "a JSON file"),
    (len(b'{"w":{}}').to_bytes(8, "little") + b'{"w":{}}', "a safetensors file: load it with safetensors.torch"),
])
def test_a_file_of_another_kind_is_named_not_called_corrupt_or_tampered(tmp_path, head, kind):
    path = tmp_path / "weights.pth"
    path.write_bytes(head)
    with pytest.raises(CheckpointError, match=f"weights.pth: not a checkpoint but {re.escape(kind)}.*torch.save"):
        load_checkpoint(path)


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


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated: this is the file a user may still have
def test_a_torchscript_file_is_named_without_the_unsafe_advice(tmp_path, monkeypatch):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: a TorchScript model, not a checkpoint: torch.jit.load it and save its "
                              "state_dict() with torch.save")
    good = tmp_path / "good.pth"
    torch.save({"model": {}}, good)
    advice = ("Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``. Re-running "
              "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in arbitrary "
              "code execution.")  # torch 2.6+'s wording, raised here for any file: the advice is never passed on

    def refuse(*args, **kwargs):
        raise RuntimeError(advice)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match="TorchScript archives") as err:
        load_checkpoint(good)
    assert "False" not in str(err.value) and "Re-running" not in str(err.value)


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


def test_atomic_write_errors_name_the_destination_not_its_temp_file(tmp_path):
    (tmp_path / "taken.png").mkdir()  # os.replace cannot put a file over a folder
    with pytest.raises(IsADirectoryError) as err:
        with atomic_write(tmp_path / "taken.png") as f:
            f.write(b"png")
    assert err.value.filename == str(tmp_path / "taken.png") and ".tmp" not in str(err.value)
    assert os.listdir(tmp_path) == ["taken.png"] and os.listdir(tmp_path / "taken.png") == []
    if os.path.isdir("/proc/self"):  # Linux: no file can be created in /proc, not even by root
        with pytest.raises(OSError) as err:
            with atomic_write("/proc/m.json", "w") as f:
                f.write("{}")
        assert err.value.filename == "/proc/m.json" and ".tmp" not in str(err.value)


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


def test_atomic_write_works_where_os_has_no_fchmod_as_on_windows_before_python_3_13(tmp_path, monkeypatch):
    """Without the guard no checkpoint, picture or JSON could be written there: AttributeError after an epoch."""
    monkeypatch.delattr(os, "fchmod")
    save_checkpoint({"step": torch.tensor(1)}, tmp_path / "ckpt.pth")
    assert load_checkpoint(tmp_path / "ckpt.pth")["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pth"]


@pytest.mark.parametrize("windows, refusals, written", [(True, 2, True), (True, 5, False), (False, 1, False)])
def test_a_file_held_open_elsewhere_on_windows_is_replaced_once_let_go(tmp_path, monkeypatch, windows, refusals,
                                                                     written):
    """Windows refuses to replace a file another program holds open (metrics.jsonl in a spreadsheet, a scanner):
    tried for about a second. Elsewhere a PermissionError is the folder's, and trying again would not help."""
    calls, replace = [], os.replace

    def held_open(src, dst):
        calls.append(dst)
        if len(calls) <= refusals:
            raise PermissionError(13, "Permission denied", src, None, dst)
        return replace(src, dst)
    monkeypatch.setattr(asmlp_min.files.os, "replace", held_open)
    monkeypatch.setattr(asmlp_min.files, "WINDOWS", windows)
    monkeypatch.setattr(asmlp_min.files.time, "sleep", lambda seconds: None)
    (tmp_path / "metrics.jsonl").write_text("epoch 1\n")
    try:
        with atomic_write(tmp_path / "metrics.jsonl", "w") as f:
            f.write("epoch 1\nepoch 2\n")
    except PermissionError as err:
        assert not written and str(tmp_path / "metrics.jsonl") in str(err)
    assert (tmp_path / "metrics.jsonl").read_text() == ("epoch 1\nepoch 2\n" if written else "epoch 1\n")
    assert len(calls) == (refusals + 1 if written else min(refusals, 5)) and os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("name", ["写" * 78 + "_cls.png", "a" * 255, "é" * 127])
def test_atomic_write_writes_a_name_near_the_255_byte_limit(tmp_path, name):
    """The temp file's name is 14 bytes longer than ``name``; it is cut, not refused ("File name too long")."""
    with atomic_write(tmp_path / name, "w") as f:
        f.write("long")
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == "long"


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


class _DiskFillsUp:
    """A file whose writes fail with ENOSPC (or ``code``) once ``room`` bytes are written, as on a full disk."""

    def __init__(self, file, room: int, code: int = errno.ENOSPC):
        self.file, self.room, self.code = file, room, code

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


def test_a_full_disk_is_named_in_one_line_and_damages_nothing(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(asmlp_min.files.os, "fdopen", lambda fd, mode: _DiskFillsUp(real_fdopen(fd, mode), 500))
    with pytest.raises(WriteError) as err:  # torch alone says "unexpected pos 576 vs 470"
        save_checkpoint({"weights": torch.zeros(1000)}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert str(err.value).startswith(f"{path} was not written: the disk is full")
    assert "unchanged" in str(err.value) and "free some space" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_an_io_error_while_writing_is_named_in_one_line_and_damages_nothing(tmp_path, monkeypatch):
    """Not only lack of room: a write failing with EIO (a dying disk, a network mount gone) names the file too."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(asmlp_min.files.os, "fdopen",
                        lambda fd, mode: _DiskFillsUp(real_fdopen(fd, mode), 500, errno.EIO))
    with pytest.raises(WriteError) as err:
        save_checkpoint({"weights": torch.zeros(1000)}, path)
    assert err.value.errno == errno.EIO and err.value.filename == str(path)
    assert str(err.value).startswith(f"{path} was not written: Input/output error. Any earlier checkpoint.pt is "
                                     "unchanged, no temp file is left")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_file_size_limit_is_named_and_damages_nothing(tmp_path):
    """A real limit (ulimit -f) in a child process: the kernel refuses the write with EFBIG."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    child = f"""if True:
        import resource, signal, sys, torch
        from asmlp_min.checkpoint import save_checkpoint
        from asmlp_min.files import WriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            save_checkpoint({{"weights": torch.zeros(100_000)}}, {str(path)!r})
        except WriteError as err:
            sys.exit(str(err))"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"{path} was not written: the file would be larger than allowed")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_stale_temp_files_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    """A save killed with SIGKILL cannot clean up; remove_stale_temp_files finds its file by atomic_write's pattern."""
    save_checkpoint({"step": torch.tensor(1)}, tmp_path / "checkpoint.pt")
    child = f"""if True:
        import os, signal, torch
        from asmlp_min.checkpoint import save_checkpoint

        def killed_halfway(obj, f):
            f.write(b"PK half a zip file")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed_halfway
        save_checkpoint({{}}, {str(tmp_path / "checkpoint.pt")!r})"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    left = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.")
    others = [".checkpoint.pt.tmp", "notes.tmp", ".other.pt.abcd1234.tmp", ".checkpoint.pt.abcd1234.tmp.keep",
              "checkpoint.pt.abcd1234.tmp"]
    for name in others:
        (tmp_path / name).write_text("not ours")
    (tmp_path / ".metrics.jsonl.x_y1234z.tmp").write_text("ours")
    removed = remove_stale_temp_files(tmp_path, ["checkpoint.pt", "metrics.jsonl"])
    assert sorted(p.name for p in removed) == sorted([left[0], ".metrics.jsonl.x_y1234z.tmp"])
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", *others])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"].item() == 1


def test_a_long_shape_mismatch_report_is_capped_with_a_count():
    model = create_model("asmlp_tiny", num_classes=10)
    other = create_model("asmlp_tiny", embed_dim=64, num_classes=10).state_dict()  # every tensor but a few differs
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(model, other)
    text = str(err.value)
    mismatched = sum(1 for k, v in model.state_dict().items() if v.shape != other[k].shape)
    assert mismatched > 100
    assert "width: embed_dim is 64 in the checkpoint, 96 in the model" in text    # asmlp_tiny's C is 96
    assert text.count("shape mismatch:") == 4
    assert f"... and {mismatched - 4} more shape mismatches" in text
    assert len(text.splitlines()) < 10


# ---------------------------------------------------------------- checkpoints researchers have

def _same(model, state_dict) -> bool:
    return all(torch.equal(v, state_dict[k]) for k, v in model.state_dict().items())


def test_a_whole_segmenter_checkpoint_loads_into_a_segmenter_key_for_key(tmp_path):
    """A model with a backbone of its own keeps the file's backbone.* keys (before, they were stripped to fit a bare
    backbone, and the segmenter loaded 0 tensors)."""
    from asmlp_min.segmentation import SemanticSegmenter
    small = dict(embed_dim=8, depths=(1, 1, 1, 1), channels=16, aux_channels=8)
    torch.manual_seed(0)
    trained = SemanticSegmenter("asmlp_tiny", num_classes=5, **small).state_dict()
    torch.save({"meta": {"mmseg_version": "0.11.0"}, "state_dict": trained}, tmp_path / "upernet.pth")
    torch.manual_seed(1)
    model = SemanticSegmenter("asmlp_tiny", num_classes=5, **small)
    report = load_official_checkpoint(model, tmp_path / "upernet.pth")
    assert report.ok and len(report.loaded) == len(trained) and _same(model, trained)
    assert str(report).startswith(f"loaded {len(trained)} tensors (from the file's 'state_dict')")


def test_strict_false_that_would_load_no_block_is_refused_and_loads_nothing():
    model = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny().state_dict()                           # another width: only the 1000-class head.bias fits
    with pytest.raises(CheckpointError, match=r"none of its blocks match .*\nwould load 1 tensors") as refused:
        load_official_checkpoint(model, other, strict=False)
    assert "Nothing was loaded" in str(refused.value) and _same(model, before)
    with pytest.raises(CheckpointError, match=r"\(strict=True\):\nwould load 1 tensors"):   # not "loaded"
        load_official_checkpoint(model, other)


def test_training_checkpoints_with_an_ema_copy_or_argparse_settings_load_their_weights(tmp_path):
    torch.manual_seed(0)
    raw = tiny().state_dict()
    torch.manual_seed(1)
    ema = tiny().state_dict()
    torch.save({"state_dict_ema": ema}, tmp_path / "ema_only.pth")
    torch.save({"epoch": 299, "state_dict": raw, "state_dict_ema": ema, "args": argparse.Namespace(lr=1e-3)},
               tmp_path / "timm_train.pth.tar")       # timm's train.py layout
    model = tiny()
    assert "(from the file's 'state_dict_ema')" in str(load_official_checkpoint(model, tmp_path / "ema_only.pth"))
    assert _same(model, ema)
    assert "(from the file's 'state_dict')" in str(load_official_checkpoint(model, tmp_path / "timm_train.pth.tar"))
    assert _same(model, raw)                              # the raw weights where both are there, and it says which


def test_a_folder_and_a_whole_saved_model_are_refused_saying_what_they_are(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a file \(a training run keeps its weights in "):
        load_checkpoint(tmp_path)
    torch.save(tiny(), tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match=r"(?s)Unsupported global.*A whole saved model.*torch.save\(model"):
        load_checkpoint(tmp_path / "whole.pth")


def test_an_mmseg_file_trained_with_another_shift_size_is_refused_and_loads_nothing(tmp_path):
    """The official AS-MLP-S UperNet is named 'shift5' and uses shift 3, which only its meta config tells; another
    setting whose name ends in shift_size is not it."""
    torch.manual_seed(0)
    trained = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), shift_size=3, features_only=True)
    meta = {"config": "img_shift_size = 32\nmodel = dict(\n    backbone=dict(\n        type='ASMLP',\n"
                      "        shift_size=3,\n"}
    torch.save({"meta": meta, "state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()}},
               tmp_path / "upernet_small.pth")
    five = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), features_only=True)
    before = {k: v.clone() for k, v in five.state_dict().items()}
    with pytest.raises(CheckpointError, match="config says shift_size=3, this model shifts by 5"):
        load_official_checkpoint(five, tmp_path / "upernet_small.pth", strict=False)
    with pytest.raises(CheckpointError, match="config says shift_size=3"):
        load_backbone_checkpoint(five, tmp_path / "upernet_small.pth")
    assert _same(five, before)
    three = create_model("asmlp_tiny", embed_dim=8, depths=(1, 1, 1, 1), shift_size=3, features_only=True)
    assert load_official_checkpoint(three, tmp_path / "upernet_small.pth").ok and _same(three, trained.state_dict())


def test_a_run_checkpoint_of_another_model_is_refused_naming_its_settings_and_load_trained(tmp_path):
    from asmlp_min.engine import TrainConfig, Trainer
    cfg = TrainConfig(task="cls", output=str(tmp_path / "run"), epochs=1, batch_size=8, train_size=8, val_size=8,
                      image_size=32, embed_dim=8, depths=(1, 1, 1, 1), device="cpu")
    Trainer(cfg, log=lambda *a, **k: None).fit()
    with pytest.raises(CheckpointError, match=r"training run's checkpoint \(cls asmlp_tiny, embed_dim 8, depths "
                                              r"\[1, 1, 1, 1\]\): 'from asmlp_min.engine import load_trained'"):
        load_official_checkpoint(create_model("asmlp_tiny"), tmp_path / "run" / "checkpoint.pt")


def test_a_segmentation_run_of_asmlp_small_is_refused_by_a_shift_5_model(tmp_path):
    """The run saves shift_size None, and its network shifts by 3 (the official UperNet-S's, the segmentation
    default for small): a plain create_model("asmlp_small") shifts by 5, and loading would change the features."""
    from asmlp_min.engine import TrainConfig, Trainer
    cfg = TrainConfig(task="seg", model="asmlp_small", output=str(tmp_path / "run"), epochs=1, batch_size=4,
                      train_size=4, val_size=4, crop_size=32, embed_dim=8, depths=(1, 1, 1, 1), head_channels=16,
                      mixup=0.0, cutmix=0.0, device="cpu")
    Trainer(cfg, log=lambda *a, **k: None).fit()
    path = tmp_path / "run" / "checkpoint.pt"
    assert load_checkpoint(path)["config"]["shift_size"] is None
    five = create_model("asmlp_small", embed_dim=8, depths=(1, 1, 1, 1), features_only=True)
    with pytest.raises(CheckpointError, match="config says shift_size=3, this model shifts by 5"):
        load_official_checkpoint(five, path, strict=False)
    three = create_model("asmlp_small", embed_dim=8, depths=(1, 1, 1, 1), shift_size=3, features_only=True)
    assert load_official_checkpoint(three, path, strict=False).loaded



def _official_training_checkpoint(path, monkeypatch, state_dict, shift_size):
    """A ckpt_epoch_N.pth as svip-lab/AS-MLP's trainer writes it, its config a yacs CfgNode: a stand-in yacs (a
    dict subclass with yacs' flags in __dict__, pickled by its name yacs.config.CfgNode) is importable only while
    saving, as on a machine that has yacs."""
    import types

    class CfgNode(dict):
        def __init__(self, values):
            super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in values.items()})
            self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(),
                                  "__renamed_keys__": {}, "__new_allowed__": False})

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config = types.ModuleType("yacs.config")
    config.CfgNode = CfgNode
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
        patch.setitem(sys.modules, "yacs.config", config)
        cfg = CfgNode({"MODEL": {"TYPE": "asmlp", "ASMLP": {"SHIFT_SIZE": shift_size, "DEPTHS": [1, 1, 1, 1]}},
                       "TRAIN": {"BASE_LR": 5e-4, "OPTIMIZER": {"BETAS": (0.9, 0.999)}}})
        torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                    "lr_scheduler": {"t_initial": 300, "base_values": [1e-3]}, "max_accuracy": 81.3, "epoch": 299,
                    "config": cfg, "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}}, path)
    assert "yacs.config" not in sys.modules                  # loading must not need it


def test_the_official_trainers_checkpoint_with_its_yacs_config_loads_without_yacs(tmp_path, monkeypatch):
    """Its weights load strictly and compute the saved model's function; the config comes back as plain nested
    dicts under 'official_config', its shift size read from MODEL.ASMLP.SHIFT_SIZE."""
    from asmlp_min.engine import load_released
    torch.manual_seed(0)
    official = create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), shift_size=3, num_classes=10).eval()
    path = tmp_path / "ckpt_epoch_299.pth"
    _official_training_checkpoint(path, monkeypatch, official.state_dict(), shift_size=3)
    loaded = load_checkpoint(path)
    assert "config" not in loaded and loaded["epoch"] == 299
    assert loaded["official_config"] == {"MODEL": {"TYPE": "asmlp", "ASMLP": {"SHIFT_SIZE": 3, "DEPTHS": [1, 1, 1, 1]}},
                                         "TRAIN": {"BASE_LR": 5e-4, "OPTIMIZER": {"BETAS": (0.9, 0.999)}}}
    assert type(loaded["official_config"]["MODEL"]) is dict
    model, cfg, _ = load_released(path)
    assert cfg.shift_size == 3 and {m.shift_size for m in model.modules() if hasattr(m, "shift_size")} == {3}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), official(x))
    with pytest.raises(CheckpointError, match="shift_size=3"):   # a model of another shift refuses the weights
        load_official_checkpoint(create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 1, 1), num_classes=10), path)


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_an_mmseg_save_best_checkpoint_with_a_numpy_score_in_its_meta_loads(tmp_path, numpy_module):
    """mmcv's EvalHook(save_best='mIoU') keeps mmseg's score, a numpy float64, in meta['hook_msgs']. numpy 2 pickles
    it as numpy._core.multiarray.scalar, the numpy 1 of mmcv's time as numpy.core.multiarray.scalar: the pickle's
    name is rewritten here (a legacy torch.save, whose pickle carries names as plain text)."""
    import numpy as np
    path = tmp_path / "best_mIoU_iter_16000.pth"
    meta = {"hook_msgs": {"best_score": np.float64(0.4123), "best_ckpt": "work_dirs/x.pth"}, "iter": np.int64(16000),
            "scale": np.float32(0.5), "flags": np.bool_(True)}
    weights = tiny().state_dict()
    torch.save({"meta": meta, "state_dict": weights}, path, _use_new_zipfile_serialization=False)
    written = path.read_bytes()
    names = {b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"}
    (mine,) = [name for name in names if name in written]
    path.write_bytes(written.replace(mine, numpy_module.encode() + b"\nscalar"))
    loaded = load_checkpoint(path)
    assert loaded["meta"] == meta and type(loaded["meta"]["hook_msgs"]["best_score"]) is np.float64
    assert type(loaded["meta"]["scale"]) is np.float32 and loaded["meta"]["scale"] == 0.5
    assert loaded["state_dict"].keys() == weights.keys()
    assert all(torch.equal(loaded["state_dict"][k], weights[k]) for k in weights)
    torch.save({"meta": {"mask": np.zeros(3)}, "state_dict": {}}, tmp_path / "array.pth")   # arrays stay refused
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(tmp_path / "array.pth")


def test_settings_objects_load_on_a_torch_without_safe_globals_and_the_allow_list_is_put_back(tmp_path, monkeypatch):
    """torch 2.4 has only the process-wide add_safe_globals: the loader adds yacs' and argparse's classes for its
    one load, and afterwards the list holds what it held before, also when the load is refused."""
    monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)
    path = tmp_path / "ckpt_epoch_299.pth"
    _official_training_checkpoint(path, monkeypatch, tiny().state_dict(), shift_size=5)
    torch.save({"state_dict": tiny().state_dict(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "timm.pth.tar")
    torch.save(tiny(), tmp_path / "whole.pth")
    before = set(torch.serialization.get_safe_globals())
    assert load_checkpoint(path)["official_config"]["MODEL"]["ASMLP"]["SHIFT_SIZE"] == 5
    assert load_checkpoint(tmp_path / "timm.pth.tar")["args"].lr == 1e-3
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(CheckpointError, match="Unsupported global"):
        load_checkpoint(tmp_path / "whole.pth")
    assert set(torch.serialization.get_safe_globals()) == before
