"""What a run has done, against what it set out to do: pure functions of counters and clocks.

One definition of a rate serves the live display and the summary: what was done over the time it
took, both measured on the same clock from the start of the run. Progress and the ETA are shown
against the run's real goal, which is whichever of its two ends it is nearer to: the cap of
samples, or the bound on sources (``--max-sources``, else every eligible source). A run whose
sources are yielding few samples is heading for the source bound, and showing ``600/10000``
samples with an ETA against the cap would be a wrong promise.
"""

from __future__ import annotations

from dataclasses import dataclass


def rate(done: int, seconds: float) -> float:
    """``done`` per second over ``seconds`` (0 before any time has passed)."""
    return done / seconds if seconds > 0 else 0.0


def format_rate(per_s: float, unit: str = "req") -> str:
    """``12.5 req/s``; below one a second, the seconds each takes reads better: ``0.10 req/s
    (9.8 s each)``."""
    if per_s <= 0:
        return f"0 {unit}/s"
    if per_s >= 1:
        return f"{per_s:.1f} {unit}/s"
    return f"{per_s:.2f} {unit}/s ({1 / per_s:.1f} s each)"


@dataclass(frozen=True)
class Goal:
    """The end the run is heading for: ``done`` of ``total`` ``unit`` (samples or sources)."""

    unit: str
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 1.0


def goal(cap: int, samples: int, sources_done: int, source_limit: int, bounded: bool) -> Goal:
    """The goal the run is nearer to reaching: the cap of samples or the ``source_limit``.

    At the current yield the cap needs ``sources_done * cap / samples`` sources; the run ends on
    the cap if that is within the limit, that is when ``samples / cap >= sources_done /
    source_limit``. Before anything is known (both zero) the goal is the one the user set:
    the source bound when ``bounded`` (``--max-sources`` given), else the cap."""
    by_samples = Goal("samples", min(samples, cap), cap)
    by_sources = Goal("sources", min(sources_done, source_limit), source_limit)
    if samples >= cap or source_limit <= 0:
        return by_samples
    if sources_done >= source_limit:
        return by_sources
    if samples == 0 and sources_done == 0:
        return by_sources if bounded else by_samples
    return by_samples if samples * source_limit >= sources_done * cap else by_sources


def eta_s(fraction: float, fraction_at_start: float, seconds: float) -> float | None:
    """Seconds left if the rest goes at the pace since the start of this run's own work
    (``fraction_at_start`` is what was already done then, e.g. served from the journal)."""
    gained = fraction - fraction_at_start
    if fraction >= 1.0 or gained <= 0 or seconds <= 0:
        return None
    return seconds * (1.0 - fraction) / gained
