"""Logging that shows (trainables/logs.py): the CLIs configure the project's loggers, so the resume and
backbone-weight messages of the training code reach the console."""

from __future__ import annotations

import logging
import subprocess
import sys

from trainables.logs import configure_logging


def test_configure_logging_is_idempotent_and_shows_info():
    configure_logging()
    configure_logging()
    logger = logging.getLogger("trainables")
    assert logger.level == logging.INFO and sum(getattr(h, "_mprl", False) for h in logger.handlers) == 1


def test_a_resumed_cli_run_says_so(tmp_path):
    """``orchestrator.train reid`` twice under one name: the second run resumes, and its log says from where."""
    def run(epochs: int) -> str:
        cmd = [sys.executable, "-m", "orchestrator.train", "reid", "--preset", "smoke", "--label-method", "baseline",
               "--num-gan", "0", "--out", str(tmp_path), "--name", "r", "--set", f"reid.epochs={epochs}",
               "--set", "reid.pretrained=random", "--set", f"cluster.storage_path={tmp_path}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    first = run(1)
    assert "[trainables.reid.weights] INFO reid backbone resnet18 starts from random init" in first
    assert "resuming" not in first
    assert "[trainables.reid.loop] INFO resuming re-ID training after epoch 0" in run(2)
