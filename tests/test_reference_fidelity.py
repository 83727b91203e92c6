"""The paper-vs-code switches of docs/protocol.md: how the pool is rendered (gan.sample_bn, gan.save_stretch), the
6621e2c generator and its two G steps (gan.arch, gan.g_steps), the authors' learning rates (reid.lr_scheme, read
against the table in docs/protocol.md), the two-stream weight decay, validation identities kept out of the GAN,
and the pool-quality measurement."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datasets.generated import GeneratedStore
from orchestrator.config import load_config, replace, to_dict
from orchestrator.stage_cache import Paths, PoolQualityOut
from trainables.gan import sample
from trainables.gan.nets import Generator, LsroGenerator, build_generator
from trainables.gan.sample import Rendering, export_generator, generate, load_generator, to_uint8

ROOT = Path(__file__).parents[1]
CPU = torch.device("cpu")
TINY_GAN = ["gan.image_size=[32,16]", "gan.g_width=8", "gan.d_width=8", "gan.latent_dim=16"]


def _export(tmp_path: Path, arch: str = "ours") -> Path:
    """A generator file of a randomly initialised tiny G whose BatchNorm running statistics are not the batch's."""
    gan = load_config("smoke", overrides=[*TINY_GAN, f"gan.arch={arch}"]).gan
    torch.manual_seed(0)
    G = build_generator(gan.arch, gan.latent_dim, gan.image_size, gan.g_width)
    for m in G.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return export_generator({"epoch": 0, "G": G.state_dict(), "gan_config": to_dict(gan)}, tmp_path / "g.pt")


def _pixels(store: GeneratedStore) -> np.ndarray:
    return np.concatenate([np.load(store.shard_path(c)) for c in range(store.num_chunks)])


# ------------------------------------------------------------------------------------------ rendering

def test_batch_and_running_statistics_render_different_images_and_batch_mode_is_reproducible(tmp_path):
    gen = _export(tmp_path)
    batch = Rendering("batch", 16)
    running = _pixels(generate(gen, tmp_path / "run", 40, device=CPU).store)
    a = generate(gen, tmp_path / "b1", 40, device=CPU, render=batch).store
    b = generate(gen, tmp_path / "b2", 40, device=CPU, render=batch).store
    assert np.array_equal(_pixels(a), _pixels(b))  # the same seed and batches: the same images
    assert not np.array_equal(_pixels(a), running)  # the same latents, other statistics
    assert a.info["chunk_size"] == 96 and a.info["meta"]["bn"] == "batch" and a.info["meta"]["bn_batch"] == 16
    with pytest.raises(ValueError, match="other settings"):  # a store rendered otherwise is never overwritten
        generate(gen, tmp_path / "run", 40, device=CPU, render=batch)


def test_batch_mode_normalises_each_image_with_its_own_batch_and_leaves_running_statistics_alone(tmp_path):
    G = load_generator(_export(tmp_path))
    before = {k: v.clone() for k, v in G.state_dict().items()}
    store = GeneratedStore.create(tmp_path / "s", n=40, image_size=(32, 16), meta={}, chunk_size=40)
    images = sample.render_chunk(G, store, 0, seed=3, render=Rendering("batch", 16))
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())  # running statistics untouched
    assert not G.training and all(m.track_running_stats for m in G.modules() if isinstance(m, nn.BatchNorm2d))
    z = sample.sample_latent(48, G.latent_dim, torch.Generator().manual_seed(sample.chunk_seed(3, 0)))
    G.train()
    with torch.no_grad():  # batch 2 alone, then the short last batch filled up to 16 latents
        second, last = G(z[16:32]), G(z[32:48])[:8]
    assert np.array_equal(images[16:32], to_uint8(second)) and np.array_equal(images[32:], to_uint8(last))


def test_stretch_byte_scales_each_image_to_its_own_min_and_max():
    x = torch.stack([torch.linspace(-0.3, 0.2, 3 * 8 * 4).view(3, 8, 4), torch.full((3, 8, 4), 0.5)])
    x[1, 0, 0, 0] = -0.9
    out = to_uint8(x, stretch=True)
    for img, src in zip(out, x.permute(0, 2, 3, 1).numpy()):  # scipy's bytescale
        lo, hi = src.min(), src.max()
        assert np.array_equal(img, ((src - lo) * 255 / (hi - lo) + 0.5).astype(np.uint8))
        assert (img.min(), img.max()) == (0, 255)
    assert to_uint8(x)[0].max() < 255  # the fixed map does not stretch


