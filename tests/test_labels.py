"""Tests for trainables.labels: MpRL weights/targets (both orders), LSRO, the loss, and the per-method targets.

Expected values are computed independently: by hand (the K = 4 worked example of docs/labels.md), or by a
brute-force pure-Python re-statement of the definitions in research/mprl.md, never from the module's own output.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables import methods
from trainables.methods import LABEL_METHODS, METHODS, Method
from trainables.reid import labels as L

# -- Worked example (docs/labels.md): K = 4, p = softmax([1.0, 0.2, 0.3, 3.0]) ----------------------------------
# p = [0.107124, 0.048134, 0.053196, 0.791546]; ascending order: class 1 < class 2 < class 0 < class 3,
# so paper ranks alpha = [3, 1, 2, 4]; MATLAB idx = sort order (1-based) = [2, 3, 1, 4].
EX_LOGITS = [1.0, 0.2, 0.3, 3.0]
EX = {
    # (order, keep): (weights, targets). sigma_4 = 2/(K+1) = 0.4; sigma_2 = 2K/((2K-v+1)v) = 8/14 = 4/7.
    ("paper", None): ([0.75, 0.25, 0.5, 1.0], [0.3, 0.1, 0.2, 0.4]),
    ("reference_code", None): ([0.5, 0.75, 0.25, 1.0], [0.2, 0.3, 0.1, 0.4]),
    ("paper", 2): ([0.75, 0.0, 0.0, 1.0], [0.428571, 0.0, 0.0, 0.571429]),
    ("reference_code", 2): ([0.0, 0.75, 0.0, 1.0], [0.0, 0.428571, 0.0, 0.571429]),
}


def _example_probs() -> torch.Tensor:
    return torch.softmax(torch.tensor([EX_LOGITS]), dim=1)  # [1, 4]


def _brute_weights(p: list[float], keep: int | None, order: str) -> list[float]:
    """research/mprl.md §2/§3.1 restated with Python sorting (stable: ties -> lower index ranks lower)."""
    k = len(p)
    idx = sorted(range(k), key=lambda j: (p[j], j))  # 0-based classes in ascending order (MATLAB sort)
    if order == "paper":
        value = [0] * k
        for r, cls in enumerate(idx):
            value[cls] = r + 1  # scatter: the class of rank r gets r/K
    else:
        value = [idx[cls] + 1 for cls in range(k)]  # gather: class k gets idx(k)/K
    v = k if keep is None else keep
    return [x / k if x / k > (k - v) / k + 1e-12 else 0.0 for x in value]


@pytest.mark.parametrize("order,keep", list(EX))
def test_worked_example_matches_doc(order, keep):
    weights, targets = EX[(order, keep)]
    p = _example_probs()
    assert torch.allclose(L.mprl_weights(p, keep=keep, order=order), torch.tensor([weights]), atol=1e-6)
    assert torch.allclose(L.mprl_targets(p, keep=keep, order=order), torch.tensor([targets]), atol=1e-6)
    assert torch.allclose(p, torch.tensor([[0.107124, 0.048134, 0.053196, 0.791546]]), atol=1e-6)


@pytest.mark.parametrize("order", L.ORDERS)
@pytest.mark.parametrize("keep", [None, 1, 3, 7])
def test_weights_match_brute_force_including_ties(order, keep):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(16, 7, generator=gen), dim=1)
    probs[0] = torch.tensor([0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1])  # ties: lower class index ranks lower
    expected = torch.tensor([_brute_weights(row.tolist(), keep, order) for row in probs])
    assert torch.allclose(L.mprl_weights(probs, keep=keep, order=order), expected, atol=1e-7)


def test_paper_weights_are_permutation_equivariant():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(8, 11, generator=gen), dim=1)
    perm = torch.randperm(11, generator=gen)
    for keep in (None, 4):
        w = L.mprl_weights(probs, keep=keep)
        assert torch.equal(L.mprl_weights(probs[:, perm], keep=keep), w[:, perm])


@pytest.mark.parametrize("order", L.ORDERS)
@pytest.mark.parametrize("keep", [None, 1, 2, 5, 9])
def test_ranks_round_trip(order, keep):
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(10, 9, generator=gen), dim=1)
    ranks = L.ranks_from_probs(probs)
    assert torch.equal(ranks.sort(dim=1).values, torch.arange(1, 10).expand(10, 9))
    stored = torch.from_numpy(ranks.numpy().astype(np.uint16))  # compact on-disk form
    rebuilt = L.weights_from_ranks(stored, keep=keep, order=order)
    assert torch.equal(rebuilt, L.mprl_weights(probs, keep=keep, order=order))


def test_ranks_example_and_ties():
    assert L.ranks_from_probs(_example_probs()).tolist() == [[3, 1, 2, 4]]
    assert L.ranks_from_probs(torch.tensor([[0.25, 0.25, 0.25, 0.25]])).tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("order", L.ORDERS)
@pytest.mark.parametrize("keep", [None, 1, 3, 50])
def test_mprl_targets_are_distributions(order, keep):
    probs = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(3)), dim=1)
    q = L.mprl_targets(probs, keep=keep, order=order)
    assert (q >= 0).all() and torch.allclose(q.sum(dim=1), torch.ones(6), atol=1e-6)
    assert int((q > 0).sum(dim=1).max()) == (50 if keep is None else keep)


def test_lsro_rows_exactly_uniform():
    q = L.lsro_targets(3, 751)
    assert q.shape == (3, 751) and q.dtype == torch.float32
    assert torch.all(q == torch.tensor(1.0 / 751, dtype=torch.float32))


# -- the loss ---------------------------------------------------------------------------------------------------


def test_soft_ce_equals_cross_entropy_for_one_hot():
    gen = torch.Generator().manual_seed(4)
    logits, y = torch.randn(5, 7, generator=gen), torch.tensor([0, 3, 6, 2, 2])
    assert torch.allclose(L.soft_cross_entropy(logits, F.one_hot(y, 7).float()), F.cross_entropy(logits, y), atol=1e-6)


def test_soft_ce_gradient_is_w_times_p_minus_q_over_n():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(4, 6, generator=gen, dtype=torch.float64), dim=1)
    w = torch.tensor([1.0, 0.1, 0.0, 2.0], dtype=torch.float64)
    L.soft_cross_entropy(logits, q, w).backward()
    p = torch.softmax(logits.detach(), dim=1)
    assert torch.allclose(logits.grad.double(), w[:, None] * (p - q) / 4, atol=1e-6)


def test_soft_ce_matches_weighted_definition():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])  # p1 = [1/4, 3/4], p2 = [1/2, 1/2]
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = (2.0 * (-0.5 * math.log(0.25) - 0.5 * math.log(0.75)) + 0.5 * math.log(2.0)) / 2
    assert L.soft_cross_entropy(logits, q, torch.tensor([2.0, 0.5])).item() == pytest.approx(expected, abs=1e-6)


def test_soft_ce_stable_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    # row 1: -log p_1 = 2e4; row 2: lse = 1e4 + log 2, CE = sum_k q_k (lse - x_k) = (2e4 + 3 log 2) / 3
    expected = (2e4 + (2e4 + 3 * math.log(2.0)) / 3) / 2
    loss = L.soft_cross_entropy(logits.requires_grad_(), q)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_ce_under_bf16_autocast():
    gen = torch.Generator().manual_seed(6)
    layer, x = torch.nn.Linear(8, 5), torch.randn(4, 8, generator=gen)
    q = L.mprl_targets(torch.rand(4, 5, generator=gen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        loss = L.soft_cross_entropy(logits, q)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = -(q * torch.log_softmax(logits.detach().double(), dim=1)).sum(dim=1).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


# -- targets_for: one entry point for every method ---------------------------------------------------------------

K = 5


def _batch(c: int, seed: int = 7, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen)
    is_gen = torch.tensor([False, True] * (n // 2))
    labels = torch.where(is_gen, torch.tensor(-1), torch.arange(n) % K)
    ranks = torch.stack([torch.randperm(K, generator=gen) + 1 for _ in range(n)])
    return logits, labels, is_gen, ranks


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_every_target_row_is_a_distribution(method):
    spec = L.LabelSpec(method, K, keep=2 if method in ("smprl", "dmprl1") else None, real_smoothing=0.1)
    c = L.num_outputs(spec)
    assert c == (K + 1 if method == "allinone" else K)
    logits, labels, is_gen, ranks = _batch(c)
    for epoch in (0, 30):
        q, w = L.targets_for(spec, logits, labels, is_gen, epoch, static_ranks=ranks)
        assert q.shape == (8, c) and w.shape == (8,)
        assert (q >= 0).all() and torch.allclose(q.sum(dim=1), torch.ones(8), atol=1e-6)
        assert torch.all(w[~is_gen] == 1.0)


def test_real_rows_one_hot_and_smoothed():
    logits, labels, is_gen, _ = _batch(K)
    q, _ = L.targets_for(L.LabelSpec("lsro", K), logits, labels, is_gen, 0)
    assert torch.equal(q[~is_gen], F.one_hot(labels[~is_gen], K).float())
    q, _ = L.targets_for(L.LabelSpec("lsro", K, real_smoothing=0.2), logits, labels, is_gen, 0)
    assert torch.allclose(q[~is_gen], 0.8 * F.one_hot(labels[~is_gen], K).float() + 0.2 / K, atol=1e-7)


def test_allinone_lsro_pseudo_generated_rows():
    logits, labels, is_gen, _ = _batch(K + 1)
    q, w = L.targets_for(L.LabelSpec("allinone", K), logits, labels, is_gen, 0)
    assert torch.equal(q[is_gen], F.one_hot(torch.full((4,), K), K + 1).float()) and torch.all(w == 1.0)
    logits, labels, is_gen, _ = _batch(K)
    q, w = L.targets_for(L.LabelSpec("lsro", K), logits, labels, is_gen, 0)
    assert torch.all(q[is_gen] == torch.tensor(1.0 / K)) and torch.all(w == 1.0)
    q, w = L.targets_for(L.LabelSpec("pseudo", K), logits, labels, is_gen, 0)
    argmax = [max(range(K), key=lambda j: row[j]) for row in logits[is_gen].tolist()]
    assert torch.equal(q[is_gen], F.one_hot(torch.tensor(argmax), K).float())
    assert torch.allclose(w[is_gen], torch.full((4,), 0.1))


def test_smprl_uses_static_ranks_with_keep_and_order():
    logits, labels, is_gen, ranks = _batch(K)
    ranks[1] = torch.tensor([3, 1, 2, 4, 5])  # a generated row; K = 5, sigma = 2/6
    q, w = L.targets_for(L.LabelSpec("smprl", K), logits, labels, is_gen, 0, static_ranks=ranks)
    assert torch.allclose(q[1], torch.tensor([3, 1, 2, 4, 5]) / 15.0, atol=1e-7) and w[1] == 1.0
    # reference_code: idx = inverse permutation of ranks = [2, 3, 1, 4, 5]; keep=2 -> weights 4/5, 5/5, sigma = 10/18
    q, _ = L.targets_for(L.LabelSpec("smprl", K, order="reference_code", keep=2), logits, labels, is_gen, 0, ranks)
    assert torch.allclose(q[1], torch.tensor([0.0, 0.0, 0.0, 4 / 9, 5 / 9]), atol=1e-7)
    ranks[3] = torch.tensor([2, 3, 1, 5, 4])  # idx = [3, 1, 2, 5, 4]
    q, _ = L.targets_for(L.LabelSpec("smprl", K, order="reference_code"), logits, labels, is_gen, 0, ranks)
    assert torch.allclose(q[3], torch.tensor([3, 1, 2, 5, 4]) / 15.0, atol=1e-7)


@pytest.mark.parametrize("method", ["dmprl1", "dmprl2"])
def test_dynamic_targets_follow_own_logits_only(method):
    spec = L.LabelSpec(method, K, keep=3)
    logits, labels, is_gen, _ = _batch(K, n=10)
    q, _ = L.targets_for(spec, logits, labels, is_gen, 40)
    expected = torch.tensor([_brute_weights(r, 3, "paper") for r in torch.softmax(logits, 1).tolist()])
    expected = expected / expected.sum(dim=1, keepdim=True)
    assert torch.allclose(q[is_gen], expected[is_gen], atol=1e-6)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(8))
    q_perm, _ = L.targets_for(spec, logits[perm], labels[perm], is_gen[perm], 40)
    assert torch.equal(q_perm, q[perm])
    other = logits.clone()
    other[2:] = torch.randn(8, K) * 10.0
    q_other, _ = L.targets_for(spec, other, labels, is_gen, 40)
    assert torch.equal(q_other[:2], q[:2])


def test_targets_carry_no_gradient():
    logits = torch.randn(4, K, requires_grad=True)
    is_gen = torch.tensor([True, False, True, True])
    q, w = L.targets_for(L.LabelSpec("dmprl1", K), logits, torch.tensor([-1, 2, -1, -1]), is_gen, 0)
    assert not q.requires_grad and not w.requires_grad
    L.soft_cross_entropy(logits, q, w).backward()
    expected = w[:, None] * (torch.softmax(logits.detach(), 1) - q) / 4
    assert torch.allclose(logits.grad, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["pseudo", "dmprl2"])
def test_switch_epoch_gates_generated_loss(method):
    spec = L.LabelSpec(method, K, switch_epoch=20)
    logits, labels, is_gen, _ = _batch(K)
    gen_only = lambda t: t * is_gen.float()  # noqa: E731
    q, w = L.targets_for(spec, logits, labels, is_gen, 19)
    assert torch.all(w[is_gen] == 0.0) and L.soft_cross_entropy(logits, q, gen_only(w)).item() == 0.0
    q, w = L.targets_for(spec, logits, labels, is_gen, 20)
    assert torch.allclose(w[is_gen], torch.full((4,), 0.1)) and L.soft_cross_entropy(logits, q, gen_only(w)).item() > 0
    assert not L.is_active(spec, 19) and L.is_active(spec, 20)
    assert L.samples_generated(spec, 0)
    excl = L.LabelSpec(method, K, switch_epoch=20, before_switch="exclude")
    assert not L.samples_generated(excl, 19) and L.samples_generated(excl, 20)


def test_activity_and_defaults_per_method():
    for method in ("allinone", "lsro", "smprl", "dmprl1"):
        spec = L.LabelSpec(method, K, switch_epoch=20, before_switch="exclude")
        assert L.is_active(spec, 0) and L.samples_generated(spec, 0) and spec.effective_gen_weight == 1.0
    base = L.LabelSpec("baseline", K)
    assert not L.is_active(base, 5) and not L.samples_generated(base, 5) and base.effective_gen_weight == 0.0
    assert L.LabelSpec("dmprl2", K, gen_weight=0.5).effective_gen_weight == 0.5
    assert L.switch_epoch_for(50) == 20 and L.switch_epoch_for(10) == 4 and L.switch_epoch_for(7) == 3


# -- the sMpRL stage --------------------------------------------------------------------------------------------


class _TinyReID(torch.nn.Module):
    """Eval forward returns embeddings (like the re-ID net); classify() returns logits."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = torch.nn.Linear(12, 6), torch.nn.Linear(6, K)

    def forward(self, x):
        return self.embed(x.flatten(1))

    def classify(self, x):
        return self.fc(self.embed(x.flatten(1)))


