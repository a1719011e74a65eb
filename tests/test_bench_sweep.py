"""The batch sweep of ``asmlp-min bench --batches``: saturation and ratio rules on hand-made numbers, the rounds,
the time guard, compilation of every candidate, the table, and a tiny run end to end on the CPU.

No test here looks at a time: only at what was measured, in which order, and at hand-computed values.
"""
import json
import types

import pytest
import torch
from torch import nn

from asmlp_min.bench import settings_for, sweep as bench_sweep, write_json
from asmlp_min.bench.sweep import (collect_sweep, format_sweep_table, ratio_at_saturation, rounds_at, run_sweep,
                                   saturating_batch, sweep_batches, sweep_images, sweep_targets)
from asmlp_min.cli import main

TINY = dict(embed_dim=8, depths=(1, 1, 1, 1))


def tiny_settings(**overrides):
    values = dict(image_size=32, batches=(1, 2), train_batches=(1, 2), warmup=0, repeats=1, peers=(),
                  model_kwargs=TINY)
    return settings_for("cpu", **values | overrides)


# ---------------------------------------------------------------- the rules, on hand-made numbers

def test_saturating_batch_is_the_smallest_within_5_percent_of_the_best():
    batches = [64, 128, 256, 512]
    assert saturating_batch(batches, [100, 180, 191, 200]) == 256   # 191 >= 190, 180 < 190
    assert saturating_batch(batches, [100, 180, 189, 200]) == 512   # 189 < 190: only the best itself
    assert saturating_batch(batches, [100, 200, 150, 120]) == 128   # a dip after the best does not move it
    assert saturating_batch(batches, [50, 50, 50, 50]) == 64        # flat from the start
    assert saturating_batch([16], [3.0]) == 16


def test_ratio_is_taken_where_both_are_saturated():
    batches = [1, 2, 4, 8]
    ours = [10, 20, 30, 30]                                      # saturates at 4
    assert ratio_at_saturation(batches, ours, [10, 10, 10, 10]) == dict(at_batch=4, ratio=3.0)  # theirs at 1
    assert ratio_at_saturation(batches, ours, [5, 10, 20, 40]) == dict(at_batch=8, ratio=0.75)  # theirs at 8


def test_rounds_shrink_with_the_batch_but_not_below_three():
    assert [rounds_at(20, b, 64) for b in (64, 128, 256, 512)] == [20, 10, 5, 3]
    assert [rounds_at(10, b, 64) for b in (64, 128, 256, 512)] == [10, 5, 3, 3]
    assert rounds_at(1, 512, 64) == 1 and rounds_at(0, 128, 64) == 0  # never more than asked


# ---------------------------------------------------------------- the time guard and running out of memory

