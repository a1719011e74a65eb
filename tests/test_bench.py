"""The fast paths against Algorithm 1 / the official NCHW configuration, and the benchmark's own machinery.

No test here looks at a time: only at what was measured, in which order, and at exact or hand-computed values.
"""
import json
import mmap
import os
import stat

import pytest
import torch

from asmlp_min import backbone, fast
from asmlp_min.backbone import create_model, pad_to_multiple
from asmlp_min.bench import (BenchSettings, OfficialAxialShiftMix,
                             OfficialPatchMerging, format_table, official_configuration, page_faults,
                             peak_memory_bytes, run_bench, settings_for, summarise, time_in_turns, write_json)
from asmlp_min.block import AxialShiftMix
from asmlp_min.fast import GroupNorm1, to_fast_layout
from asmlp_min.cli import main
from asmlp_min.shift import axial_shift
from tests.test_bench_sweep import Compiled
from tests.test_block import randomise
from tests.test_shift import algorithm1

CL = torch.channels_last
AXES = [(-1, 3), (-2, 2)]  # (our dim, Algorithm 1's dim)


def tiny(**kwargs):
    return create_model("asmlp_tiny", embed_dim=16, depths=(1, 1, 2, 1), **kwargs)


# ---------------------------------------------------------------- the shift in the model's layout (channels_last)

@pytest.mark.parametrize("channels", [3, 96, 97, 768])
@pytest.mark.parametrize("shift_size", [1, 3, 5, 7])
@pytest.mark.parametrize("dims", AXES)
@pytest.mark.parametrize("hw", [(7, 11), (2, 3)])  # non-square; (2, 3) is smaller than the shift's reach
def test_channels_last_shift_equals_algorithm1_forward_and_backward(channels, shift_size, dims, hw):
    ours, theirs = dims
    x = torch.randn(2, channels, *hw)
    x_cl = x.contiguous(memory_format=CL).requires_grad_()
    out = axial_shift(x_cl, shift_size, ours)
    assert out.is_contiguous(memory_format=CL)  # the layout is kept, so the next 1x1 conv stays a plain GEMM
    assert torch.equal(out, algorithm1(x, shift_size, theirs))
    grad_out = torch.randn_like(out)
    x_ref = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(algorithm1(x_ref, shift_size, theirs), x_ref, grad_out)
    (g_ours,) = torch.autograd.grad(out, x_cl, grad_out.contiguous(memory_format=CL))
    assert torch.equal(g_ours, g_ref)


# ---------------------------------------------------------------- layout helpers

def test_pad_to_multiple_pads_right_bottom_and_copies_only_when_needed():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert pad_to_multiple(x, 2).shape == (1, 1, 4, 4)
    assert torch.equal(pad_to_multiple(x, 2)[0, 0, 3], torch.zeros(4))  # one zero row at the bottom
    assert torch.equal(pad_to_multiple(x, 2)[0, 0, :3], x[0, 0])
    even = torch.randn(1, 2, 4, 6)
    assert pad_to_multiple(even, 2) is even  # no copy of an already even map


def test_model_runs_channels_last_on_cpu_by_default():
    model = tiny().eval()
    seen = []
    model.layers[0].blocks[0].axial_shift.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=CL)))
    model(torch.randn(2, 3, 32, 32))  # an NCHW image goes in
    assert seen == [True]
    assert to_fast_layout(torch.randn(2, 3, 4, 5)).is_contiguous(memory_format=CL)


# ---------------------------------------------------------------- the official configuration (the baseline)

