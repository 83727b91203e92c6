"""Re-ID networks (trainables/reid/models.py) and their backbone weights (trainables/reid/weights.py). CPU, tiny
inputs."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision

from trainables.config import BACKBONES
from trainables.reid.labels import ranks_from_probs
from trainables.reid.models import IdentificationNet, TwoStreamNet, build_backbone, build_reid_model, two_stream_loss
from trainables.reid.weights import IMAGENET_WEIGHTS, init_backbone, load_pretrained_backbone

WEIGHTS_LOG = "trainables.reid.weights"


def _model(kind: str, pretrained: str | None, embed_dim: int | None = 16, dropout: float = 0.5):
    """A resnet18 model with ``reid.pretrained``'s backbone weights, as ``reid.loop.build_model`` makes it."""
    model = build_reid_model(kind, C, backbone="resnet18", embed_dim=embed_dim, dropout=dropout)
    init_backbone(model, "resnet18", pretrained)
    return model

B, C = 2, 7


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(b: int = B) -> torch.Tensor:
    return torch.randn(b, 3, 64, 32)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    per = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (per if weights is None else per * weights).mean()


@pytest.mark.parametrize("embed_dim, dim", [(32, 32), (None, 512)])
def test_identification_net_shapes(embed_dim: int | None, dim: int) -> None:
    net = IdentificationNet(C, backbone="resnet18", embed_dim=embed_dim)
    x = _images()
    assert net(x).shape == (B, C)  # training mode: logits
    assert net.forward_features(x).shape == (B, 512)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (B, dim)  # eval mode: embedding
        assert net.embed(x).shape == (B, dim)
        assert net.classify(x).shape == (B, C)


def test_last_stride_one_doubles_final_map() -> None:
    x = _images()
    trunk2, _ = build_backbone("resnet18")
    trunk1, _ = build_backbone("resnet18", last_stride=1)
    assert trunk2(x).shape[-2:] == (2, 1)
    assert trunk1(x).shape[-2:] == (4, 2)


def test_param_groups_cover_every_parameter_once() -> None:
    net = TwoStreamNet(C, backbone="resnet18", embed_dim=16)
    groups = net.param_groups(0.01, new_lr_mult=10.0, weight_decay=5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.01)
    assert by_name["new"]["lr"] == pytest.approx(0.1)
    new_ids = {id(p) for p in by_name["new"]["params"]}
    for layer in (net.classifier, net.bottleneck, net.verif_classifier):
        assert all(id(p) in new_ids for p in layer.parameters())
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted as-is


def test_two_stream_forward() -> None:
    net = TwoStreamNet(C, backbone="resnet18", embed_dim=16)
    x1, x2 = _images(), _images()
    l1, l2, v = net(x1, x2)
    assert l1.shape == l2.shape == (B, C) and v.shape == (B, 2)
    net.eval()
    with torch.no_grad():
        assert net(x1).shape == (B, 16)
        assert net(x1, x2)[2].shape == (B, 2)


def test_two_stream_loss_formula_and_mask() -> None:
    l1, l2, v = torch.randn(4, C), torch.randn(4, C), torch.randn(4, 2, requires_grad=True)
    t1 = F.one_hot(torch.tensor([0, 1, 2, 3]), C).float()
    t2 = torch.full((4, C), 1.0 / C)
    same = torch.tensor([1, 0, 1, 0])
    w2 = torch.tensor([1.0, 0.5, 0.5, 1.0])
    got = two_stream_loss(l1, l2, v, t1, t2, same, id_loss_fn=_soft_ce, weights2=w2)
    want = 0.5 * _soft_ce(l1, t1, None) + 0.5 * _soft_ce(l2, t2, w2) + F.cross_entropy(v, same)
    assert torch.allclose(got, want)

    mask = torch.tensor([True, False, True, False])
    got = two_stream_loss(l1, l2, v, t1, t2, same, id_loss_fn=_soft_ce, verif_mask=mask)
    verif = F.cross_entropy(v[mask], same[mask], reduction="sum") / 4  # summed over real pairs / whole batch
    want = 0.5 * _soft_ce(l1, t1, None) + 0.5 * _soft_ce(l2, t2, None) + verif
    assert torch.allclose(got, want)

    none = torch.zeros(4, dtype=torch.bool)
    got, parts = two_stream_loss(
        l1, l2, v, t1, t2, same, id_loss_fn=_soft_ce, verif_mask=none, return_parts=True
    )
    assert parts["verif"].item() == 0.0
    assert torch.allclose(got, 0.5 * _soft_ce(l1, t1, None) + 0.5 * _soft_ce(l2, t2, None))
    got.backward()
    assert v.grad is not None and torch.all(v.grad == 0)


def test_load_pretrained_backbone_round_trip(tmp_path) -> None:
    ref = torchvision.models.resnet18(weights=None)  # has fc.*, like an ImageNet checkpoint
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    net = IdentificationNet(C, backbone="resnet18", embed_dim=None, last_stride=1)
    msg = load_pretrained_backbone(net, path)
    assert str(path) in msg
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key


def test_load_pretrained_backbone_errors(tmp_path) -> None:
    net = IdentificationNet(C, backbone="resnet18", embed_dim=None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained_backbone(net, missing)
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet34.pth"):
        load_pretrained_backbone(net, wrong)


def test_unknown_backbone_and_kind() -> None:
    with pytest.raises(ValueError, match="reid.backbone.*resnet50"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="reid.model"):
        build_reid_model("triplet", C, backbone="resnet18", embed_dim=16, dropout=0.5)


def test_build_reid_model_warns_without_weights(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=WEIGHTS_LOG):
        model = _model("twostream", None, embed_dim=None, dropout=0.75)
    assert isinstance(model, TwoStreamNet)
    assert "random init" in caplog.text


def test_random_is_explicit_and_none_warns(caplog, tmp_path) -> None:
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOG):
        _model("ident", "random")
    assert "reid.pretrained=random" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOG):
        _model("ident", None)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "random init" in r.getMessage()]
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "local.pth")  # any other string is a local file, as before
    model = _model("ident", str(tmp_path / "local.pth"))
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)


