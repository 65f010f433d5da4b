"""A job's time split into phases: they add up to the whole, they are recorded as one
total and a small table, and the interpreter's start-up goes to its first job alone."""

from __future__ import annotations

import time

import pytest

from cifar_exp.training import timeline as timeline_module
from cifar_exp.training.timeline import PHASES, Timeline


def test_phases_and_the_rest_add_up_to_the_total():
    timeline = Timeline(startup=1.5)
    with timeline.phase("data"):
        time.sleep(0.02)
    timeline.add("training", 0.002)
    timeline.add("training", 0.003)  # phases add up
    time.sleep(0.02)  # in no phase: "other"
    breakdown = timeline.breakdown()
    assert list(breakdown) == [*PHASES, "total"]
    assert breakdown["startup"] == 1.5 and breakdown["training"] == pytest.approx(0.005)
    assert 0.02 <= breakdown["data"] < 1.0
    assert breakdown["other"] >= 0.015
    assert breakdown["total"] == pytest.approx(sum(breakdown[p] for p in PHASES))


def test_the_table_holds_a_row_per_phase_then_the_total():
    timeline = Timeline(startup=1.5)
    with timeline.phase("training"):
        time.sleep(0.02)
    rows = [line.split(",") for line in timeline.table().splitlines()]
    assert rows[0] == ["phase", "seconds"]
    assert [phase for phase, _ in rows[1:]] == [*PHASES, "total"]
    seconds = {phase: float(value) for phase, value in rows[1:]}
    assert seconds["startup"] == 1.5 and 0.02 <= seconds["training"] < 1.0
    assert seconds["total"] == pytest.approx(sum(seconds[p] for p in PHASES), abs=0.01)


def test_time_added_beyond_the_clock_leaves_no_negative_rest():
    timeline = Timeline()
    timeline.add("training", 5.0)  # e.g. measured by a clock that started earlier
    assert timeline.breakdown()["other"] == 0.0


def test_the_total_counts_real_time_from_the_start():
    timeline = Timeline(startup=0.25)
    with timeline.phase("build"):
        time.sleep(0.03)
    breakdown = timeline.breakdown()
    assert breakdown["total"] == pytest.approx(sum(breakdown[p] for p in PHASES))
    assert 0.28 <= breakdown["total"] < 1.5


def test_a_phase_that_raises_is_still_counted():
    timeline = Timeline()
    with pytest.raises(RuntimeError), timeline.phase("checkpoints"):
        time.sleep(0.01)
        raise RuntimeError("disk full")
    assert timeline.seconds["checkpoints"] >= 0.01


def test_an_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown phase 'warmup'; one of startup, data"):
        Timeline().add("warmup", 1.0)


def test_the_summary_names_the_phases_that_took_time():
    timeline = Timeline(startup=3.04)
    timeline.add("model_logging", 10.0)
    summary = timeline.summary()
    assert summary.startswith(f"{timeline.breakdown()['total']:.1f} s in all: startup 3.0 s")
    assert "model logging 10.0 s" in summary
    assert "evaluation" not in summary  # 0 s: left out


def test_only_the_first_job_of_a_process_gets_its_start_up(monkeypatch):
    monkeypatch.setattr(timeline_module, "_startup_claimed", False)
    first, second = Timeline.for_job(), Timeline.for_job()
    assert first.seconds["startup"] > 0  # this test process started before it ran
    assert second.seconds["startup"] == 0.0


def test_the_start_up_is_the_interpreters_age(monkeypatch):
    monkeypatch.setattr(timeline_module, "_startup_claimed", False)
    monkeypatch.setattr(timeline_module, "interpreter_seconds", lambda: 7.25)
    assert Timeline.for_job().seconds["startup"] == 7.25