def test_predict_static_ranks_tiny_model():
    torch.manual_seed(9)
    model = _TinyReID().train()
    imgs = torch.randn(7, 3, 2, 2)
    loader = [{"img": imgs[:4], "pid": torch.zeros(4)}, {"img": imgs[4:]}]
    ranks = L.predict_static_ranks(model, loader, logits_fn=lambda m, x: m.classify(x))
    assert ranks.dtype == np.uint16 and ranks.shape == (7, K) and model.training
    with torch.no_grad():
        probs = torch.softmax(model.classify(imgs), dim=1).tolist()
    expected = [[1 + sum(p[j] < p[c] for j in range(K)) for c in range(K)] for p in probs]
    assert ranks.tolist() == expected
    with pytest.raises(ValueError, match="img"):
        L.predict_static_ranks(model, [(imgs, None)], logits_fn=lambda m, x: m.classify(x))


# -- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"method": "dmprl3"}, "labels.method"),
        ({"order": "matlab"}, "labels.order"),
        ({"keep": 0}, "labels.keep"),
        ({"keep": K + 1}, "labels.keep"),
        ({"before_switch": "skip"}, "labels.before_switch"),
        ({"gen_weight": -0.1}, "labels.gen_weight"),
        ({"real_smoothing": 1.0}, "labels.real_smoothing"),
        ({"switch_epoch": -1}, "labels.switch_epoch"),
    ],
)
def test_bad_spec_raises_naming_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        L.LabelSpec(**{"method": "dmprl1", "num_classes": K, **kwargs})
    if field in ("labels.method", "labels.order"):
        assert "dmprl2" in str(err.value) or "reference_code" in str(err.value)


