"""reid.bn_recalibrate (trainables/reid/bn_recalibrate.py): BatchNorm statistics re-estimated on real images equal
the statistics computed directly on them; the weights and the original model are untouched; a run reports both
evaluations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import ReidInputs
from trainables.reid.bn_recalibrate import recalibrated
from trainables.reid.loop import run_spec, train_reid


class Tiny(nn.Module):
    """x -> BN2d -> global mean -> Linear -> BN1d: both BN inputs can be computed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.bn1(self.fc(self.drop(self.bn2(x).mean((2, 3)))))


def _batches(n_batches=3, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"img": torch.randn(size + i, 3, 6, 4, generator=g) * (1 + i) + i} for i in range(n_batches)]


def test_statistics_after_re_estimation_equal_those_computed_directly_on_the_images():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.bn2.weight.uniform_(0.5, 2)
        model.bn2.bias.uniform_(-1, 1)
    model.train()
    for _ in range(4):  # running statistics of other images (the mixed ones a GAN method leaves)
        model(torch.randn(8, 3, 6, 4) * 3 + 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    fixed = recalibrated(model, batches, "cpu")

    x = torch.cat([b["img"] for b in batches])  # the first BN's input: the images themselves
    per_channel = x.permute(1, 0, 2, 3).reshape(3, -1)
    assert torch.allclose(fixed.bn2.running_mean, per_channel.mean(1), atol=1e-5)
    assert torch.allclose(fixed.bn2.running_var, per_channel.var(1, unbiased=True), atol=1e-4)
    # the second BN's input: each batch normalised with its own statistics by the first (the pass's train mode),
    # no dropout, then pooled over every image
    with torch.no_grad():
        h = torch.cat([model.fc(F.batch_norm(b["img"], None, None, model.bn2.weight, model.bn2.bias, training=True,
                                             eps=model.bn2.eps).mean((2, 3))) for b in batches])
    assert torch.allclose(fixed.bn1.running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(fixed.bn1.running_var, h.var(0, unbiased=True), atol=1e-4)
    # weights untouched, the original model untouched, the copy in eval mode
    assert all(torch.equal(fixed.state_dict()[k], v) for k, v in before.items() if "running" not in k
               and "num_batches" not in k)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not fixed.training and not any(m.training for m in fixed.modules())
    assert not torch.allclose(fixed.bn2.running_mean, model.bn2.running_mean)


def test_a_model_without_batchnorm_or_a_loader_without_images_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrated(nn.Linear(3, 2), _batches(), "cpu")
    with pytest.raises(ValueError, match="no images"):
        recalibrated(Tiny(), [], "cpu")


def test_a_run_with_bn_recalibrate_reports_both_evaluations(tmp_path, tiny_root, tiny_cfg):
    cfg = tiny_cfg("reid.epochs=1", "labels.method=baseline", "reid.bn_recalibrate=true")
    res = train_reid(cfg.reid, cfg.labels, ReidInputs(str(tiny_root)), run_spec(cfg.reid, tmp_path, "r", num_workers=0))
    assert set(res.recalibrated) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert all(0 <= v <= 1 for v in res.recalibrated.values())
    m = res.metrics()
    assert m["bnr_rank1"] == res.recalibrated["rank1"] and m["rank1"] == res.rank1
    plain = tiny_cfg("reid.epochs=1", "labels.method=baseline")
    assert train_reid(plain.reid, plain.labels, ReidInputs(str(tiny_root)),
                      run_spec(plain.reid, tmp_path, "p", num_workers=0)).recalibrated is None


def test_bn_recalibrate_must_be_a_boolean():
    from orchestrator.config import load_config

    with pytest.raises(ValueError, match="reid.bn_recalibrate"):
        load_config("smoke", overrides=["reid.bn_recalibrate=sometimes"])