def test_official_configuration_is_the_nchw_algorithm1_model_with_the_same_weights():
    model = randomise(tiny(num_classes=10))
    official = official_configuration(model)
    assert not fast.is_enabled(official) and fast.is_enabled(model)
    assert not any(isinstance(m, GroupNorm1) for m in official.modules())
    assert sum(isinstance(m, OfficialAxialShiftMix) for m in official.modules()) == 5
    assert sum(type(m) is torch.nn.GELU for m in official.modules()) == 10  # out of place, as the official code
    assert sum(isinstance(m, OfficialPatchMerging) for m in official.modules()) == 3
    assert sum(type(m) is backbone.ASMLPStage for m in official.modules()) == 4  # the whole batch at once
    assert sum(isinstance(m, GroupNorm1) for m in model.modules()) == 5 * 4 + 1 + 3 + 1  # the original is untouched
    sd, sd_off = model.state_dict(), official.state_dict()
    assert list(sd) == list(sd_off) and all(torch.equal(sd[k], sd_off[k]) for k in sd)
    mix = next(m for m in official.modules() if isinstance(m, AxialShiftMix))
    z = torch.randn(1, 16, 5, 6)
    assert torch.equal(mix.shift(z, -1), algorithm1(z, 5, 3)) and torch.equal(mix.shift(z, -2), algorithm1(z, 5, 2))
    seen = []
    official.layers[0].blocks[0].axial_shift.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous()))
    official(torch.randn(1, 3, 32, 32))
    assert seen == [True]  # NCHW inside


def test_official_configuration_of_a_float64_model_keeps_float64_weights():
    """The twins were built in float32 and given the weights rounded: a float64 model's copy crashed on its input."""
    model = randomise(tiny(num_classes=10)).double().eval()
    official = official_configuration(model)
    sd, sd_off = model.state_dict(), official.state_dict()
    assert all(sd_off[k].dtype == sd[k].dtype and torch.equal(sd[k], sd_off[k]) for k in sd)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(official(x), model(x), rtol=1e-12, atol=1e-12)


def test_the_load_average_is_none_where_the_system_keeps_none(monkeypatch):
    from asmlp_min.bench.measure import _loadavg
    assert len(_loadavg()) == 3
    monkeypatch.delattr(os, "getloadavg")  # Windows: the bench crashed with AttributeError before any timing
    assert _loadavg() is None


@pytest.mark.parametrize("option", [dict(dilation=2), dict(padding="circular")])
def test_official_configuration_refuses_shift_options_the_official_code_lacks(option):
    with pytest.raises(ValueError, match="no dilation and only zero padding"):
        official_configuration(tiny(**option))


def test_official_configuration_runs_the_whole_batch_where_ours_cuts_it(monkeypatch):
    model = randomise(tiny(num_classes=10)).eval()
    official = official_configuration(model)
    monkeypatch.setattr(fast, "PIECE_BYTES", 2 * 64 * 16 * 16 * 4)  # two images of stage 0's hidden layer
    batches = []
    run_blocks = backbone.ASMLPStage.run_blocks

    def counted(stage, x):
        batches.append(len(x))
        return run_blocks(stage, x)
    monkeypatch.setattr(backbone.ASMLPStage, "run_blocks", counted)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        assert batches[:3] == [2, 2, 1] and sum(batches) == 4 * 5  # stage 0 in three pieces
        batches.clear()
        theirs = official(x)
    assert batches == [5, 5, 5, 5]
    assert (ours - theirs).abs().max().item() <= 1e-5


