"""Stable path of the two-stream pair schedule (docs/architecture.md, "Stable interfaces"): it lives in
:mod:`trainables.reid.pairs`; nothing in the project imports this module."""

from trainables.reid.pairs import pos_fraction_for_epoch, sample_pairs  # noqa: F401
