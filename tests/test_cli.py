"""The command lines as a new user meets them: a label switch outside training refused, --help that states the
defaults and imports nothing heavy, datasets.check's one-line errors, old entry points that say where to go, and
the sweep's --dry-run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import stage_cache, sweep, train
from orchestrator.config import load_config
from orchestrator.config_checks import check_run_switch, check_sweep_switch, switch_epoch

ROOT = Path(__file__).parents[1]
PAPER_SHORT = ["--preset", "paper", "--set", "dataset.root=/data/Market-1501", "--set", "reid.epochs=10",
               "--set", "reid.lr_step_epoch=8"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ------------------------------------------------------------------------------ the label switch inside training

def test_a_switch_past_the_last_epoch_is_refused_naming_both_fields(capsys):
    assert sweep.main([*PAPER_SHORT, "--print-config"]) == 2
    err = _error_line(capsys)
    assert "labels.switch_at=20" in err and "reid.epochs=10" in err and "dmprl2, pseudo" in err
    assert train.main(["reid", *PAPER_SHORT, "--label-method", "pseudo", "--num-gan", "100"]) == 2
    assert "labels.switch_at=20" in _error_line(capsys)


def test_the_switch_check_applies_only_where_a_method_switches(capsys):
    assert sweep.main([*PAPER_SHORT, "--set", "sweep.methods=[baseline, lsro, dmprl1]", "--print-config"]) == 0
    assert "switch_at: 20" in capsys.readouterr().out
    short = ["dataset.root=/d", "reid.epochs=10", "reid.lr_step_epoch=8"]
    check_run_switch(load_config("paper", overrides=[*short, "labels.method=lsro"]))
    check_run_switch(load_config("paper", overrides=[*short, "labels.method=dmprl2", "labels.num_gan=0"]))  # no images
    with pytest.raises(ValueError, match="reid.epochs=10"):
        check_run_switch(load_config("paper", overrides=[*short, "labels.method=dmprl2"]))
    with pytest.raises(ValueError, match="reid.epochs=10"):
        check_sweep_switch(load_config("paper", overrides=short))
    # the scripts' coded switch (labels.switch=reference_code) reads no switch epoch
    check_sweep_switch(load_config("paper", overrides=[*short, "labels.switch=reference_code"]))
    check_sweep_switch(load_config("paper", overrides=["dataset.root=/d"]))  # epoch 20 of 50


def test_the_fraction_switch_is_checked_as_the_loop_computes_it():
    cfg = load_config("smoke", overrides=["reid.epochs=4", "labels.switch_epoch=0.9"])  # round(3.6) = 4: never
    assert switch_epoch(cfg.labels, 4) == 4
    with pytest.raises(ValueError, match=r"labels.switch_epoch=0.9 \(epoch 4\) >= reid.epochs=4"):
        check_sweep_switch(cfg)
    check_sweep_switch(load_config("smoke", overrides=["reid.epochs=4", "labels.switch_epoch=0.8"]))  # epoch 3


# ------------------------------------------------------------------------------ --help

HELP_PROBE = """
import sys, time
t = time.perf_counter()
from orchestrator import {module}
try:
    {module}.main({argv!r})
except SystemExit:
    pass
print({{"seconds": time.perf_counter() - t,
        "heavy": sorted(m for m in ("ray", "mlflow", "torch", "torchvision") if m in sys.modules)}},
      file=sys.stderr)