# ---- reid.pretrained=imagenet: torchvision's weights API and hub cache, never the real network -------------

R18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
R18_FILE = R18.url.rsplit("/", 1)[-1]  # torchvision's cache name: the URL's basename (resnet18-f37072fd.pth)


def _offline(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty ``<torch hub dir>/checkpoints`` under tmp_path, with the network "down" (urlopen raises)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub", "torch.hub.set_dir was called elsewhere"
    monkeypatch.setattr(torch.hub, "urlopen", _offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _fake_imagenet_state() -> dict[str, torch.Tensor]:
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        ref.conv1.weight.fill_(0.125)  # a known perturbation: random init never gives this
    return ref.state_dict()


def test_imagenet_weights_are_v1_for_every_backbone() -> None:
    assert set(IMAGENET_WEIGHTS) == set(BACKBONES) - {"tiny"}  # the tiny rehearsal trunk has no ImageNet weights
    assert all(w.name == "IMAGENET1K_V1" for w in IMAGENET_WEIGHTS.values())
    assert IMAGENET_WEIGHTS["resnet50"].url.endswith("/resnet50-0676ba61.pth")


def test_imagenet_loads_the_cached_file(hub_cache, caplog) -> None:
    hub_cache.mkdir(parents=True)
    state = _fake_imagenet_state()
    # The fake's sha256 does not match the name's prefix: torch hub trusts its cache (check_hash only
    # verifies a download before it lands there), and so do we.
    torch.save(state, hub_cache / R18_FILE)
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOG):
        model = _model("twostream", "imagenet")
    assert torch.all(model.backbone.conv1.weight == 0.125)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert str(hub_cache / R18_FILE) in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_imagenet_offline_names_the_file_and_the_cache(hub_cache) -> None:
    with pytest.raises(FileNotFoundError) as info:
        _model("ident", "imagenet")
    msg = str(info.value)
    assert R18_FILE in msg and str(hub_cache) in msg and R18.url in msg
    assert "URLError" in msg and "reid.pretrained=/path/to/" in msg
    assert not (hub_cache / R18_FILE).exists()


def test_imagenet_downloads_once_with_hash_check(hub_cache, monkeypatch) -> None:
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # torch.hub's signature; no network
        calls.append((url, hash_prefix))
        torch.save(_fake_imagenet_state(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        model = _model("ident", "imagenet")
        assert torch.all(model.backbone.conv1.weight == 0.125)
    assert calls == [(R18.url, R18_FILE.split("-")[1].split(".")[0])]  # once, and check_hash=True
    assert (hub_cache / R18_FILE).is_file()


def test_imagenet_corrupt_cache_file_says_delete_it(hub_cache) -> None:
    hub_cache.mkdir(parents=True)
    (hub_cache / R18_FILE).write_bytes(b"truncated download")
    with pytest.raises(RuntimeError, match=f"{R18_FILE}.*delete it"):
        _model("ident", "imagenet")


def test_resnet50_shapes() -> None:
    net = IdentificationNet(C, backbone="resnet50", embed_dim=None).eval()
    with torch.no_grad():
        assert net(_images()).shape == (B, 2048)


def test_logits_are_float32_under_bf16_autocast() -> None:
    """dMpRL / pseudo targets rank the logits: the head runs in fp32 even when the trunk runs in bf16.

    The head's bias is set to 8 + k/1000 for class k (weights 0): 751 distinct fp32 logits in [8, 8.75]. bf16 keeps
    8 bits of mantissa, so between 8 and 16 it steps by 2^-4 = 0.0625: those 751 values round to at most 13 bf16
    numbers, on any machine; a head run in bf16 would tie almost every class.
    """
    k = 751
    model = IdentificationNet(k, backbone="resnet18", embed_dim=None, dropout=0.0).train()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(8 + torch.arange(k) / 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 64, 32))  # [2, K]
        bf16 = model.classifier(model.embed(torch.randn(2, 3, 64, 32)))  # the head inside autocast, for contrast
    assert logits.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert all(len(torch.unique(row)) == k for row in logits)  # no ties: every class has its own rank
    assert max(len(torch.unique(row)) for row in bf16) <= 13  # what a bf16 head would give
    assert torch.equal(ranks_from_probs(logits)[0], torch.arange(1, k + 1))  # class k is the k-th least likely


@pytest.mark.parametrize("kind", ["ident", "twostream"])
def test_a_model_logged_before_the_move_still_loads(kind) -> None:
    """MLflow pickled trial models as ``trainables.models.<class>``; the networks moved to trainables/reid/models.py
    and the old path is a shim. These folders were written by ``mlflow.pytorch.save_model`` at commit 88766a5 (a
    tiny backbone), with one input and the output the model gave then."""
    import mlflow.pytorch

    folder = Path(__file__).parent / "data" / "model_logged_at_88766a5" / kind
    model = mlflow.pytorch.load_model(str(folder))
    expected = torch.load(folder / "expected.pt", weights_only=True)
    assert isinstance(model, TwoStreamNet if kind == "twostream" else IdentificationNet)
    with torch.no_grad():
        assert torch.equal(model.eval()(expected["input"]), expected["output"])
