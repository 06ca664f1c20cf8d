"""Benchmark sizes (GPU: the real SD1.5 sizes; CPU: see each file) and a ratio table at the end.

Every benchmark sets ``benchmark.group`` to the case and ``benchmark.extra_info["variant"]``; the
summary prints each variant's median time as a ratio to the case's floor variant, measured side by
side in the same run, and, where a benchmark records one, the median of back-to-back paired ratios
(each call timed right after the floor: robust to a shared machine's load drifting between tests).
``pytest benchmarks/ --benchmark-only``.
"""
import os

import pytest
import torch

from .common import GPU

FLOOR = {"op": "gemm", "pipeline": "unpatched", "train": "eager"}


def pytest_configure(config):
    os.environ.setdefault("SAEURON_BENCH", "1")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    groups = {}
    for b in bs.benchmarks:
        info = b.extra_info or {}
        groups.setdefault(b.group, []).append((info.get("variant", b.name), info.get("kind", "op"), b.stats.median,
                                               info.get("paired_ratio")))
    tr = terminalreporter
    dev = torch.cuda.get_device_name() if GPU else f"CPU, {torch.get_num_threads()} threads"
    tr.write_sep("=", f"saeuron ratios ({dev}, torch {torch.__version__})")
    tr.write_line("| case | variant | median | ratio to floor | paired ratio |")
    tr.write_line("|---|---|---|---|---|")
    for group, rows in groups.items():
        kind = rows[0][1]
        floor = next((m for v, _, m, _ in rows if v == FLOOR.get(kind)), None)
        for v, _, m, paired in rows:
            ratio = f"{m / floor:.3f}" if floor else "n/a"
            pr = f"{paired:.3f}" if paired is not None else ""
            tr.write_line(f"| {group} | {v} | {m * 1e6:.1f} us | {ratio} | {pr} |")
