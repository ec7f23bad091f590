"""Progress a person can follow when stderr is not a terminal (Slurm, Kubernetes logs): periodic plain lines
with the count, rate and ETA, and the trainer's `step N/T loss lr tok/s ETA` lines."""

from __future__ import annotations

import re

from pipeline import log


def test_progress_prints_plain_lines_with_rate_and_eta(capsys):
    assert list(log.progress(range(5), desc="cache minilm", unit="shard", every_s=0.0)) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 6  # one per item at every_s=0, and the closing one
    assert re.search(r"cache minilm: 3/5 shard, [\d.]+ shard/s, ETA \d:\d\d:\d\d$", lines[2]), lines[2]
    assert "5/5 shard" in lines[-1]


def test_progress_without_a_total_still_counts(capsys):
    list(log.progress(iter(range(3)), desc="shard", unit="doc", every_s=0.0))
    line = capsys.readouterr().err.splitlines()[-1]
    assert re.search(r"shard: 3 doc, [\d.]+ doc/s$", line), line


def test_a_short_loop_prints_no_closing_line(capsys):
    list(log.progress(range(3), desc="eval", every_s=3600))
    assert capsys.readouterr().err == ""


def test_training_progress_line(capsys):
    bar = log.Progress("task prediction", 40, start=10)
    bar.report(20, {"loss": "0.6931", "lr": "1.00e-04", "tok/s": "1,234"})
    bar.close()
    line = capsys.readouterr().err.strip()
    assert re.search(r"task prediction step 20/40 loss 0\.6931 lr 1\.00e-04 tok/s 1,234 ETA \d:\d\d:\d\d$", line), line


def test_quiet_processes_print_nothing(capsys):
    log.configure(quiet=True)
    try:
        list(log.progress(range(3), desc="x", every_s=0.0))
        log.Progress("y", 3).report(1, {"loss": "1"})
    finally:
        log.configure(quiet=False)
    assert capsys.readouterr().err == ""
