"""Rates, goals and ETAs of an augment run (augment/progress.py), against hand-computed values."""

from __future__ import annotations

import pytest

from augment.progress import Goal, eta_s, format_rate, goal, rate
from augment.runner import Progress


def test_a_rate_is_what_was_done_over_the_time_it_took():
    # The smoke run of issue 12: 80 requests in 1.5 s is 53.3 a second, not 546.
    assert rate(80, 1.5) == pytest.approx(53.333, abs=1e-3)
    assert rate(0, 10.0) == 0.0
    assert rate(5, 0.0) == 0.0  # no time yet: no rate, not a division by zero


def test_slow_rates_also_say_the_seconds_each():
    assert format_rate(53.333) == "53.3 req/s"
    assert format_rate(0.1) == "0.10 req/s (10.0 s each)"
    assert format_rate(0.0) == "0 req/s"


def test_the_goal_is_the_cap_while_the_yield_would_reach_it_within_the_sources():
    # 300 samples from 50 of 900 sources: the cap of 1000 needs ~167 sources, well within 900.
    assert goal(1000, 300, 50, 900, bounded=False) == Goal("samples", 300, 1000)


def test_the_goal_is_the_source_bound_when_the_yield_would_not_reach_the_cap():
    # The issue-12 case: --max-sources 100 and 600 samples after 96 sources: the cap of 10000
    # would need 1600 sources, so the run ends on the 100th.
    g = goal(10000, 600, 96, 100, bounded=True)
    assert g == Goal("sources", 96, 100) and g.fraction == pytest.approx(0.96)


def test_the_goal_before_anything_is_known_is_the_one_the_user_set():
    assert goal(1000, 0, 0, 4, bounded=True).unit == "sources"
    assert goal(1000, 0, 0, 900, bounded=False).unit == "samples"
    # Sources done and no sample yet: heading for the source bound.
    assert goal(1000, 0, 3, 900, bounded=False) == Goal("sources", 3, 900)


def test_the_goal_at_either_end():
    assert goal(10, 12, 3, 900, bounded=False) == Goal("samples", 10, 10)
    assert goal(1000, 40, 4, 4, bounded=True) == Goal("sources", 4, 4)


def test_eta_from_the_pace_of_this_runs_own_work():
    # 25% done in 60 s from nothing: 75% left takes 180 s.
    assert eta_s(0.25, 0.0, 60.0) == pytest.approx(180.0)
    # 40% came from the journal before the first request; 10% more in 30 s: 50% left = 150 s.
    assert eta_s(0.5, 0.4, 30.0) == pytest.approx(150.0)
    assert eta_s(0.4, 0.4, 30.0) is None  # no pace yet
    assert eta_s(1.0, 0.0, 30.0) is None  # done


def _progress(**kw) -> Progress:
    base = dict(
        cap=10000,
        samples=600,
        sources_eligible=922,
        source_limit=100,
        bounded=True,
        sources_scheduled=100,
        sources_done=96,
        requests_sent=192,
        requests_cached=0,
        in_flight=2,
        failed=0,
        variants_accepted=300,
        variants_rejected=276,
        tokens=0,
        elapsed_s=1920.0,
        work_s=1900.0,
    )
    base.update(kw)
    return Progress(**base)


def test_progress_shows_the_run_against_its_real_goal():
    p = _progress()
    assert p.goal == Goal("sources", 96, 100)
    assert p.requests_per_s == pytest.approx(0.1)  # 192 over 1920 s, as the summary will say
    # 96% of the sources in 1900 s: 4% more is 1900 * 0.04 / 0.96 = 79.2 s (not 0:00:16 against the cap).
    assert p.eta_s == pytest.approx(79.17, abs=0.01)


def test_progress_eta_leaves_out_what_the_journal_gave():
    # 500 of 1000 samples, 300 of them from sources served wholly by the journal, 200 in 100 s.
    p = _progress(
        cap=1000,
        samples=500,
        source_limit=922,
        bounded=False,
        sources_done=50,
        samples_from_journal=300,
        sources_from_journal=30,
        work_s=100.0,
    )
    assert p.goal.unit == "samples"
    assert p.eta_s == pytest.approx(250.0)  # 500 left at 2 a second
