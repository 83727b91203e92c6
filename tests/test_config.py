import dataclasses
from pathlib import Path

import pytest

from orchestrator.config import (
    LABEL_METHODS,
    PRESETS,
    Config,
    config_hash,
    dump_yaml,
    flat_dict,
    from_dict,
    load_config,
    parse_override,
    replace,
    to_dict,
)


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("paper")])
def test_presets_load(preset, tmp_path):
    cfg = load_config(preset, storage_base=tmp_path)
    assert cfg.preset == preset
    assert Path(cfg.cluster.storage_path).is_absolute()
    assert cfg.dataset.name == "synthetic"


def test_paper_preset_needs_a_dataset_root(tmp_path):
    with pytest.raises(ValueError, match="dataset.root is required"):
        load_config("paper")
    cfg = load_config("paper", overrides=[f"dataset.root={tmp_path}"])
    assert cfg.reid.backbone == "resnet50" and cfg.reid.image_size == (224, 224)  # the paper's 224x224 crop
    assert cfg.labels.num_gan == 24000 and cfg.reid.use_gpu


def test_real_dataset_needs_an_explicit_pretrained_choice(tmp_path):
    root = f"dataset.root={tmp_path}"
    assert load_config("paper", overrides=[root]).reid.pretrained == "imagenet"
    with pytest.raises(ValueError, match="reid.pretrained is not set for dataset.name='market1501'.*random"):
        load_config("paper", overrides=[root, "reid.pretrained=null"])
    with pytest.raises(ValueError, match="reid.pretrained is not set for dataset.name='dukemtmc'"):
        load_config("smoke", overrides=["dataset.name=dukemtmc", root])
    for choice in ("random", str(tmp_path / "resnet18.pth")):
        cfg = load_config("smoke", overrides=["dataset.name=dukemtmc", root, f"reid.pretrained={choice}"])
        assert cfg.reid.pretrained == choice
    assert load_config("smoke").reid.pretrained is None  # synthetic data may start from random init


def test_presets_differ_in_scale():
    smoke, cpu = load_config("smoke"), load_config("cpu")
    assert smoke.reid.epochs < cpu.reid.epochs
    assert smoke.dataset.synthetic_ids < cpu.dataset.synthetic_ids


def test_the_default_sweep_compares_over_seeds():
    cpu = load_config()
    assert cpu.preset == "cpu" and len(cpu.sweep.seeds) >= 3  # one seed is no finding (issue 17)
    assert cpu.dataset.synthetic_test_ids >= 150  # ~4 queries per test identity: 600+ queries
    assert cpu.reid.weight_decay is not None  # one decay for every method: no per-method confound


def test_overrides_are_typed():
    cfg = load_config("smoke", overrides=["reid.epochs=3", "labels.keep=5", "reid.image_size=[32, 16]",
                                          "reid.embed_dim=null", "sweep.methods=[lsro, smprl]", "reid.lr=1e-3"])
    assert cfg.reid.epochs == 3 and cfg.labels.keep == 5 and cfg.reid.image_size == (32, 16)
    assert cfg.reid.embed_dim is None and cfg.sweep.methods == ("lsro", "smprl")
    assert cfg.reid.lr == pytest.approx(1e-3) and isinstance(cfg.reid.lr, float)


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("reid:\n  epochs: 7\n  backbone: resnet34\nlabels:\n  method: dmprl2\n")
    cfg = load_config("smoke", file=f, overrides=["reid.epochs=9"])
    assert (cfg.reid.epochs, cfg.reid.backbone, cfg.labels.method) == (9, "resnet34", "dmprl2")


