"""The re-ID worker loop and its driver (trainables/reid/loop.py): learning on fixed batches, per-method defaults,
schedules, checkpoints and resume, inputs, the compute-matched control, validation vs test evaluation."""

import json

import numpy as np
import pytest
import torch

from datasets.decoded_cache import FileRows
from orchestrator.config import load_config, replace
from trainables.config import ReidInputs
from trainables.methods import LABEL_METHODS, METHODS
from trainables.reid.data import train_loader
from trainables.reid.engine import ident_step, train_one_epoch
from trainables.reid.labels import LabelSpec, soft_cross_entropy, targets_for
from trainables.reid.loop import load_run_data, load_trained, run_spec, train_reid, weight_decay
from trainables.reid.models import IdentificationNet


def _three_batches(tiny_split, tiny_store, n_gen=16):
    records = (*tiny_split.train, *tiny_store.records(n_gen))
    n_real = len(tiny_split.train)
    rng = np.random.default_rng(0)
    batches = [list(rng.choice(n_real, 10, replace=False)) + list(n_real + rng.choice(n_gen, 6, replace=False))
               for _ in range(3)]
    loader = train_loader(records, FileRows(records, (32, 16)), (32, 16), device=torch.device("cpu"), workers=0)
    return loader.epoch(batches, 0)


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_three_batch_overfit(method, tiny_split, tiny_store):
    """The loss above its floor (the targets' own entropy) falls markedly on 3 fixed batches, for every method."""
    torch.manual_seed(0)
    k = tiny_split.num_train_ids
    spec = LabelSpec(method=method, num_classes=k, switch_epoch=0)
    model = IdentificationNet(k + METHODS[method].extra_class, backbone="resnet18", embed_dim=32, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    static = torch.from_numpy(np.stack([np.random.default_rng(i).permutation(k) + 1 for i in range(24)]))
    loader = _three_batches(tiny_split, tiny_store)

    def excess():
        model.train()
        total = 0.0
        with torch.no_grad():
            for b in loader:
                logits = model(b["img"])
                t, w = targets_for(spec, logits, b["label"], b["generated"], 5, static[b["gen_row"].clamp(min=0)])
                floor = soft_cross_entropy(torch.log(t.clamp_min(1e-12)), t, w)
                total += float(soft_cross_entropy(logits, t, w) - floor)
        return total

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 0.3 below is empirical: measured with one summation order
    try:
        before = excess()
        step = ident_step(spec, static, lambda: torch.autocast("cpu", enabled=False))
        for _ in range(8):
            m = train_one_epoch(model, loader, opt, step, epoch=5, device=torch.device("cpu"))
        after = excess()
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(m["loss"])
    assert after < 0.3 * before


def test_weight_decay_defaults():
    cfg = load_config("smoke")

    def wd(**dotted):
        c = replace(cfg, **dotted)
        return weight_decay(c.reid, c.labels)

    assert wd(**{"labels.method": "lsro"}) == 1e-4
    assert wd(**{"labels.method": "dmprl2"}) == 5e-4
    assert wd(**{"labels.method": "dmprl1", "reid.weight_decay": 0.0}) == 0.0
    assert wd(**{"labels.method": "pseudo"}) == 5e-4  # LSRO's pseudo-label script
    assert wd(**{"labels.method": "smprl"}) == wd(**{"labels.method": "allinone"}) == 1e-4


def test_absolute_epochs_override_the_fractions():
    """The two-stream paper schedule: 60 epochs, lr x0.1 at epoch 40, switch at epoch 20 (not 48 and 24)."""
    from trainables.reid.labels import is_active
    from trainables.reid.loop import label_spec, lr_schedule

    cfg = load_config("smoke", overrides=["reid.epochs=60", "labels.method=dmprl2"])
    assert label_spec(cfg.reid, cfg.labels, 10).switch_epoch == 24  # the fraction 0.4
    fixed = replace(cfg, **{"labels.switch_at": 20, "reid.lr_step_epoch": 40})
    spec = label_spec(fixed.reid, fixed.labels, 10)
    assert spec.switch_epoch == 20 and not is_active(spec, 19) and is_active(spec, 20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, fixed.reid)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[39] == 1.0 and lrs[40] == pytest.approx(0.1) and lrs[59] == pytest.approx(0.1)


@pytest.mark.parametrize("method, model", [("lsro", "ident"), ("smprl", "twostream")])
def test_in_process_run_checkpoints_and_resumes(method, model, tmp_path, tiny_root, tiny_split, tiny_store,
                                                 tiny_cfg):
    k = tiny_split.num_train_ids
    name = f"labels-{method}"
    if method == "smprl" and tiny_store.read_labels(name) is None:
        ranks = np.stack([np.random.default_rng(i).permutation(k) + 1 for i in range(tiny_store.n)])
        tiny_store.write_labels(name, ranks.astype(np.uint16), {"test": True})
    cfg = tiny_cfg("reid.epochs=1", f"reid.model={model}", f"labels.method={method}", "labels.num_gan=16")
    inputs = ReidInputs(str(tiny_root), str(tiny_store.root), name)
    first = _train(cfg, inputs, tmp_path / "runs", "r")
    assert 0 <= first.rank1 <= 1 and 0 <= first.mAP <= 1 and first.epoch == 0 and first.num_gan == 16
    model_, state = load_trained(tmp_path / "runs" / "r")
    assert state["epoch"] == 0 and state["num_classes"] == k
    assert model_(torch.zeros(2, 3, 32, 16)).shape == (2, 32)  # eval mode: the embedding
    more = _train(replace(cfg, **{"reid.epochs": 2}), inputs, tmp_path / "runs", "r")
    assert more.epoch == 1
    _, state = load_trained(tmp_path / "runs" / "r")
    assert state["epoch"] == 1  # continued from the checkpoint, one more epoch only
    assert len(list((tmp_path / "runs" / "r").glob("checkpoint_*"))) == 1  # the latest kept


def test_missing_inputs_are_clear(tmp_path, tiny_root, tiny_store, tiny_cfg):
    cfg = tiny_cfg("labels.method=lsro", "labels.num_gan=8")
    with pytest.raises(ValueError, match="needs a generated-image store"):
        _train(cfg, ReidInputs(str(tiny_root)), tmp_path / "runs", "a")
    with pytest.raises(ValueError, match="labels.num_gan=999"):
        _train(replace(cfg, **{"labels.num_gan": 999}), ReidInputs(str(tiny_root), str(tiny_store.root)),
               tmp_path / "runs", "b")
    with pytest.raises(ValueError, match="sMpRL label stage"):
        _train(replace(cfg, **{"labels.method": "smprl"}), ReidInputs(str(tiny_root), str(tiny_store.root), "x"),
               tmp_path / "runs", "c")


def _train(cfg, inputs, parent, name, **kw):
    return train_reid(cfg.reid, cfg.labels, inputs, run_spec(cfg.reid, parent, name, num_workers=0), **kw)


@pytest.mark.parametrize("augment", ["paper", "reference_code"])
def test_paper_input_pipelines_train_and_evaluate(augment, tmp_path, tiny_root, tiny_cfg):
    """The paper's / the code's crops run through training, evaluation (whole image at the larger size)."""
    cfg = tiny_cfg("reid.epochs=1", "labels.method=baseline", "reid.image_size=[28, 14]", f"reid.augment={augment}")
    res = _train(cfg, ReidInputs(str(tiny_root)), tmp_path / "runs", augment)
    assert 0 <= res.rank1 <= 1 and res.num_train > 0


def test_compute_matched_baseline_trains_as_many_steps_on_real_images(tmp_path, tiny_root, tiny_split, tiny_cfg):
    """baseline_matched at #GAN=N: the steps of a run with N generated images, every image real, no GAN needed."""
    cfg = tiny_cfg("labels.method=baseline_matched", "labels.num_gan=40")
    data = load_run_data(cfg.reid, cfg.labels, ReidInputs(str(tiny_root)))
    assert len(data.extra) == 40 and data.static_ranks is None and not any(r.generated for r in data.extra)
    assert set(data.extra) <= set(tiny_split.train)  # repeats of the real images, from shuffled cycles
    res = _train(cfg, ReidInputs(str(tiny_root)), tmp_path / "runs", "matched")  # no store: none needed
    assert res.num_gan == 40 and 0 <= res.rank1 <= 1
    base = _train(tiny_cfg("labels.method=baseline"), ReidInputs(str(tiny_root)), tmp_path / "runs", "base")

    def images_trained(name):  # the images the last epoch trained on, as its checkpoint's metrics record them
        last = sorted((tmp_path / "runs" / name).glob("checkpoint_*/metrics.json"))[-1]
        return json.loads(last.read_text())["images"]

    n_real = len(tiny_split.train)
    assert base.num_gan == 0 and images_trained("base") == n_real
    assert images_trained("matched") == n_real + 40  # the steps of an LSRO run with 40 generated images


def test_validation_every_epoch_test_only_at_the_end(tmp_path, tiny_root, tiny_cfg, monkeypatch):
    from trainables import runtime

    epochs, report = [], runtime.report
    monkeypatch.setattr(runtime, "report", lambda metrics, **kw: (epochs.append(dict(metrics)), report(metrics, **kw)))
    cfg = tiny_cfg("reid.epochs=2", "labels.method=baseline", "reid.val_ids=2", "reid.eval_every=1")
    res = _train(cfg, ReidInputs(str(tiny_root)), tmp_path / "runs", "v")
    (ckpt,) = (tmp_path / "runs" / "v").glob("checkpoint_*")  # the last epoch's (checkpoint_every: the last)
    assert json.loads((ckpt / "metrics.json").read_text())["rank1"] == epochs[-1]["rank1"]
    assert [("val_rank1" in m, "rank1" in m) for m in epochs] == [(True, False), (True, True)]
    assert res.rank1 == epochs[-1]["rank1"] and res.num_classes == 4  # 6 training ids, 2 held out


def test_max_steps_caps_the_steps_of_an_epoch(tmp_path, tiny_root, tiny_split, tiny_cfg):
    """reid.max_steps (the scale rehearsal's cap): each epoch trains that many batches and no more."""
    cfg = tiny_cfg("reid.max_steps=2", "reid.batch_size=4", "reid.epochs=1", "labels.method=baseline")
    assert len(tiny_split.train) // 4 > 2  # uncapped, the epoch would run more steps
    _train(cfg, ReidInputs(str(tiny_root)), tmp_path / "runs", "capped")
    (metrics,) = (tmp_path / "runs" / "capped").glob("checkpoint_*/metrics.json")
    assert json.loads(metrics.read_text())["images"] == 2 * 4