def assert_fast_model_equals_official_configuration(size, device="cpu"):
    """Logits within 1e-5 and every parameter gradient within float32 rounding (tests/test_cuda.py too)."""
    torch.manual_seed(0)
    model = randomise(tiny(num_classes=10, drop_path_rate=0.0)).to(device).train()
    official = official_configuration(model)
    x = torch.randn(2, 3, *size, device=device)
    logits, want = model(x), official(x)
    assert (logits - want).abs().max().item() <= 1e-5
    grad = torch.randn_like(want)
    logits.backward(grad)
    want.backward(grad)
    for (name, p), p_off in zip(model.named_parameters(), official.parameters()):
        torch.testing.assert_close(p.grad, p_off.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("size", [(64, 64), (50, 71)])
def test_fast_model_equals_official_configuration_forward_and_backward(size):
    """Odd sizes included."""
    assert_fast_model_equals_official_configuration(size)


def test_fast_features_equal_official_configuration():
    torch.manual_seed(0)
    model = randomise(tiny(features_only=True)).eval()
    official = official_configuration(model)
    x = torch.randn(1, 3, 45, 61)
    for ours, ref in zip(model(x), official(x)):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- measurement machinery

def test_page_faults_counts_the_first_touch_of_fresh_memory():
    if page_faults(lambda: None) is None:  # Windows: no counter, and the table says n/a
        return
    size = 64 * 2**20
    ones = b"\1" * size
    memory = mmap.mmap(-1, size)  # anonymous memory of its own, not a malloc block an earlier test may have freed
    fresh = page_faults(lambda: memory.write(ones))  # the first write: the kernel maps it page by page
    memory.seek(0)
    again = page_faults(lambda: memory.write(ones))  # the same pages, already mapped
    memory.close()
    assert fresh >= size // (2 * 2**20)  # at least one fault per 2 MiB (huge pages), 16384 with 4 KiB pages
    assert again < fresh // 4


def test_time_in_turns_interleaves_candidates_and_drops_warmup():
    calls = []
    times = time_in_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=3)
    assert calls == ["a", "b"] * 5
    assert [len(t) for t in times.values()] == [3, 3] and all(v >= 0 for t in times.values() for v in t)


def test_peak_memory_counts_what_is_held_at_once():
    mib = 2 ** 20

    def step():
        a = torch.ones(mib, dtype=torch.uint8)        # 1 MiB
        b = torch.ones(3 * mib, dtype=torch.uint8)    # + 3 MiB held together: 4 MiB
        del a, b
        c = torch.ones(2 * mib, dtype=torch.uint8)    # 2 MiB alone: below the peak
        del c

    kept = torch.ones(8 * mib, dtype=torch.uint8)  # allocated before: not counted
    peak = peak_memory_bytes(step, "cpu")
    assert 4 * mib <= peak <= 4 * mib + 64 * 1024
    assert kept.numel() == 8 * mib


def test_settings_defaults_and_errors():
    cpu, quick = settings_for("cpu"), settings_for("cpu", quick=True)
    assert (cpu.batch, cpu.train_batch, cpu.amp, cpu.image_size) == (16, 8, False, 224)
    assert quick.repeats < cpu.repeats and quick.warmup < cpu.warmup
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        settings_for("tpu")
    with pytest.raises(ValueError, match="batch sizes, image size and repeats must be >= 1"):
        settings_for("cpu", batch=0)
    with pytest.raises(ValueError, match="unknown model"):
        settings_for("cpu", model="asmlp_huge")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            settings_for("cuda")


def fake_results():
    shift = [dict(stage=i, shape=[16, 96 * 2 ** i, 56 >> i, 56 >> i], memory_format="channels_last",
                  ms=dict(clone=1.0, asmlp_min_w=1.2, asmlp_min_h=1.1 + i / 10, algorithm1_w=6.0, algorithm1_h=5.0),
                  vs_clone=max(1.2, 1.1 + i / 10), speedup_vs_algorithm1=min(5.0, 5.0 / (1.1 + i / 10)))
             for i in range(4)]
    models = {name: dict(ms_per_batch=16e3 / ips, images_per_s=ips, gmacs=4.4, gflops=8.8 * ips,
                         matmul_fraction=8.8 * ips / 200, page_faults=faults)
              for name, ips, faults in [("asmlp_min", 20.0, 1234), ("official configuration", 10.0, 567890),
                                        ("swin_t", 13.6, None), ("convnext_tiny", 18.0, 0)]}
    training = {"asmlp_min": dict(ms_per_step=800, images_per_s=10.0, peak_memory_mib=900.0),
                "official configuration": dict(ms_per_step=1000, images_per_s=8.0, peak_memory_mib=1000.0)}
    return dict(shift=shift, inference=dict(batch=16, models=models, matmul=dict(n=2048, dtype="float32", gflops=200),
                                            compile_seconds=None),
                training=dict(batch=8, models=training), settings=vars(BenchSettings()) | dict(model_kwargs={}),
                device_name="x86_64", torch="2.x", threads=2, cpu_count=2, loadavg_before=[1.0, 1, 1],
                loadavg_after=[1.5, 1, 1], seconds=42.0)


