"""What Tune builds each trial actor from: a module that imports nothing heavy.

A trial actor is "started" once it has unpickled its trainable, which imports the module defining it; from
``orchestrator.tuning`` that is MLflow, Ray Tune and matplotlib (and was torch too, before the training code's
imports moved into the functions that train: 6 s on an idle core, 11 s measured on the rehearsal's busy loopback
cluster). Tune hands a finished trial's cached actor to the next pending trial and removes the actor still starting
for it, so while actors take longer to start than trials take to run, every trial runs in one actor, one after
another (measured: 10 trials of ~5 s in one actor, the second GPU idle; ``python -m bench.rehearsal``). Imported at
the trial's first call instead, an actor starts in the time Ray and Tune take to import, and pays the rest once,
inside its first trial, where it counts as that trial's time. The trial context travels pickled for the same reason
(unpickling it imports torch).
"""

from __future__ import annotations

import pickle
import time


def run_trial(config: dict, ctx: bytes, tracking_uri: str) -> None:
    """:func:`orchestrator.tuning.run_trial` with the pickled :class:`~orchestrator.trials.TrialContext`."""
    started = time.perf_counter()
    from orchestrator import tuning

    tuning.run_trial(config, pickle.loads(ctx), tracking_uri, started=started)
