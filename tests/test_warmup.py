"""The linear lr warm-up (reid.warmup_epochs): its per-step values, the step decay after it, and resume."""

import dataclasses
import json

import pytest
import torch

from orchestrator.config import load_config
from trainables.config import ReidConfig, ReidInputs
from trainables.reid.loop import build_model, lr_schedule, make_optimizer, run_spec, train_reid, warmup_hook

STEPS = 4  # optimizer steps per epoch


def _optimizer() -> torch.optim.SGD:
    """Two lr groups as in build_training: backbone at lr 1, new layers at 10x."""
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 10.0}], lr=1.0)


def _run(reid: ReidConfig, epochs: range, opt=None, sched=None) -> list[tuple[float, float]]:
    """The lr pair used at each optimizer step of ``epochs``, stepped as reid_loop does."""
    opt = opt or _optimizer()
    sched = sched or lr_schedule(opt, reid)
    lrs = []
    for epoch in epochs:
        warm = warmup_hook(opt, reid, epoch, STEPS)
        for step in range(STEPS):
            if warm:
                warm(step)
            lrs.append(tuple(g["lr"] for g in opt.param_groups))
            opt.step()
        sched.step()
    return lrs


REID = ReidConfig(epochs=10, lr=1.0, lr_step_epoch=8, warmup_epochs=2, warmup_factor=0.1)


def test_warmup_rises_linearly_per_step_then_the_step_decay():
    lrs = [a for a, _ in _run(REID, range(10))]
    assert lrs[0] == pytest.approx(0.1)  # the first step: warmup_factor x lr
    assert lrs[STEPS] == pytest.approx(0.55)  # half-way (the start of epoch 1)
    warm = lrs[:2 * STEPS]
    assert all(b - a == pytest.approx(0.9 / (2 * STEPS)) for a, b in zip(warm, warm[1:]))  # linear, per step
    assert lrs[2 * STEPS:8 * STEPS] == pytest.approx([1.0] * 6 * STEPS)  # lr once warm-up ends
    assert lrs[8 * STEPS:] == pytest.approx([0.1] * 2 * STEPS)  # x lr_gamma from lr_step_epoch on
    assert [b / a for a, b in _run(REID, range(10))] == pytest.approx([10.0] * 10 * STEPS)  # every group


def test_no_warmup_is_the_plain_step_decay():
    plain = ReidConfig(epochs=10, lr=1.0, lr_step=0.8)
    assert [a for a, _ in _run(plain, range(10))] == pytest.approx([1.0] * 8 * STEPS + [0.1] * 2 * STEPS)


def test_resume_mid_warmup_continues_the_schedule():
    reid = ReidConfig(epochs=10, lr=1.0, lr_step_epoch=8, warmup_epochs=3)
    whole = _run(reid, range(10))
    opt = _optimizer()
    sched = lr_schedule(opt, reid)
    first = _run(reid, range(1), opt, sched)  # one epoch of three warm-up epochs, then a checkpoint
    saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    opt2 = _optimizer()
    sched2 = lr_schedule(opt2, reid)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    rest = _run(reid, range(1, 10), opt2, sched2)
    assert [lr for pair in first + rest for lr in pair] == pytest.approx([lr for pair in whole for lr in pair])


def test_warmup_must_end_before_training_does(tmp_path):
    with pytest.raises(ValueError, match="reid.warmup_epochs"):
        ReidConfig(epochs=3, warmup_epochs=3)
    with pytest.raises(ValueError, match="reid.warmup_factor"):
        ReidConfig(warmup_factor=1.5)
    for preset in ("paper", "paper-twostream"):  # the paper has no warm-up
        assert load_config(preset, overrides=[f"dataset.root={tmp_path}"]).reid.warmup_epochs == 0


def test_a_run_interrupted_in_warmup_resumes_to_the_same_model(tmp_path, tiny_root, tiny_cfg):
    """In reid_loop: a failure in epoch 1 of 2 warm-up epochs, a resume from the epoch-0 checkpoint, and the
    same lr per epoch and the same final weights as a run without the failure."""
    cfg = tiny_cfg("reid.epochs=3", "reid.warmup_epochs=2", "reid.lr_step_epoch=3", "labels.method=baseline",
                   "reid.checkpoint_every=1")
    inputs = ReidInputs(str(tiny_root))

    def train(name, **kw):  # every checkpoint kept, to compare each epoch's metrics
        spec = dataclasses.replace(run_spec(cfg.reid, tmp_path / "runs", name, num_workers=0), keep_checkpoints=3)
        return train_reid(cfg.reid, cfg.labels, inputs, spec, **kw)

    train("whole", inject_failure="")
    with pytest.raises(RuntimeError, match="injected failure"):
        train("cut", inject_failure="epoch=1,step=1,mode=raise")
    train("cut", inject_failure="epoch=1,step=1,mode=raise")  # the marker file: it does not fail again

    def epochs(name):
        return [json.loads(p.read_text()) for p in sorted((tmp_path / "runs" / name).glob("checkpoint_*/metrics.json"))]

    whole, cut = ({m["epoch"]: m for m in epochs(name)} for name in ("whole", "cut"))
    assert set(whole) == set(cut) == {0, 1, 2}
    for e in (1, 2):  # epoch 1 (warm-up) and 2, trained after the resume: the same lr and the same losses
        assert (cut[e]["lr"], cut[e]["loss"]) == pytest.approx((whole[e]["lr"], whole[e]["loss"]))
    # the lr each epoch ends with (the next epoch's first): warm after 2 epochs, then decayed at lr_step_epoch
    assert [cut[e]["lr"] for e in (1, 2)] == pytest.approx([cfg.reid.lr, 0.1 * cfg.reid.lr])


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_the_optimizer_choice_builds_that_optimizer_with_both_lr_groups(name, kind):
    reid = ReidConfig(lr=0.5, new_lr_mult=2.0, optimizer=name, backbone="tiny", embed_dim=16, pretrained="random")
    model = build_model(reid, 5)
    opt = make_optimizer(reid, model.param_groups(reid.lr, new_lr_mult=reid.new_lr_mult, weight_decay=5e-4))
    assert type(opt) is kind
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1.0]
    assert all(g["weight_decay"] == 5e-4 for g in opt.param_groups)
    if name == "adam":
        assert opt.defaults["amsgrad"]  # AMSGrad: torchreid's softmax recipe
