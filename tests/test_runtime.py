"""The Ray Train adapter (trainables/runtime.py) and where a process runs (trainables/placement.py): the device a
worker trains on, and one format for every node and process label."""

import os

import pytest
import torch

from trainables import placement, runtime


def test_a_worker_given_a_gpu_without_cuda_fails_naming_its_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(runtime.LOGICAL_GPUS_ENV, raising=False)
    assert runtime.device_for(False) == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"(host|node) .* was given a GPU but torch sees no CUDA device"):
        runtime.device_for(True)
    monkeypatch.setenv(runtime.LOGICAL_GPUS_ENV, "1")  # cluster.logical_gpus: test clusters on CPU machines
    assert runtime.device_for(True) == torch.device("cpu")


def test_every_label_has_one_format():
    assert placement.node_name("10.0.1.5", "a1b2c3d4e5f6a7b8c9") == "node 10.0.1.5 (a1b2c3d4e5f6)"
    label = placement.process_label()
    assert label.startswith(("node ", "host ")) and label.endswith(f" pid {os.getpid()}")
