"""The benchmarks run at a tiny size and print their tables (bench.train, bench.data, bench.sweep)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

TINY_TRAIN = ["--backbone", "resnet18", "--size", "32", "16", "--batch", "8", "--steps", "2", "--warmup", "1",
              "--repeats", "2", "--gan-size", "32", "16", "--gan-width", "8", "--gan-batch", "8"]


# ------------------------------------------------------------------------------------------ helpers

def test_format_table_and_cycle_batches():
    from bench.common import cycle_batches, format_table

    table = format_table(("name", "img/s"), [["plain", 1234.5], ["ours", 0.5], ["x", None]])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "img/s"] and set(lines[1]) == {"-"}
    assert lines[2].endswith("1234") and lines[3].endswith("0.500") and lines[4].endswith("-")
    batches = [cycle_batches(5, 4, 3, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert all(len(b) == 3 and all(len(x) == 2 for x in b) for b in batches)
    union = sorted(i for s in range(3) for r in (0, 1) for i in batches[r][s])
    assert union == sorted(cycle_batches(5, 4, 3, seed=0)[0] + cycle_batches(5, 4, 3, seed=0)[1]
                           + cycle_batches(5, 4, 3, seed=0)[2])
    with pytest.raises(ValueError, match="divisible"):
        cycle_batches(5, 3, 1, seed=0, world_size=2)


# ------------------------------------------------------------------------------------------ bench.train

def _rows(out: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 8 and cells[0] in ("reid", "gan"):
            rows[(cells[0], " ".join(cells[1:-6]))] = cells[-6:]
    return rows


def test_train_bench_synthetic_prints_both_loops(capsys):
    from bench.train import main

    assert main([*TINY_TRAIN, "--method", "lsro"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {("reid", "plain"), ("reid", "ours in-process"), ("gan", "plain"), ("gan", "ours in-process")}
    assert all(float(r[1]) > 0 for r in rows.values())  # img/s
    assert "ours/plain in-process, reid:" in out and "ours/plain in-process, gan:" in out
    assert "reproduce: python -m bench.train --backbone resnet18" in out


def test_train_bench_decoded_images(capsys, tiny_root):
    from bench.train import main

    assert main([*TINY_TRAIN, "--what", "reid", "--data", "images", "--root", str(tiny_root)]) == 0
    out = capsys.readouterr().out
    assert set(_rows(out)) == {("reid", "plain"), ("reid", "ours in-process")}
    assert f"data images ({tiny_root}, 0 loader workers)" in out


def test_train_bench_rejects_bad_options():
    from bench.train import main

    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    with pytest.raises(SystemExit):
        main(["--ray", "--batch", "7"])


@pytest.mark.slow
@pytest.mark.ray
def test_train_bench_on_ray_worker_groups(capsys):
    import ray

    from bench.train import main

    try:
        assert main([*TINY_TRAIN, "--what", "reid", "--ray"]) == 0
    finally:
        ray.shutdown()
    rows = _rows(capsys.readouterr().out)
    assert rows[("reid", "ours ray 1w")][0] == "1x1" and rows[("reid", "ours ray 2w")][0] == "2x1"


# ------------------------------------------------------------------------------------------ decoded cache

def test_data_bench_prints_pipeline_table(capsys, tiny_root):
    from bench.data import main

    args = ["--root", str(tiny_root), "--size", "32", "16", "--batch", "8", "--batches", "2", "--repeats", "1",
            "--workers", "0", "--train-rate", "100"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "JPEG decode+augment" in out and "decoded cache+augment" in out and "per_core" in out
    assert "its rows equal to the JPEGs decoded anew: yes" in out
    assert "train step: 100.0 img/s (given (--train-rate))" in out and "reproduce: python -m bench.data" in out


# ------------------------------------------------------------------------------------------ bench.sweep

def _run(name: str, end_s: float, cached: str | None = None, kind: str = "trial", **tags) -> SimpleNamespace:
    tags = {"mprl.kind": kind, **({"mprl.cached": cached} if cached else {}), **tags}
    return SimpleNamespace(info=SimpleNamespace(run_name=name, end_time=int(end_s * 1000), status="FINISHED"),
                           data=SimpleNamespace(tags=tags))


def test_sweep_bench_splits_trial_time(tmp_path):
    from bench.sweep import phase_rows, trainings, trial_rows, tune_results

    trial = "lsro-n64-paper-kall-s0"  # the search space holds the trial key
    folder = tmp_path / "lsro-n64-paper-kall-s0"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"trial": trial}))
    lines = [{"training_iteration": 1, "epoch_time_s": 2.0, "time_total_s": 5.0},
             {"training_iteration": 2, "epoch_time_s": 3.0, "time_total_s": 9.0},
             {"training_iteration": 2, "epoch_time_s": 3.0, "time_total_s": 9.0, "done": True}]  # duplicate
    (folder / "result.json").write_text("\n".join(map(json.dumps, lines)) + "\n")
    tune = tune_results(tmp_path)
    key = "lsro-n64-paper-kall-s0"
    assert tune == {key: {"train_s": 5.0, "epochs": 2, "in_tune_s": 9.0}}

    trials = [_run(key, 130.0), _run("baseline-n0-paper-kall-s0", 104.0, **{"mprl.reused_stage": "/x"})]
    rows = trial_rows(trials, tune, phase_start=100.0, concurrent=1)
    assert rows[0][0].startswith("baseline") and rows[0][5] == pytest.approx(4.0) and rows[0][7]
    # epochs, train, loop_other = 9 - 5, outside = 26 - 9, wall = 130 - 104, overhead = 26 - 5
    assert rows[1][1:7] == [2, 5.0, 4.0, pytest.approx(17.0), pytest.approx(26.0), pytest.approx(21.0)]
    assert trial_rows(trials, tune, 100.0, concurrent=2)[1][5] == pytest.approx(30.0)  # amortised slot

    stages = [_run("stage:gan", 60.0, "false", "stage"), _run("stage:baseline", 90.0, "false", "stage"),
              _run("stage:gan", 95.0, "true", "stage")]
    assert trainings(stages, "stage:gan") == 1 and trainings(stages, "stage:baseline") == 1
    phases = phase_rows(50.0, 3.0, stages, trials, 140.0, {"gan": 20.0})
    assert [p[1] for p in phases] == [3.0, pytest.approx(45.0), pytest.approx(35.0), pytest.approx(10.0),
                                      pytest.approx(93.0)]


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_bench_end_to_end(capsys):
    from bench.sweep import main

    assert main(["--trials", "baseline,lsro", "--set", "reid.epochs=1", "--set", "gan.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "GAN 1 (expected 1), baseline 1 (expected 1)" in out and "lsro-n64" in out


# ------------------------------------------------------------------------------------------ bench.recipe_check

def test_recipe_check_compares_variants_on_validation_with_holm():
    from bench.recipe_check import compare

    ref = {0: {"val_rank1": 70.0, "val_mAP": 60.0}, 1: {"val_rank1": 72.0, "val_mAP": 61.0},
           2: {"val_rank1": 71.0, "val_mAP": 62.0}}
    up = {s: {k: v + 5 + 0.1 * s for k, v in r.items()} for s, r in ref.items()}  # clearly better
    noise = {s: {k: v + (1 if s != 1 else -1) for k, v in r.items()} for s, r in ref.items()}
    rows = compare({"preset": ref, "better": up, "noise": noise}, "preset")
    assert [r[0] for r in rows] == ["preset", "better", "noise"] and rows[0][-1] == "(reference)"
    assert rows[1][-1] == "better" and "Holm" in rows[1][4]
    assert rows[2][-1] == "no detectable difference at n=3"


@pytest.mark.slow
@pytest.mark.ray
def test_recipe_check_end_to_end_reads_validation_only(tmp_path, capsys):
    from bench.recipe_check import main

    assert main(["--preset", "smoke", "--seeds", "0", "1", "--val-ids", "2", "--storage", str(tmp_path),
                 "--variant", "one epoch", "reid.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "smoke preset" in out and "one epoch" in out and "the test split is not read" in out
    table = out.split("Holm over 1 variants:")[1]
    assert "val rank-1" in table and "test" not in table.split("\n\n")[1]