def fake_clock_sweep(monkeypatch, settings, compile_s=0.0, oom_at=None, oom_in="inference", seconds=lambda b: b):
    """sweep_batches with measurements that take seconds(batch) of a fake clock (plus compile_s at the first
    batch, spent in the first call of a compiled candidate); out of memory at batch oom_at in oom_in."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(bench_sweep, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def measure_training_at(settings, ours, official, batch, first_batch, progress=None):
        if (batch, oom_in) == (oom_at, "training"):
            raise torch.OutOfMemoryError("fake")
        return {}

    def measure_batch(settings, candidates, batch, first_batch, progress=None):
        if (batch, oom_in) == (oom_at, "inference"):
            raise torch.OutOfMemoryError("fake")
        first = compile_s if batch == first_batch else 0.0
        clock.now += seconds(batch) + first
        return {("eager", "asmlp_min"): dict(seconds=0.5, first_call_seconds=0.5),
                ("compiled", "asmlp_min"): dict(seconds=0.5, first_call_seconds=0.5 + first)}

    monkeypatch.setattr(bench_sweep, "measure_batch", measure_batch)
    monkeypatch.setattr(bench_sweep, "measure_training_at", measure_training_at)
    return sweep_batches(settings, {}, None, None)


def test_time_guard_stops_before_a_batch_that_would_end_too_late(monkeypatch):
    settings = tiny_settings(batches=(1, 2, 4, 8), train_batches=(), max_seconds=110)
    # batch 1 takes 1 s + 100 s compiling, which the estimate leaves out: 2 at 101 + 2 <= 110, 4 at 103 + 4 <= 110,
    # 8 at 107 + 8 > 110
    inference, training, stopped = fake_clock_sweep(monkeypatch, settings, compile_s=100.0)
    assert sorted(inference) == [1, 2, 4] and training == {}
    assert stopped == dict(before_batch=8, reason="--max-seconds 110: 107 s gone, batch 8 would take about 8 s more")
    results = dict(sweep=collect_sweep(inference, training, stopped), settings=vars(settings), device_name="x",
                   torch="2.x", threads=2, cpu_count=2, seconds=107.0, targets={})
    assert "**Stopped before batch 8**: --max-seconds 110: 107 s gone" in format_sweep_table(results)


def test_time_guard_counts_the_fewer_rounds_of_larger_batches(monkeypatch):
    """Warm-up 2, repeats 10 from batch 64: 1 + 2 + 10 calls at 64, 1 + 2 + 5 at 128, 1 + 2 + 3 at 256 and 512 (by
    hand), 0.01 s per image and call: 8.32, 10.24, 15.36, 30.72 s. Scaled by the batch alone, 256 was estimated at
    20.48 s, twice its time, and 18.56 + 20.48 > 35 stopped the sweep one batch early."""
    calls = {64: 13, 128: 8, 256: 6, 512: 6}
    settings = tiny_settings(batches=(64, 128, 256, 512), train_batches=(), warmup=2, repeats=10, max_seconds=35)
    inference, _, stopped = fake_clock_sweep(monkeypatch, settings, seconds=lambda b: 0.01 * b * calls[b])
    assert sorted(inference) == [64, 128, 256]
    assert stopped == dict(before_batch=512, reason="--max-seconds 35: 34 s gone, batch 512 would take about 31 s more")


def test_without_max_seconds_every_batch_runs(monkeypatch):
    settings = tiny_settings(batches=(1, 2, 4, 8), train_batches=())
    inference, _, stopped = fake_clock_sweep(monkeypatch, settings, compile_s=100.0)
    assert sorted(inference) == [1, 2, 4, 8] and stopped is None


def test_out_of_memory_stops_the_sweep_and_keeps_whole_batches(monkeypatch):
    settings = tiny_settings(batches=(1, 2, 4, 8), train_batches=())
    inference, _, stopped = fake_clock_sweep(monkeypatch, settings, oom_at=4)
    assert sorted(inference) == [1, 2] and stopped == dict(before_batch=4, reason="out of cpu memory")
    with pytest.raises(ValueError, match="out of cpu memory at the sweep's first batch 1: choose smaller"):
        fake_clock_sweep(monkeypatch, settings, oom_at=1)
    both = tiny_settings(batches=(1, 2, 4, 8), train_batches=(1, 2, 4, 8))
    inference, training, stopped = fake_clock_sweep(monkeypatch, both, oom_at=4, oom_in="training")
    assert sorted(inference) == sorted(training) == [1, 2] and stopped["before_batch"] == 4  # not inference at 4


# ---------------------------------------------------------------- compilation

class Compiled(nn.Module):
    """Stands for torch.compile's wrapper: runs the model and counts the calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


