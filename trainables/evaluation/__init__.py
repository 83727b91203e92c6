"""Re-ID evaluation without a model: ranking metrics (``ranking``), features and distances (``distance``), k-reciprocal
re-ranking (``rerank``), ranked-list pictures (``visrank``). ``trainables.evaluation.evaluate_rank`` is the project's
stable entry point (docs/architecture.md, "Stable interfaces"), so it and the distance functions are importable from
the package."""

from trainables.evaluation.distance import compute_distance, extract_features  # noqa: F401
from trainables.evaluation.ranking import RankResult, evaluate, evaluate_rank  # noqa: F401
