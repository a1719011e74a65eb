"""``asmlp-min bench``: speed and memory of asmlp_min beside the official configuration and torchvision peers.

Every figure comes from one run, and the candidates of each table are timed in turns (one call of each, then
the next round), so a busy neighbour slows them all alike and the *ratios* stay meaningful on a shared
machine. A time is the median over ``repeats`` rounds after ``warmup`` untimed rounds.

One job per module:

* :mod:`.settings`: what a run measures (model, sizes, rounds, candidates) and the defaults per device.
* :mod:`.official`: the official configuration, the baseline (same weights, run the way the official code runs).
* :mod:`.measure`: the instruments (time in turns, peak memory, page faults) and the default tables' measurements:
  the shift, inference beside a matmul, and a training step.
* :mod:`.report`: the target ratios, the markdown table and the JSON file.
* :mod:`.sweep`: ``--batches``, images/s over a sweep of batch sizes and where each candidate saturates.
* :mod:`.cli`: the ``bench`` subcommand's arguments and the run they ask for.

``--compile`` adds every candidate through the same ``torch.compile`` call; ``--batches`` replaces the default
tables with the sweep.
"""
from .cli import add_bench_parser, bench_command
from .measure import (measure_inference, measure_shift, measure_training, page_faults, peak_memory_bytes,
                      run_bench, time_in_turns)
from .official import OfficialAxialShiftMix, OfficialPatchMerging, official_configuration
from .report import TARGETS, format_table, summarise, write_json
from .settings import BenchSettings, settings_for

__all__ = ["BenchSettings", "OfficialAxialShiftMix", "OfficialPatchMerging", "TARGETS",
           "add_bench_parser", "bench_command", "format_table", "measure_inference", "measure_shift",
           "measure_training", "official_configuration", "page_faults", "peak_memory_bytes", "run_bench",
           "settings_for", "summarise", "time_in_turns", "write_json"]