@pytest.mark.parametrize("override, field", [
    ("reid.epoch=3", "reid.epoch"),
    ("labelz.method=lsro", "labelz"),
    ("reid.backbone=resnet51", "reid.backbone"),
    ("labels.method=dmprl3", "labels.method"),
    ("labels.order=matlab", "labels.order"),
    ("labels.num_gan=-1", "labels.num_gan"),
    ("labels.keep=0", "labels.keep"),
    ("reid.epochs=ten", "reid.epochs"),
    ("reid.batch_size=0", "reid.batch_size"),
    ("reid.dropout=1.5", "reid.dropout"),
    ("reid.use_gpu=maybe", "reid.use_gpu"),
    ("dataset.name=market", "dataset.name"),
    ("sweep.methods=[lsro, nope]", "sweep.methods"),
    ("labels.switch_epoch=2", "labels.switch_epoch"),
    ("reid.optimizer=rmsprop", "reid.optimizer"),
    ("dataset.synthetic_test_ids=1", "dataset.synthetic_test_ids"),
])
def test_bad_values_name_the_key(override, field):
    with pytest.raises(ValueError) as err:
        load_config("smoke", overrides=[override])
    assert field in str(err.value)


def test_choice_errors_list_the_options():
    with pytest.raises(ValueError, match="'lsro'.*'smprl'"):
        load_config("smoke", overrides=["labels.method=lrso"])


def test_batch_must_divide_across_workers():
    with pytest.raises(ValueError, match="reid.batch_size=30 is not divisible by reid.num_workers=4"):
        load_config("smoke", overrides=["reid.batch_size=30", "reid.num_workers=4"])