def test_bad_function_arguments_raise():
    p = _example_probs()
    with pytest.raises(ValueError, match="labels.order.*paper.*reference_code"):
        L.mprl_weights(p, order="code")
    with pytest.raises(ValueError, match="labels.keep"):
        L.mprl_targets(p, keep=5)
    with pytest.raises(ValueError, match="labels.method='LSRO' is not valid"):
        L.LabelSpec("LSRO", 4)
    with pytest.raises(ValueError, match="static_ranks"):
        L.targets_for(L.LabelSpec("smprl", 4), p, torch.tensor([-1]), torch.tensor([True]), 0)
    with pytest.raises(ValueError, match="permutation"):
        L.weights_from_ranks(torch.tensor([[1, 1, 2, 4]]))
    with pytest.raises(ValueError, match=r"logits must be \[N, 5\]"):
        L.targets_for(L.LabelSpec("allinone", 4), p, torch.tensor([-1]), torch.tensor([True]), 0)


def test_a_target_rule_without_an_implementation_raises(monkeypatch):
    """A method whose rule trainables.reid.labels does not implement fails loudly (it never gets zero targets)."""
    monkeypatch.setattr(methods, "TARGET_RULES", (*methods.TARGET_RULES, "brand_new"))
    monkeypatch.setitem(METHODS, "newmethod", Method("brand_new"))
    logits, labels, is_gen, _ = _batch(K)
    with pytest.raises(ValueError, match="target rule 'brand_new'.*does not implement"):
        L.targets_for(L.LabelSpec("newmethod", K), logits, labels, is_gen, 0)


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_targets_and_loss_never_wait_for_the_device(method, monkeypatch):
    """On meta tensors (shapes without data) any operation that reads values (boolean indexing, ``if t.any()``,
    ``int(t)``, a check that compares contents) raises: the step's targets and loss have none, so a training step on
    a GPU queues its work without waiting for the device."""
    spec = L.LabelSpec(method, K, keep=3 if method in ("smprl", "dmprl1") else None, real_smoothing=0.1,
                       switch_epoch=2 if METHODS[method].switched else 0)
    c, n = L.num_outputs(spec), 8
    logits = torch.randn(n, c, device="meta", requires_grad=True)
    labels = torch.zeros(n, dtype=torch.long, device="meta")
    is_gen = torch.zeros(n, dtype=torch.bool, device="meta")
    ranks = torch.zeros(n, K, dtype=torch.long, device="meta")
    monkeypatch.setattr(torch, "autocast", lambda **_: contextlib.nullcontext())  # autocast has no meta device
    for epoch in (0, 5):  # before and after the switch of pseudo / dMpRL-II
        q, w = L.targets_for(spec, logits, labels, is_gen, epoch, static_ranks=ranks)
        assert q.device.type == "meta" and q.shape == (n, c) and w.shape == (n,)
        L.soft_cross_entropy(logits, q, w).backward()
    with pytest.raises((NotImplementedError, RuntimeError)):  # the probe itself: a value read on meta raises
        bool(is_gen.any())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_suite.sh runs it)")
