"""The sweep's progress line while trials run: ``k/N trials done, elapsed h:mm, ETA ~h:mm``.

The ETA spreads the trials still to finish over the trials that run at once, each taking the mean worker time of
the trials that finished in this run of the sweep: ``remaining x mean / min(concurrency, remaining)``, "ETA unknown"
until one has (a trial that failed, or one a resumed sweep found finished, counts as done but adds no time).

The sweep registers its trial count and concurrency here (:func:`start`, in the driver process); Tune's callback
(:class:`orchestrator.epoch_logger.EpochLogger`, which Tune pickles with the experiment) reports each trial's end by
the sweep's name (:func:`trial_ended`), as the stage searcher finds the stage graph (``dag.active``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    total: int
    concurrency: int
    started: float = field(default_factory=time.monotonic)
    done: set[str] = field(default_factory=set)  # trial keys
    seconds: list[float] = field(default_factory=list)  # worker time of the trials that finished in this run

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        mean = sum(self.seconds) / len(self.seconds) if self.seconds else None
        eta = eta_seconds(len(self.done), self.total, mean, self.concurrency)
        return (f"[sweep] {len(self.done)}/{self.total} trials done, elapsed {clock(elapsed)}, "
                f"{'ETA unknown' if eta is None else f'ETA ~{clock(eta, up=True)}'}")


_SWEEPS: dict[str, Progress] = {}  # sweep name -> its progress, in the driver process


def start(sweep: str, total: int, concurrency: int, done: set[str] | frozenset[str] = frozenset()) -> Progress:
    """Register a sweep's trials (``done``: those its MLflow runs say finished before, on --resume)."""
    _SWEEPS[sweep] = Progress(total, max(1, concurrency), done=set(done))
    return _SWEEPS[sweep]


def stop(sweep: str) -> None:
    _SWEEPS.pop(sweep, None)


def trial_ended(sweep: str, trial: str, seconds: float | None) -> str | None:
    """Count ``trial`` done (``seconds``: its worker time, None when it adds none) and print the progress line;
    None, printing nothing, for a sweep that registered no progress."""
    progress = _SWEEPS.get(sweep)
    if progress is None:
        return None
    if trial not in progress.done and seconds is not None and seconds > 0:
        progress.seconds.append(float(seconds))
    progress.done.add(trial)
    text = progress.line()
    print(text, flush=True)
    return text


def eta_seconds(done: int, total: int, mean_s: float | None, concurrency: int) -> float | None:
    """Seconds until the remaining ``total - done`` trials of ``mean_s`` each finish, ``concurrency`` at a time;
    None when no trial has a time yet, 0 when none remain."""
    remaining = max(0, total - done)
    if remaining == 0:
        return 0.0
    if mean_s is None:
        return None
    return remaining * mean_s / min(max(1, concurrency), remaining)


def clock(seconds: float, *, up: bool = False) -> str:
    """``h:mm``; ``up``: minutes rounded up (an ETA of 20 s reads "~0:01", not "~0:00")."""
    minutes = int(-(-max(0.0, seconds) // 60) if up else max(0.0, seconds) // 60)
    return f"{minutes // 60}:{minutes % 60:02d}"
