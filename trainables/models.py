"""Compatibility path: models logged to MLflow before the move (pickled as ``trainables.models.<class>``) load here.

The networks live in :mod:`trainables.reid.models`; nothing in the project imports this module.
"""

from trainables.reid.models import IdentificationNet, ResNetTrunk, TwoStreamNet  # noqa: F401