def test_keep_cannot_exceed_training_ids():
    with pytest.raises(ValueError, match="labels.keep"):
        load_config("smoke", overrides=["labels.keep=1000"])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("reid.epochs")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("smoke", file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config("smoke", file=bad)


def test_round_trip_through_dict_and_yaml():
    cfg = load_config("cpu", overrides=["labels.keep=3"])
    assert from_dict(to_dict(cfg)) == cfg
    import yaml
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    flat = flat_dict(cfg)
    assert flat["labels.keep"] == 3 and flat["reid.image_size"] == [64, 32]


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.reid.epochs = 3  # type: ignore[misc]


def test_hash_depends_only_on_named_sections():
    a = load_config("smoke")
    b = replace(a, **{"labels.method": "smprl", "reid.epochs": 5})
    c = replace(a, **{"gan.epochs": 5})
    assert config_hash(a, "dataset", "gan") == config_hash(b, "dataset", "gan")
    assert config_hash(a, "dataset", "gan") != config_hash(c, "dataset", "gan")
    assert config_hash(a, "reid.epochs") != config_hash(b, "reid.epochs")
    with pytest.raises(ValueError, match="unknown config key"):
        config_hash(a, "reid.nope")


def test_paper_presets_are_the_papers_grid_and_resolve_without_warnings(caplog):
    import logging
    import warnings

    from orchestrator.trials import TrialSpec, build_trials

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            paper = load_config("paper", overrides=["dataset.root=/data/Market-1501"])
            two = load_config("paper-twostream", overrides=["dataset.root=/data/Market-1501"])
    assert not caplog.records
    trials = build_trials(paper)
    per_seed = [t for t in trials if t.seed == 0]
    # Table IV (1 + 6 x 6) + the rank-order ablation (3) + the learning-rate ablation at 24k (baseline + 5 methods:
    # sMpRL's labels would come from the other scheme's baseline)
    assert len(trials) == 138 and len(per_seed) == 46
    assert {t.num_gan for t in per_seed if t.method == "allinone" and t.lr_scheme is None} == {
        12000, 18000, 24000, 30000, 36000, 48000}
    assert {(t.method, t.num_gan) for t in per_seed if t.order == "reference_code"} == {
        ("smprl", 24000), ("dmprl1", 24000), ("dmprl2", 24000)}
    ablation = [t for t in per_seed if t.lr_scheme is not None]
    assert {(t.method, t.num_gan, t.lr_scheme) for t in ablation} == {
        ("baseline", 0, "paper"), *((m, 24000, "paper") for m in ("allinone", "pseudo", "lsro", "dmprl1", "dmprl2"))}
    assert all(TrialSpec.from_key(t.key) == t for t in trials) and not any(t.reuses_baseline for t in ablation)
    r = paper.reid
    assert (r.image_size, r.augment, r.epochs, r.lr_step_epoch, r.pretrained) == ((224, 224), "paper", 50, 40,
                                                                                  "imagenet")
    assert paper.labels.switch_at == 20 and r.lr * r.new_lr_mult == pytest.approx(0.1)  # the paper scheme's FC rate
    assert r.lr_scheme == "reference_code" and two.reid.lr_scheme == "reference_code"  # what made Table IV
    for cfg in (paper, two):  # the pool as layumi/Person-reID_GAN@6621e2c rendered it
        g = cfg.gan
        assert (g.arch, g.g_steps, g.sample_bn, g.save_stretch, g.batch_size) == ("lsro", 2, "batch", True, 64)
    assert (two.reid.model, two.reid.epochs, two.reid.lr_step_epoch, two.labels.switch_at) == ("twostream", 60, 40, 20)
    assert two.reid.batch_size // 2 == 32 and len(build_trials(two)) == 9  # 32 pairs; Table VII x 3 seeds


def test_orders_at_must_be_swept():
    with pytest.raises(ValueError, match="sweep.orders_at contains 5"):
        load_config("smoke", overrides=["sweep.orders_at=[5]"])
    with pytest.raises(ValueError, match="sweep.lr_schemes_at contains 5"):
        load_config("smoke", overrides=["sweep.lr_schemes=[reference_code]", "sweep.lr_schemes_at=[5]"])
    with pytest.raises(ValueError, match="repeats reid.lr_scheme='paper'"):
        load_config("smoke", overrides=["sweep.lr_schemes=[paper]"])
    for key, bad in (("gan.sample_bn", "eval"), ("gan.arch", "carpedm20"), ("reid.lr_scheme", "text"),
                     ("sweep.lr_schemes", "[text]")):
        with pytest.raises(ValueError, match=key.split(".")[1]):
            load_config("smoke", overrides=[f"{key}={bad}"])


def test_periodic_evaluation_and_asha_read_the_validation_split_only():
    with pytest.raises(ValueError, match="reid.eval_every=2 evaluates a validation split"):
        load_config("smoke", overrides=["reid.eval_every=2"])
    with pytest.raises(ValueError, match="never on the test split"):
        load_config("smoke", overrides=["sweep.asha=true", "reid.val_ids=2"])
    cfg = load_config("smoke", overrides=["sweep.asha=true", "reid.val_ids=2", "reid.eval_every=1"])
    assert cfg.reid.val_ids == 2


def test_asha_never_reads_a_test_metric():
    with pytest.raises(ValueError, match="test metrics never stop or select trials"):
        load_config("smoke", overrides=["sweep.asha_metric=rank1"])
    for prefixed in ("rr_rank1", "bnr_mAP", "xd_dukemtmcreid_rank1", "xd_duke_rr_mINP"):  # test metrics too
        with pytest.raises(ValueError, match="test metrics never stop or select trials"):
            load_config("smoke", overrides=[f"sweep.asha_metric={prefixed}"])
    assert load_config("smoke", overrides=["sweep.asha_metric=val_mAP"]).sweep.asha_metric == "val_mAP"
    with pytest.raises(ValueError, match="sweep.asha_mode='best'"):
        load_config("smoke", overrides=["sweep.asha_mode=best"])


def test_rehearsal_preset_is_the_paper_structure_at_market_counts():
    cfg = load_config("rehearsal")
    assert cfg.dataset.synthetic_counts == "market1501" and cfg.labels.num_gan == 24000
    assert set(cfg.sweep.methods) == set(LABEL_METHODS) and set(cfg.sweep.orders) == {"paper", "reference_code"}
    assert cfg.reid.use_gpu and cfg.gan.use_gpu and cfg.cluster.logical_gpus  # placed like the paper preset
    assert cfg.reid.backbone == "tiny" and cfg.reid.max_steps and cfg.gan.max_steps
    with pytest.raises(ValueError, match="reid.backbone=tiny has no ImageNet weights"):
        replace(cfg, **{"reid.pretrained": "imagenet"})
    with pytest.raises(ValueError, match="dataset.synthetic_counts"):
        replace(cfg, **{"dataset.synthetic_counts": "duke"})
    with pytest.raises(ValueError, match="reid.max_steps"):
        replace(cfg, **{"reid.max_steps": 0})
