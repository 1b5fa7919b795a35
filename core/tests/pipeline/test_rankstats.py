"""The per-rank meter: a phase entered again (one per stage of a sequential step) adds up."""

from __future__ import annotations

import time

import torch

from curvprune.pipeline import rankstats
from curvprune.pipeline.rankstats import RankMeter


def test_a_phase_entered_again_adds_its_seconds_and_keeps_the_highest_peak(monkeypatch):
    peaks = iter([300, 100])
    monkeypatch.setattr(rankstats, "reset_phase_peak", lambda device: True)
    monkeypatch.setattr(rankstats, "phase_peak_bytes", lambda device: next(peaks))
    meter = RankMeter(torch.device("cpu"))
    for curvature in (0.01, 0.02):
        with meter.phase("answer", "scoring") as inside:
            time.sleep(0.05)
            inside["curvature"] = curvature
    assert meter.values["curvature"] == 0.01 + 0.02
    assert 2 * 0.05 - 0.03 - 0.01 <= meter.values["scoring"] < 1.0  # both stages' rest
    assert meter.values["answer_peak_bytes"] == 300  # the higher of the two phases
    assert meter.gather() == [{"rank": 0, **meter.values}]
