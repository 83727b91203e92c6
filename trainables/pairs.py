"""Stable path of the two-stream pair schedule (docs/architecture.md, "Stable interfaces"): it lives in
:mod:`trainables.reid.pairs`; nothing in the project imports this module."""

from trainables.reid.pairs import pos_fraction_for_epoch, sample_pairs  # noqa: F401

if __name__ == "__main__":  # an old path, not a command
    raise SystemExit("trainables.pairs is a library path, not a command: train with `python -m orchestrator.train "
                     "reid|gan`, run a sweep with `python -m orchestrator.sweep`")
