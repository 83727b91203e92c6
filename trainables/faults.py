"""Fault injection, the test hook of worker-failure recovery: make one rank fail once (or always) at (epoch, step).

Reliability tests set ``MPRL_INJECT_FAILURE`` (or pass ``inject_failure=`` to ``trainables.reid.loop.train_reid``);
the driver parses it once (a malformed spec fails there) and the loop calls :meth:`Injection.maybe_fail` before
every step. Production runs carry ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FAILURE_ENV = "MPRL_INJECT_FAILURE"


@dataclass(frozen=True)
class FailurePlan:
    """Make one rank fail once at (epoch, step): the test hook for worker-failure recovery.

    Spec string: ``"rank=1,epoch=1,step=2,mode=exit[,match=lsro]"``. ``mode``: ``exit`` (``os._exit``: a dead
    worker process), ``raise`` (an exception, once), ``always`` (raise on every attempt: a permanent failure) or
    ``always_exit`` (``os._exit`` on every attempt: a process that keeps dying, like an OOM kill).
    ``match`` limits it to runs whose name contains that text. "Once" is remembered by a marker file in the run
    folder, so the retried worker goes on.
    """

    rank: int
    epoch: int
    step: int
    mode: str = "raise"
    match: str = ""

    @classmethod
    def parse(cls, spec: str) -> "FailurePlan":
        try:
            fields = dict(item.split("=", 1) for item in spec.split(",") if item)
            plan = cls(int(fields.pop("rank", 0)), int(fields.pop("epoch")), int(fields.pop("step", 0)),
                       fields.pop("mode", "raise"), fields.pop("match", ""))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{FAILURE_ENV}={spec!r} must look like rank=1,epoch=1,step=2,mode=exit ({err})") from None
        if fields or plan.mode not in ("exit", "raise", "always", "always_exit"):
            raise ValueError(f"{FAILURE_ENV}={spec!r}: unknown keys {sorted(fields)} or mode {plan.mode!r} "
                             f"(exit | raise | always | always_exit)")
        return plan

    def maybe_fail(self, run_dir: str, run_name: str, rank: int, epoch: int, step: int) -> None:
        if (rank, epoch, step) != (self.rank, self.epoch, self.step) or self.match not in run_name:
            return
        marker = Path(run_dir) / ".failure_injected"
        if self.mode == "always_exit":
            os._exit(17)
        if self.mode == "always":
            raise RuntimeError(f"injected permanent failure at rank {rank}, epoch {epoch}, step {step}")
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank={rank} epoch={epoch} step={step}\n")
        if self.mode == "exit":
            os._exit(17)
        raise RuntimeError(f"injected failure at rank {rank}, epoch {epoch}, step {step}")


@dataclass(frozen=True)
class Injection:
    """A :class:`FailurePlan` bound to one run (its folder holds the "failed once" marker; ``match`` reads its name)."""

    plan: FailurePlan
    run_dir: str
    run_name: str

    @classmethod
    def from_spec(cls, spec: str | None, run_dir: str | Path, run_name: str) -> "Injection | None":
        """``spec`` (default: the ``MPRL_INJECT_FAILURE`` environment variable) parsed, or None when empty."""
        spec = os.environ.get(FAILURE_ENV) if spec is None else spec
        return cls(FailurePlan.parse(spec), str(run_dir), run_name) if spec else None

    def maybe_fail(self, rank: int, epoch: int, step: int) -> None:
        self.plan.maybe_fail(self.run_dir, self.run_name, rank, epoch, step)
