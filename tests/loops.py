"""Training loops the checkpoint tests share (not a test module): a stand-in for reid_loop that runs in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from trainables import runtime


def re_id_state(epoch: int, every: int = 2, epochs: int = 5, w: torch.Tensor | None = None) -> dict:
    """A checkpoint state shaped like reid_loop's (its ``reid`` section sets the cadence)."""
    return {"epoch": epoch, "w": torch.zeros(4) if w is None else w,
            "reid": {"checkpoint_every": every, "epochs": epochs}}


def toy_loop(config: dict) -> dict:
    """A stand-in for reid_loop: resumes from load_state, reports every epoch with a re-ID-shaped state."""
    state = runtime.load_state()
    start = 0 if state is None else state["epoch"] + 1
    w = torch.zeros(1000) if state is None else state["w"]
    seen = []
    for epoch in range(start, config["epochs"]):
        w = w + 1
        if config.get("fail_at") == epoch and not Path(config["marker"]).exists():
            Path(config["marker"]).write_text("failed once")
            raise RuntimeError(f"injected at epoch {epoch}")
        time.sleep(config.get("sleep", 0))
        metrics = {"epoch": epoch, "loss": float(w[0])}
        runtime.report(metrics, state=re_id_state(epoch, config["every"], config["epochs"], w))
        seen.append(epoch)
    return {"start": start, "seen": seen, "w": float(w[0])}