def test_summarise_computes_each_target_ratio():
    summary = summarise(fake_results())
    r, t = summary["ratios"], summary["targets"]
    assert r["inference_vs_official"] == 2.0 and r["inference_vs_swin_t"] == pytest.approx(20 / 13.6)
    assert r["inference_vs_convnext_tiny"] == pytest.approx(20 / 18) and r["training_vs_official"] == 1.25
    assert r["training_memory_vs_official"] == 0.9 and r["shift_vs_clone_worst"] == pytest.approx(1.4)
    assert r["matmul_fraction"] == pytest.approx(8.8 * 20 / 200)
    assert r["shift_speedup_worst"] == pytest.approx(5.0 / 1.4)
    met = {name: v["met"] for name, v in t.items()}
    assert met == {
        "shift <= 1.3x clone at every stage": False, "shift >= 4x faster than Algorithm 1 at every stage": False,
        "inference >= 1.5x official configuration": True,
        "inference >= 1.5x swin_t": False, "inference >= 1.2x convnext_tiny": False,  # 1.47x, 1.11x: issue 20's bars
        "inference >= 85% of matmul GFLOP/s": True,  # 176 of 200
        "training step >= 1.3x official configuration": False, "training peak memory <= official configuration": True}


def test_format_table_lists_every_candidate_and_target():
    results = fake_results()
    results.update(summarise(results))
    results["inference"]["compile_seconds"] = {"asmlp_min": 44.2, "swin_t": 30.0}
    table = format_table(results)
    for text in ["torch.compile (default mode) took asmlp_min 44 s, swin_t 30 s before timing",
                 "| asmlp_min | 800 | 20.0 | 1.00x |", "| official configuration | 1600 | 10.0 | 2.00x |",
                 "| 88% | 1,234 |", "| 44% | 567,890 |", "| 60% | n/a |", "| 79% | 0 |", "Page faults: fresh",
                 "| swin_t |", "| convnext_tiny |", "| 3 | (16, 768, 7, 7) |", "matmul 2048x2048 float32",
                 "load average 1.00 before, 1.50 after", "| inference >= 1.5x swin_t | 20 | 1.47 | no |",
                 "| training peak memory <= official configuration | 7 | 0.90 | yes |"]:
        assert text in table, text


def test_cuda_tables_say_whether_the_shift_ran_as_the_triton_kernel(monkeypatch):
    """The Triton A/B (fast.triton = None in one run) must be readable from the tables alone."""
    from asmlp_min.bench import measure
    from asmlp_min.bench.sweep import format_sweep_table, sweep_targets
    from tests.test_bench_sweep import hand_made_sweep
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # settings_for("cuda") checks it
    notes = {}
    for triton, cuda_shift in [(object(), "one Triton kernel"), (None, "torch slice copies (no Triton)")]:
        monkeypatch.setattr(fast, "triton", triton)
        results = {**fake_results(), **measure._environment(settings_for("cuda"))}
        assert results["cuda_shift"] == cuda_shift
        results.update(summarise(results))
        made = hand_made_sweep()
        sweep = dict(results, sweep=made, targets=sweep_targets(made["ratios"]),
                     settings=vars(settings_for("cuda", batches=(64, 128))))
        notes[triton is None] = [f"asmlp_min's eager shift: {cuda_shift}." in text
                                 for text in (format_table(results), format_sweep_table(sweep))]
    assert notes == {False: [True, True], True: [True, True]}
    cpu = {**fake_results(), **measure._environment(settings_for("cpu"))}
    cpu.update(summarise(cpu))
    assert cpu["cuda_shift"] is None and "eager shift" not in format_table(cpu)


