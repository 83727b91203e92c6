"""Compatibility path: models logged to MLflow before the move (pickled as ``trainables.models.<class>``) load here.

The networks live in :mod:`trainables.reid.models`; nothing in the project imports this module.
"""

from trainables.reid.models import IdentificationNet, ResNetTrunk, TwoStreamNet  # noqa: F401

if __name__ == "__main__":  # an old path, not a command
    raise SystemExit("trainables.models is a library path, not a command: train with `python -m orchestrator.train "
                     "reid|gan`, run a sweep with `python -m orchestrator.sweep`")