class Peer(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_compile_mode_compiles_every_candidate_once_and_times_it_beside_its_eager_self(monkeypatch):
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append((model, kwargs, Compiled(model)))
        return compiled[-1][2]

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(bench_sweep, "_peer", lambda name: Peer())
    seen = []
    time_in_turns = bench_sweep.time_in_turns
    monkeypatch.setattr(bench_sweep, "time_in_turns", lambda calls, warmup, repeats, *args: seen.append(
        (list(calls), warmup, repeats)) or time_in_turns(calls, warmup, repeats, *args))
    settings = tiny_settings(batches=(2, 4), train_batches=(), compile=True, peers=("swin_t", "convnext_tiny"),
                             warmup=2, repeats=4)
    results = run_sweep(settings, progress=False)
    names = ["asmlp_min", "official configuration", "swin_t", "convnext_tiny"]
    assert [type(model).__name__ for model, _, _ in compiled] == ["ASMLP", "ASMLP", "Peer", "Peer"]
    assert all(kwargs == dict(backend="inductor") for _, kwargs, _ in compiled)  # the same call, default mode
    keys = [("eager", name) for name in names] + [("compiled", name) for name in names]
    assert seen == [(keys, 2, 4), (keys, 2, 3)]  # all in the same rounds; fewer at batch 4 (max(3, 4 * 2 / 4))
    assert [wrapper.calls for _, _, wrapper in compiled] == [(1 + 2 + 4) + (1 + 2 + 3)] * 4  # first call + rounds
    sweep = results["sweep"]
    assert list(sweep["inference"]) == ["eager", "compiled"] and list(sweep["inference"]["compiled"]) == names
    assert list(sweep["compile_seconds"]) == names and list(sweep["ratios"]["compiled"]) == names[1:]
    assert set(results["targets"]) == {"eager inference >= 1.4x swin_t", "compiled inference >= compiled swin_t"}


def test_compile_mode_reaches_torch_compile_and_the_tables(monkeypatch, capsys):
    """--compile-mode reduce-overhead (CUDA graphs): the same torch.compile call for every candidate, with that mode;
    the default mode passes none. The tables name the mode."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or Compiled(model))
    monkeypatch.setattr(bench_sweep, "_peer", lambda name: Peer())
    settings = tiny_settings(batches=(2,), train_batches=(), compile=True, compile_mode="reduce-overhead",
                             peers=("swin_t",))
    results = run_sweep(settings, progress=False)
    assert calls == [dict(backend="inductor", mode="reduce-overhead")] * 3
    assert "### Inference, each model through torch.compile (reduce-overhead mode)" in format_sweep_table(results)
    calls.clear()
    assert main(["bench", "--quick", "--no-peers", "--model=asmlp_mobile", "--image-size=32", "--batches=1",
                 "--compile", "--compile-mode=max-autotune"]) == 0
    assert calls == [dict(backend="inductor", mode="max-autotune")] * 2
    assert "torch.compile (max-autotune mode)" in capsys.readouterr().out


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="must be one of .* and applies with --compile"):
        settings_for("cpu", compile=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="applies with --compile, got 'reduce-overhead' with compile=False"):
        settings_for("cpu", compile_mode="reduce-overhead")


def test_one_compilation_serves_every_batch_of_the_sweep():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = torch.compile(nn.Conv2d(3, 4, 1), backend=counting_backend)
    settings = tiny_settings(image_size=8)
    for batch in (2, 4, 8):
        assert model(sweep_images(settings, batch)).shape == (batch, 4, 8, 8)
    assert len(graphs) == 1  # the batch dimension is dynamic from the first call: no recompilation


# ---------------------------------------------------------------- the table and the targets

def hand_made_sweep():
    """images/s at batches 64, 128: eager asmlp_min 100, 180 and swin_t 100, 120; compiled 200, 300 and 250, 250.
    Training at 64, 128: asmlp_min 10, 20 images/s and 900, 1800 MiB; official configuration 8, 12 and 800, 1700."""
    speeds = {("eager", "asmlp_min"): (100, 180), ("eager", "swin_t"): (100, 120),
              ("compiled", "asmlp_min"): (200, 300), ("compiled", "swin_t"): (250, 250)}
    inference = {b: {key: dict(seconds=b / ips[i], first_call_seconds=b / ips[i] + (7.0 if i == 0 else 0.5))
                     for key, ips in speeds.items()} for i, b in enumerate((64, 128))}
    training = {b: {"asmlp_min": dict(ms_per_step=1e3 * b / ours, images_per_s=ours, peak_memory_mib=ours_mib),
                    "official configuration": dict(ms_per_step=1e3 * b / theirs, images_per_s=theirs,
                                                   peak_memory_mib=theirs_mib)}
                for b, ours, theirs, ours_mib, theirs_mib in [(64, 10.0, 8.0, 900.0, 800.0),
                                                              (128, 20.0, 12.0, 1800.0, 1700.0)]}
    return collect_sweep(inference, training, None)


def test_collect_sweep_saturation_ratios_and_compile_seconds():
    sweep = hand_made_sweep()
    eager = sweep["inference"]["eager"]
    assert eager["asmlp_min"]["images_per_s"] == pytest.approx([100, 180]) and sweep["batches"] == [64, 128]
    assert (eager["asmlp_min"]["saturates_at"], eager["swin_t"]["saturates_at"]) == (128, 128)
    assert sweep["ratios"]["eager"]["swin_t"] == dict(at_batch=128, ratio=pytest.approx(1.5))
    assert sweep["ratios"]["compiled"]["swin_t"] == dict(at_batch=128, ratio=pytest.approx(1.2))  # theirs at 64
    assert sweep["compile_seconds"] == pytest.approx({"asmlp_min": 7.5, "swin_t": 7.5})  # 7 + 0.5 beyond a call
    assert sweep["ratios"]["training"] == dict(images_per_s=dict(at_batch=128, ratio=pytest.approx(20 / 12)),
                                               peak_memory_mib=dict(at_batch=128, ratio=pytest.approx(18 / 17)))
    met = {text: t["met"] for text, t in sweep_targets(sweep["ratios"]).items()}
    assert met == {"eager inference >= 1.4x swin_t": True, "compiled inference >= compiled swin_t": True,
                   "training step >= 1.2x official configuration": True,
                   "training peak memory <= official configuration": False}


def test_format_sweep_table_has_one_table_per_mode_with_batches_as_columns():
    sweep = hand_made_sweep()
    settings = settings_for("cpu", batches=(64, 128), train_batches=(64, 128), compile=True)
    results = dict(sweep=sweep, settings=vars(settings), device_name="x86_64", torch="2.x", threads=2, cpu_count=2,
                   loadavg_before=[1.0, 1, 1], loadavg_after=[1.5, 1, 1], seconds=42.0,
                   targets=sweep_targets(sweep["ratios"]))
    table = format_sweep_table(results)
    for text in ["### Inference, eager: images/s", "| model | batch 64 | batch 128 | saturates at |",
                 "| asmlp_min | 100 | 180 | 128 (still rising?) |", "| swin_t | 100 | 120 | 128 (still rising?) |",
                 "### Inference, each model through torch.compile (default mode)",
                 "| asmlp_min | 200 | 300 | 128 (still rising?) |", "| swin_t | 250 | 250 | 64 |",
                 "asmlp_min / swin_t: 1.50x at batch 128", "asmlp_min / swin_t: 1.20x at batch 128",
                 "torch.compile, once per model with the batch dimension dynamic: asmlp_min 8 s, swin_t 8 s",
                 "| asmlp_min | 10.0 / 900 | 20.0 / 1800 | 128 (still rising?) |",
                 "| official configuration | 8.0 / 800 | 12.0 / 1700 | 128 (still rising?) |",
                 "asmlp_min / official configuration: 1.67x images/s and 1.06x peak memory at batch 128",
                 "| training peak memory <= official configuration | 1.06 | 128 | no |",
                 "| eager inference >= 1.4x swin_t | 1.50 | 128 | yes |", "load average 1.00 before, 1.50 after",
                 "within 5% of the model's best"]:
        assert text in table, text
    assert "Stopped" not in table


# ---------------------------------------------------------------- end to end on the CPU, and the command line

def test_sweep_end_to_end_on_a_tiny_model(tmp_path):
    results = run_sweep(tiny_settings(), progress=False)
    sweep = results["sweep"]
    assert sweep["batches"] == [1, 2] and list(sweep["inference"]) == ["eager"] and sweep["stopped"] is None
    models = sweep["inference"]["eager"]
    assert list(models) == ["asmlp_min", "official configuration"]
    for m in models.values():
        assert len(m["images_per_s"]) == 2 and min(m["images_per_s"]) > 0 and m["saturates_at"] in (1, 2)
        assert m["images_per_s"] == pytest.approx([1e3 * b / ms for b, ms in zip((1, 2), m["ms_per_batch"])])
    trained = sweep["training"]
    assert trained["batches"] == [1, 2] and min(trained["models"]["asmlp_min"]["peak_memory_mib"]) > 0
    assert set(results["targets"]) == {"training step >= 1.2x official configuration",
                                       "training peak memory <= official configuration"}  # no swin_t, no compile
    path = tmp_path / "sweep.json"
    write_json(results, path)
    assert json.loads(path.read_text())["sweep"]["inference"]["eager"]["asmlp_min"]["saturates_at"] in (1, 2)
    assert "| official configuration |" in format_sweep_table(results)


def test_cli_batches_runs_the_sweep(tmp_path, capsys, monkeypatch):
    seen = []
    results = dict(sweep=hand_made_sweep(), settings=vars(settings_for("cpu", batches=(64, 128))), device_name="x",
                   torch="2.x", threads=2, cpu_count=2, seconds=1.0, targets={})
    monkeypatch.setattr(bench_sweep, "run_sweep", lambda settings: seen.append(settings) or results)
    path = tmp_path / "s.json"
    assert main(["bench", "--batches", "4,1,4", "--max-seconds", "5", "--compile", f"--json={path}"]) == 0
    assert main(["bench", "--batches", "1,2", "--train-batch", "3"]) == 0
    assert "| asmlp_min | 100 | 180 |" in capsys.readouterr().out and json.loads(path.read_text())["sweep"]
    assert [(s.batches, s.train_batches, s.max_seconds, s.compile) for s in seen] == [
        ((1, 4), (1, 4), 5.0, True), ((1, 2), (3,), None, False)]


@pytest.mark.parametrize("text, message", [("0,64", "every batch size must be >= 1"),
                                           ("64,x", "expected comma-separated batch sizes")])
def test_cli_batches_must_be_positive_integers(text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--batches", text])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-seconds", "5"], "max_seconds (--max-seconds) must be > 0 and limits a sweep"),
    (["--batches", "1,2", "--max-seconds", "0"], "must be > 0"),
    (["--batches", "1,2", "--batch", "4"], "--batch is the single batch of the default tables"),
])
def test_cli_sweep_errors_are_one_line(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err