@pytest.mark.parametrize("method", LABEL_METHODS)
def test_targets_and_loss_do_not_synchronise_cuda(method):
    """The same on a GPU, with CUDA's own detector: any host-device synchronisation raises."""
    spec = L.LabelSpec(method, K, keep=3 if method in ("smprl", "dmprl1") else None, real_smoothing=0.1)
    logits, labels, is_gen, ranks = (t.cuda() for t in _batch(L.num_outputs(spec)))
    logits.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q, w = L.targets_for(spec, logits, labels, is_gen, 30, static_ranks=ranks)
        L.soft_cross_entropy(logits, q, w).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(q.sum(1).cpu(), torch.ones(len(q)), atol=1e-6)


def test_the_unlabelled_control_samples_generated_images_and_never_puts_loss_on_them():
    """``unlabelled``: generated images in every epoch's batches (the sampler draws them), weight 0 at every epoch,
    even with labels.gen_weight set; the real images keep weight 1. Its loss is the real images' loss alone."""
    spec = L.LabelSpec("unlabelled", K, gen_weight=1.0, switch_epoch=3)
    logits, labels, is_gen, _ = _batch(K)
    assert is_gen.any() and (~is_gen).any()
    for epoch in (0, 3, 40):
        assert L.samples_generated(spec, epoch) and not L.is_active(spec, epoch)
        q, w = L.targets_for(spec, logits, labels, is_gen, epoch)
        assert torch.equal(w, (~is_gen).float())
        real_only = L.soft_cross_entropy(logits[~is_gen], q[~is_gen]) * (~is_gen).sum() / len(is_gen)
        assert torch.allclose(L.soft_cross_entropy(logits, q, w), real_only)
    assert METHODS["unlabelled"].control and not METHODS["unlabelled"].labelled and METHODS["unlabelled"].generated