def test_cli_batch_statistics_and_stretch_store_images_that_each_span_0_to_255(tmp_path, capsys):
    from orchestrator.train import main

    args = ["gan", "--preset", "smoke", "--out", str(tmp_path), "--set", "gan.sample_bn=batch", "--set",
            "gan.save_stretch=true", "--set", "gan.epochs=1", "--set", "dataset.synthetic_ids=4", "--num-images", "40",
            "--set", f"cluster.storage_path={tmp_path}"]
    assert main(args) == 0
    store = GeneratedStore(tmp_path / "generated-bn_batch-stretch")
    assert store.complete and store.info["meta"]["stretch"] is True
    pixels = _pixels(store).reshape(40, -1)
    assert (pixels.min(1) == 0).all() and (pixels.max(1) == 255).all()


# ------------------------------------------------------------------------------------------ the 6621e2c DCGAN

def test_lsro_generator_is_the_6621e2c_layout():
    G = LsroGenerator(100, (128, 128), 64)
    deconvs = [m for m in G.upsample if isinstance(m, nn.ConvTranspose2d)]
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [d.out_channels for d in deconvs] == [512, 256, 128, 64, 3] and all(d.stride == (2, 2) for d in deconvs)
    assert G.project.out_features == 4 * 4 * 1024 and G.project.bias is not None
    assert [n.num_features for n in norms] == [1024, 512, 256, 128, 64, 3]  # BN on the 3-channel map
    assert (G.to_rgb.in_channels, G.to_rgb.out_channels, G.to_rgb.stride, G.to_rgb.kernel_size) == (3, 3, (1, 1),
                                                                                                    (5, 5))
    assert all(m.bias is not None for m in G.modules() if isinstance(m, (nn.ConvTranspose2d, nn.Linear)))
    out = G(torch.rand(2, 100) * 2 - 1)
    assert out.shape == (2, 3, 128, 128) and out.abs().max() <= 1
    ours = Generator(100, (128, 128), 64)
    assert [m.out_channels for m in ours.upsample if isinstance(m, nn.ConvTranspose2d)][-1] == 64
    with pytest.raises(ValueError, match="gan.arch"):
        build_generator("carpedm20", 100, (64, 64), 64)


def test_an_exported_lsro_generator_loads_as_one(tmp_path):
    assert isinstance(load_generator(_export(tmp_path, "lsro")), LsroGenerator)


def test_g_steps_updates_g_that_many_times_per_d_update():
    from trainables.gan.nets import Discriminator
    from trainables.gan.train import train_step

    torch.manual_seed(0)
    G, D = Generator(16, (32, 16), 8), Discriminator((32, 16), 8)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 2e-4), torch.optim.Adam(D.parameters(), 2e-4)
    vals = train_step(G, D, opt_g, opt_d, torch.rand(8, 3, 32, 16) * 2 - 1, 16, g_steps=2)
    step = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert (step(opt_g), step(opt_d)) == (2, 1) and torch.isfinite(vals).all()


def test_the_gan_never_sees_the_validation_identities(tiny_root):
    from trainables.gan.train import training_images
    from trainables.reid.loop import load_run_data

    cfg = load_config("smoke", overrides=["reid.val_ids=2", "labels.method=baseline"])
    data = load_run_data(cfg.reid, cfg.labels, _inputs(tiny_root))
    gan_pids = {r.pid for r in training_images(tiny_root, 2)}
    assert gan_pids == {r.pid for r in data.split.train}
    assert not gan_pids & {r.pid for r in data.val.query}
    assert len(training_images(tiny_root, 0)) > len(training_images(tiny_root, 2))


def _inputs(root):
    from trainables.config import ReidInputs

    return ReidInputs(str(root))


def test_stage_keys_separate_the_generator_from_its_rendering(tmp_path):
    from orchestrator import stages

    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}"])
    res = {"CPU": 1.0}

    def keys(c):
        gan = stages.gan_node(c, "dataset-x", res)
        return gan.key, stages.generate_node(c, gan, 64, res).key

    gan, gen = keys(cfg)
    assert keys(replace(cfg, **{"gan.sample_bn": "batch"}))[0] == gan  # rendering: no new GAN
    assert keys(replace(cfg, **{"gan.save_stretch": True}))[1] != gen
    assert keys(replace(cfg, **{"gan.sample_bn": "batch"}))[1] != gen
    for change in ({"gan.g_steps": 2}, {"gan.arch": "lsro"}, {"reid.val_ids": 2}):
        assert keys(replace(cfg, **change))[0] != gan, change