"""


@pytest.mark.parametrize("module, argv", [("sweep", ["--help"]), ("train", ["--help"]), ("train", ["reid", "--help"]),
                                          ("train", ["gan", "--help"])])
def test_help_imports_no_ray_mlflow_or_torch(module, argv):
    code = HELP_PROBE.format(module=module, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    probe = eval(done.stderr.strip().splitlines()[-1])  # noqa: S307 - the dict printed by the probe above
    assert probe["heavy"] == [], probe
    assert "usage: python -m orchestrator." in done.stdout


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [a for sub in action.choices.values() for a in _options(sub)]
        found.append(action)
    return found


def test_every_option_has_help_and_the_defaults_are_stated():
    parsers = {"sweep": sweep._parser(), "train": train._parser()}
    for name, parser in parsers.items():
        missing = [a.option_strings or a.dest for a in _options(parser) if not a.help]
        assert missing == [], (name, missing)
    assert "default: cpu" in parsers["sweep"].format_help()
    reid = parsers["train"]._subparsers._group_actions[0].choices["reid"].format_help()
    assert "default: smoke; the sweep's is cpu" in " ".join(reid.split())
    assert "--dry-run" in parsers["sweep"].format_help() and "--tracking-uri" in reid


# ------------------------------------------------------------------------------ datasets.check

@pytest.mark.parametrize("what", ["missing", "empty", "bad name"])
def test_datasets_check_says_what_is_wrong_in_one_line(tmp_path, what):
    root = tmp_path / "ds"
    if what != "missing":
        (root / "bounding_box_train").mkdir(parents=True)
    if what == "bad name":
        (root / "bounding_box_train" / "cat.jpg").write_bytes(b"x")
    done = subprocess.run([sys.executable, "-m", "datasets.check", str(root)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and str(root) in done.stderr


def test_datasets_check_still_passes_a_good_dataset(tiny_root):
    done = subprocess.run([sys.executable, "-m", "datasets.check", str(tiny_root)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "all images decode" in done.stdout


# ------------------------------------------------------------------------------ old entry points

@pytest.mark.parametrize("module", ["trainables.labels", "trainables.pairs", "trainables.models"])
def test_old_module_paths_point_to_the_commands(module):
    done = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "python -m orchestrator.train reid|gan" in last and "python -m orchestrator.sweep" in last


# ------------------------------------------------------------------------------ --dry-run

def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def _never(*args, **kwargs):
    raise AssertionError("the dry run started Ray or opened MLflow")


def test_dry_run_lists_stages_and_trials_and_starts_nothing(tmp_path, tiny_root, capsys, monkeypatch):
    import ray

    from orchestrator import cluster, tracking

    for owner, name in ((ray, "init"), (cluster, "connect"), (tracking, "setup")):
        monkeypatch.setattr(owner, name, _never)
    argv = ["--preset", "smoke", "--set", f"cluster.storage_path={tmp_path}", "--set", "sweep.max_concurrent=2"]
    cfg = load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "sweep.max_concurrent=2"])
    from orchestrator.stages import plan_stages
    from orchestrator.sweep_plan import stage_needs
    from orchestrator.trials import build_trials

    paths = stage_cache.Paths(tmp_path)
    plan = plan_stages(cfg, paths, *stage_needs(build_trials(cfg)))
    node = plan.nodes[plan.dataset]  # the dataset stage cached the way a sweep caches it
    stage_cache.run_stage(paths, node.stage, node.key, node.kind, lambda folder: node.kind(str(tiny_root), "tiny"))
    before = _tree(tmp_path)

    assert sweep.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _tree(tmp_path) == before  # no MLflow store, no sweep folder, no stage output
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "cached" in lines["dataset"] and node.key in lines["dataset"]
    assert "to run" in lines["gan"] and "to run" in lines["baseline"]
    for t in build_trials(cfg):
        assert t.key in lines
    assert "baseline:" in lines["baseline-n0-paper-kall-s0"]  # a baseline trial waits for its seed's stage
    assert "generate:" in lines["lsro-n64-paper-kall-s0"] and "at most 2 at once" in out
    assert "(a new sweep)" in out and "1 cached, 6 to run" in out


def test_dry_run_refuses_what_the_sweep_refuses(tmp_path, capsys):
    assert sweep.main(["--preset", "smoke", "--set", f"cluster.storage_path={tmp_path}", "--set", "reid.epochs=1",
                       "--set", "labels.switch_at=1", "--dry-run"]) == 2
    assert "labels.switch_at=1 >= reid.epochs=1" in _error_line(capsys)
    assert json.dumps(_tree(tmp_path)) == "{}"
