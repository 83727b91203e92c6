"""The experiment's driver layer: config and presets, stage planning and caching, Ray scheduling, MLflow."""

from orchestrator.env import apply_defaults

apply_defaults()  # before any submodule imports ray or mlflow