# ------------------------------------------------------------------------------------------ learning rates

def _protocol_rates() -> dict[str, tuple[float, float]]:
    """The "Learning rates" table of docs/protocol.md: class -> (effective lr at epochs 1-40, weight-decay mult)."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("## Learning rates", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|[^|]*\|\s*([\d.e+-]+)\s*\|\s*([\d.e+-]+)\s*\|\s*([\d.]+)\s*\|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
    return rows


def test_reference_code_rates_are_the_table_of_protocol_md():
    from trainables.reid.models import REFERENCE_CODE_RATES, IdentificationNet

    table = _protocol_rates()
    assert set(table) == set(REFERENCE_CODE_RATES)
    cfg = load_config("paper", overrides=["dataset.root=/data/Market-1501"])
    assert cfg.reid.lr_scheme == "reference_code"
    model = IdentificationNet(751, backbone="resnet50", embed_dim=None, dropout=0.75)
    groups = {g["name"]: g for g in model.param_groups(cfg.reid.lr, cfg.reid.new_lr_mult, 5e-4, "reference_code")}
    for name, (mult, lr, wd_mult) in table.items():
        assert REFERENCE_CODE_RATES[name] == (mult, wd_mult)
        assert groups[name]["lr"] == pytest.approx(lr) and groups[name]["weight_decay"] == pytest.approx(5e-4 * wd_mult)
    assert groups["conv1"]["params"] == [model.backbone.conv1.weight]
    assert groups["fc_weight"]["params"] == [model.classifier.weight]
    assert groups["fc_bias"]["params"] == [model.classifier.bias]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(groups["bn_weight"]["params"]) == len(norms) == 53
    assert len(groups["conv"]["params"]) == 52  # every conv filter but conv1
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    paper = model.param_groups(0.002, 50.0, 5e-4)
    assert [(g["name"], g["lr"]) for g in paper] == [("backbone", 0.002), ("new", pytest.approx(0.1))]


def test_reference_code_init_and_bn_moments(tmp_path):
    from trainables.reid.loop import build_model

    cfg = load_config("smoke", overrides=["reid.lr_scheme=reference_code", "reid.embed_dim=null"])
    model = build_model(cfg.reid, 12)
    bound = 0.1 * (3 / model.classifier.in_features) ** 0.5
    w = model.classifier.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and model.classifier.bias.abs().max() == 0
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    plain = build_model(load_config("smoke").reid, 12)
    assert {m.momentum for m in plain.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


def test_two_stream_weight_decay_is_the_authors_two_stream_scripts():
    from trainables.reid.loop import weight_decay

    two = load_config("smoke", overrides=["reid.model=twostream", "labels.method=dmprl2"])
    ident = load_config("smoke", overrides=["labels.method=dmprl2"])
    assert weight_decay(two.reid, two.labels) == 1e-4 and weight_decay(ident.reid, ident.labels) == 5e-4


def test_the_learning_rate_ablation_trains_its_own_baselines(tmp_path):
    from orchestrator import stages
    from orchestrator.trials import TrialSpec, build_trials

    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "sweep.lr_schemes=[reference_code]",
                                          "sweep.methods=[baseline, lsro, smprl]"])
    trials = build_trials(cfg)
    ablation = [t for t in trials if t.lr_scheme]
    assert {(t.method, t.lr_scheme) for t in ablation} == {("baseline", "reference_code"), ("lsro", "reference_code")}
    base = next(t for t in ablation if t.method == "baseline")
    assert TrialSpec.from_key(base.key) == base and base.overrides()["reid.lr_scheme"] == "reference_code"
    assert "reid.lr_scheme" not in TrialSpec("baseline", 0).overrides()
    plan = stages.plan_stages(cfg, Paths(tmp_path), [(t.method, t.num_gan, t.seed) for t in trials if not t.lr_scheme])
    assert plan.needs("baseline", 0, base.reuses_baseline) == (plan.dataset, plan.decoded)  # it trains
    assert plan.needs("baseline", 0) == (plan.baselines[0],)


# ------------------------------------------------------------------------------------------ pool quality

def test_frechet_distance():
    from trainables.reid.pool_quality import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 5))
    cov = np.cov(a, rowvar=False)
    assert frechet_distance(a.mean(0), cov, a.mean(0), cov) == pytest.approx(0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0, 0, 0])
    assert frechet_distance(np.zeros(5), np.eye(5), shift, np.eye(5)) == pytest.approx(5.0)
    assert frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), 4 * np.eye(1)) == pytest.approx(1.0)  # (1-2)^2


def test_pool_quality_measures_the_pool_against_the_real_images(tiny_split, tmp_path):
    from datasets.decoded_cache import image_rows
    from trainables.reid.loop import build_model
    from trainables.reid.pool_quality import SHEET_FILE, pool_quality

    cfg = load_config("smoke", overrides=[*TINY_GAN])
    store = generate(_export(tmp_path), tmp_path / "s", 30, device=CPU).store
    model = build_model(cfg.reid, 12)
    out = pool_quality(model, tiny_split.train, store.records(), cfg.reid, CPU, tmp_path)
    real = image_rows(tiny_split.train, cfg.reid.image_size, None).take(np.arange(len(tiny_split.train)))
    assert out["real_mean"] == pytest.approx(real.reshape(-1, 3).mean(0), abs=0.01)
    assert out["real_std"] == pytest.approx(real.reshape(-1, 3).std(0), abs=0.01)
    assert (out["real_n"], out["gen_n"]) == (len(tiny_split.train), 30)
    assert out["fd"] > out["fd_real_halves"] >= 0 and 0 < out["gen_confidence"] <= 1
    assert Path(out["sheet"]) == tmp_path / SHEET_FILE and (tmp_path / SHEET_FILE).is_file()
    pq = PoolQualityOut(**out, rendering="BatchNorm running statistics, fixed [-1, 1] byte map")
    assert PoolQualityOut.from_metrics(pq.metrics(), pq.sheet, pq.rendering) == pq
    assert "Fréchet distance" in pq.summary() and "running statistics" in pq.summary()


def test_every_pool_is_measured_in_the_feature_space_of_reid_seeds_baseline(tmp_path):
    from orchestrator import stages

    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "sweep.methods=[lsro]",
                                          "sweep.seeds=[1]"])
    plan = stages.plan_stages(cfg, Paths(tmp_path), [("lsro", 64, 1)])
    node = plan.nodes[plan.pool_quality]
    assert node.deps == (plan.dataset, plan.baselines[0], plan.generate) and node.artifacts == "pool_sheet.png"
    assert stages.plan_stages(cfg, Paths(tmp_path), [("baseline", 0, 0)]).pool_quality is None  # no pool


# ------------------------------------------------------------------------------------------ the coded switch

@pytest.mark.parametrize("epoch", [0, 19, 20, 40])
def test_the_coded_switch_runs_as_the_authors_scripts(epoch):
    from trainables.reid.labels import LabelSpec, targets_for

    logits, labels = torch.randn(4, 6), torch.tensor([1, 2, 0, 0])
    gen = torch.tensor([False, False, True, True])

    def weights(method, switch):
        spec = LabelSpec(method, 6, switch_epoch=20, switch=switch)
        return targets_for(spec, logits, labels, gen, epoch)[1].tolist()

    paper = 0.1 if epoch >= 20 else 0.0
    assert weights("dmprl2", "paper") == pytest.approx([1, 1, paper, paper])
    assert weights("dmprl2", "reference_code") == pytest.approx([2, 2, 0.1, 0.1])  # from epoch 1, real CE twice
    assert weights("pseudo", "paper") == pytest.approx([1, 1, paper, paper])
    assert weights("pseudo", "reference_code") == pytest.approx([1, 1, 0, 0])  # never on
    assert weights("lsro", "reference_code") == weights("lsro", "paper") == pytest.approx([1, 1, 1, 1])


def test_an_ablation_trials_config_resolves():
    """A learning-rate ablation trial's config has its scheme in both reid.lr_scheme and sweep.lr_schemes."""
    from orchestrator.trials import build_trials

    cfg = load_config("smoke", overrides=["sweep.lr_schemes=[reference_code]"])
    for t in build_trials(cfg):
        assert replace(cfg, **t.overrides()).reid.lr_scheme == (t.lr_scheme or "paper")