def test_run_bench_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(kwargs) or Compiled(model))
    settings = settings_for("cpu", quick=True, image_size=32, batch=2, train_batch=2, warmup=0, repeats=1,
                            shift_repeats=1, peers=(), model_kwargs=dict(embed_dim=8, depths=(1, 1, 1, 1)),
                            compile=True)
    results = run_bench(settings, progress=False)
    assert [row["shape"] for row in results["shift"]] == [[2, 8, 8, 8], [2, 16, 4, 4], [2, 32, 2, 2], [2, 64, 1, 1]]
    assert list(results["inference"]["models"]) == ["asmlp_min", "official configuration", "asmlp_min + torch.compile",
                                                    "official configuration + torch.compile"]
    assert compiled == [dict(backend="inductor")] * 2  # every candidate, the same call
    assert list(results["inference"]["compile_seconds"]) == ["asmlp_min", "official configuration"]
    assert set(results["training"]["models"]) == {"asmlp_min", "official configuration"}
    assert results["training"]["models"]["asmlp_min"]["peak_memory_mib"] > 0
    assert results["threads"] == torch.get_num_threads()
    path = tmp_path / "out" / "bench.json"
    write_json(results, path)
    assert json.loads(path.read_text())["inference"]["batch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary file left behind


def test_write_json_gives_normal_permissions_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "bench.json"
    umask = os.umask(0o022)
    try:
        write_json({"ok": 1}, path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644                    # not mkstemp's 0o600
    with pytest.raises(TypeError):
        write_json({"ok": object()}, path)                               # json.dump fails half way
    assert json.loads(path.read_text()) == {"ok": 1} and os.listdir(tmp_path) == ["bench.json"]


def test_cli_bench_passes_its_flags_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch):
    seen = []

    def fake_run(settings, progress=True):
        seen.append(settings)
        results = fake_results()
        results.update(summarise(results))
        return results

    monkeypatch.setattr("asmlp_min.bench.cli.run_bench", fake_run)
    path = tmp_path / "b.json"
    code = main(["bench", "--quick", "--no-peers", "--model=asmlp_small", "--image-size=32", "--batch=1",
                 "--train-batch=2", "--repeats=5", f"--json={path}"])
    out = capsys.readouterr().out
    assert code == 0 and "### Targets\n" in out and "| official configuration | 1600 | 10.0 | 2.00x |" in out
    (settings,) = seen
    assert (settings.model, settings.image_size, settings.batch, settings.train_batch) == ("asmlp_small", 32, 1, 2)
    assert (settings.repeats, settings.warmup, settings.peers, settings.device) == (5, 1, (), "cpu")
    assert json.loads(path.read_text())["inference"]["models"]["swin_t"]["images_per_s"] == 13.6


def test_cli_bench_keep_freed_memory_flag_applies_the_setting(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("asmlp_min.bench.cli.keep_freed_memory", lambda: calls.append(1) or True)
    results = {**fake_results(), **summarise(fake_results())}
    monkeypatch.setattr("asmlp_min.bench.cli.run_bench", lambda settings, progress=True: results)
    assert main(["bench", "--quick"]) == 0 and calls == []
    assert main(["bench", "--quick", "--keep-freed-memory"]) == 0 and calls == [1]
    monkeypatch.setattr("asmlp_min.bench.cli.keep_freed_memory", lambda: False)
    assert main(["bench", "--keep-freed-memory"]) == 2
    assert "needs glibc's malloc" in capsys.readouterr().err


def test_cli_bench_refuses_an_unwritable_json_path_before_timing_anything(tmp_path, capsys, monkeypatch):
    timed = []
    monkeypatch.setattr("asmlp_min.bench.cli.run_bench", lambda settings, progress=True: timed.append(1))
    (tmp_path / "file").write_text("")
    for path, problem in ((tmp_path, "is a folder"), (tmp_path / "file" / "b.json", "file' is a file, not a folder")):
        assert main(["bench", "--quick", f"--json={path}"]) == 2
        assert problem in capsys.readouterr().err
    assert timed == []


def test_cli_bench_errors_are_one_line(capsys):
    assert main(["bench", "--threads=0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--quick", "--image-size=31"]) == 2     # was a traceback from convnext_tiny's 4x4 stem
    assert "must be >= 32 for the peer convnext_tiny" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device=cuda"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err
