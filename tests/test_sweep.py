"""End-to-end sweeps on a local Ray instance (slow: minutes each)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasets.generated import GeneratedStore
from orchestrator import tracking
from orchestrator.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).parents[1]


def _smoke(tmp_path, *extra):
    return load_config("smoke", overrides=[f"cluster.storage_path={tmp_path}", "cluster.num_cpus=3", *extra])


def _runs(client, exp_id, kind):
    return client.search_runs([exp_id], f"tags.`{tracking.TAG_KIND}` = '{kind}'", max_results=1000)


def test_smoke_sweep_end_to_end_and_cache_reuse(tmp_path, local_ray):
    import mlflow.pytorch
    import torch

    from orchestrator.sweep import run_sweep

    out = run_sweep(_smoke(tmp_path))
    assert {r.spec.method for r in out.rows} == {"baseline", "lsro", "dmprl2"}
    assert all(r.error is None and 0 <= r.rank1 <= 1 for r in out.rows)
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    trials = _runs(client, exp_id, "trial")
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        assert t.data.tags[tracking.TAG_PARENT] == out.parent_run_id
        assert {"final_rank1", "final_mAP"} <= set(t.data.metrics)
        assert t.data.tags["mprl.gan_stage"].startswith("gan-")
    lsro = next(t for t in trials if t.data.params["labels.method"] == "lsro")
    history = client.get_metric_history(lsro.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1]  # one point per epoch
    model = mlflow.pytorch.load_model(lsro.data.tags["mprl.model_uri"])
    assert model(torch.zeros(1, 3, 64, 32)).shape[0] == 1
    assert t.data.tags[tracking.TAG_UNIT] == tracking.PERCENT and t.data.tags["mlflow.source.git.commit"]
    assert t.data.tags["mprl.group"].startswith(t.data.params["labels.method"])  # MLflow's group-by = the report's
    assert any(k.startswith("system/") for k in t.data.metrics)  # system metrics of the trial's node
    # one registered model per label method; no validation split here, so chosen on training loss, and said so
    registered = {m.name: m for m in client.search_registered_models()}
    assert set(registered) == {f"mprl-mprl-{m}" for m in ("baseline", "lsro", "dmprl2")}
    version = client.get_model_version("mprl-mprl-lsro", "1")
    assert version.run_id == lsro.info.run_id and "no validation split" in version.tags["mprl.selected_by"]

    # a second sweep over another label method reuses the GAN, the generated images and the baseline
    second = run_sweep(_smoke(tmp_path, "sweep.methods=[smprl]"))
    assert second.rows[0].error is None and second.stages.gan.cached and second.stages.baselines[0].cached
    stages = _runs(client, exp_id, "stage")
    built = [s for s in stages if s.data.tags["mprl.cached"] == "false"]
    assert sorted(s.info.run_name for s in built) == ["stage:baseline", "stage:dataset", "stage:decode",
                                                      "stage:decode_gen", "stage:gan", "stage:generate",
                                                      "stage:pool_quality", "stage:smprl"]
    assert sum(s.info.run_name == "stage:gan" for s in stages) == 2  # logged by both sweeps, trained once
    # the driver only orchestrates: every built stage and every trial ran in another process (a Ray worker)
    places = [s.data.tags["mprl.where"] for s in built] + [t.data.tags["mprl.where"] for t in trials]
    assert all(p.rsplit(" pid ", 1)[1] != str(os.getpid()) for p in places), places
    assert out.driver_cpu_seconds < sum(s.seconds for s in out.stages.all()) + sum(r.seconds for r in out.rows)


def _sweep_cmd(tmp_path, *extra):
    return [sys.executable, "-m", "orchestrator.sweep", "--preset", "smoke",
            "--set", f"cluster.storage_path={tmp_path}", "--set", "cluster.num_cpus=3",
            "--set", "sweep.max_concurrent=1", "--set", "reid.epochs=3", *extra]


def test_interrupted_sweep_resumes_without_rerunning(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tracking.setup(tracking.default_tracking_uri(tmp_path), "mprl", tmp_path)  # no migration race with polling
    proc = subprocess.Popen(_sweep_cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    uri = tracking.default_tracking_uri(tmp_path)
    deadline = time.time() + 600
    finished = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        client, exp_id = tracking.setup(uri, "mprl", tmp_path)
        finished = [t for t in _runs(client, exp_id, "trial") if t.info.status == "FINISHED"]
        if finished:
            break
    assert finished, "no trial finished before the deadline"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    client, exp_id = tracking.setup(uri, "mprl", tmp_path)
    trials = {t.info.run_name: t for t in _runs(client, exp_id, "trial")}
    assert not [t for t in trials.values() if t.info.status in ("RUNNING", "SCHEDULED")]
    done_before = {k: t.info.end_time for k, t in trials.items() if t.info.status == "FINISHED"}
    assert done_before

    res = subprocess.run(_sweep_cmd(tmp_path, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = _runs(client, exp_id, "trial")
    assert len(after) == len(trials) == 3  # no duplicated MLflow runs
    assert all(t.info.status == "FINISHED" for t in after)
    for t in after:
        if t.info.run_name in done_before:
            assert t.info.end_time == done_before[t.info.run_name]  # not rerun
    assert len(_runs(client, exp_id, "sweep")) == 1


def test_every_seed_trains_its_own_baseline_and_smprl_labels(tmp_path, local_ray):
    """Two seeds: two baseline stages (different models and numbers), each seed's sMpRL labels from its own."""
    from orchestrator.sweep import run_sweep

    out = run_sweep(_smoke(tmp_path, "sweep.methods=[baseline, smprl]", "sweep.seeds=[0, 1]", "reid.epochs=1",
                           "gan.epochs=1"), log_models=False)
    assert sorted(out.stages.baselines) == [0, 1] and sorted(out.stages.smprl) == [0, 1]
    assert out.stages.baselines[0].key != out.stages.baselines[1].key
    assert out.stages.smprl[0].out.labels != out.stages.smprl[1].out.labels
    base = {r.spec.seed: r for r in out.rows if r.spec.method == "baseline"}
    assert base[0].error is None and base[1].error is None
    for seed in (0, 1):  # each seed's baseline trial reports its seed's baseline stage
        stage = out.stages.baselines[seed].out.result
        assert (base[seed].rank1, base[seed].mAP) == (stage.rank1, stage.mAP)
    assert base[0].mAP != base[1].mAP  # seed 1 is not seed 0's numbers again
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path)
    smprl = {int(t.data.params["reid.seed"]): t for t in _runs(client, exp_id, "trial")
             if t.data.params["labels.method"] == "smprl"}
    for seed in (0, 1):
        assert smprl[seed].data.tags["mprl.baseline_stage"] == f"baseline-{out.stages.baselines[seed].key}"

    single = run_sweep(_smoke(tmp_path, "sweep.methods=[smprl]", "sweep.seeds=[0, 1]", "reid.epochs=1",
                              "gan.epochs=1", "sweep.single_baseline=true"), log_models=False)
    assert sorted(single.stages.baselines) == [0]  # the paper's protocol: seed 0's baseline labels every seed
    assert single.stages.smprl[0].key == single.stages.smprl[1].key


def _learned(client, run_id) -> bool:
    """A trial's per-epoch loss is finite and falls from its first to its last epoch."""
    loss = [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    return len(loss) >= 2 and all(v == v and abs(v) < 1e6 for v in loss) and loss[-1] < loss[0]


def test_two_stream_and_every_other_method_run_and_learn(tmp_path, local_ray):
    """The documented options a smoke sweep has not covered yet: the two-stream model with LSRO and dMpRL-II, and
    the identification net with All-in-one, one-hot pseudo, the compute-matched baseline, the code's rank order
    and MpRL truncation (keep) drawn by random search. Every trial finishes and its loss falls."""
    from orchestrator.sweep import run_sweep

    two = run_sweep(_smoke(tmp_path, "reid.model=twostream", "reid.epochs=3", "gan.epochs=1"), log_models=False)
    assert [r.error for r in two.rows] == [None] * 3 and all(0 <= r.rank1 <= 1 for r in two.rows)
    other = run_sweep(_smoke(tmp_path, "reid.epochs=3", "gan.epochs=1",
                             "sweep.methods=[allinone, pseudo, dmprl1, baseline_matched]",
                             "sweep.orders=[paper, reference_code]", "sweep.keeps=[null, 3]",
                             "sweep.search=random", "sweep.num_samples=4"), log_models=False)
    assert len(other.rows) == 4 and all(r.error is None for r in other.rows)
    client, exp_id = tracking.setup(two.tracking_uri, "mprl", tmp_path)
    trials = _runs(client, exp_id, "trial")
    assert len(trials) == 7 and all(_learned(client, t.info.run_id) for t in trials
                                    if t.data.params["labels.method"] != "baseline")


def test_reference_rendering_rates_and_the_learning_rate_ablation_run_and_learn(tmp_path, local_ray):
    """The paper presets' reference options at smoke scale: the 6621e2c generator with two G steps, the pool rendered
    with batch statistics and per-image stretching, the authors' per-parameter learning rates, and the other scheme
    as the ablation (its own baseline). Every trial finishes and learns; the pool's quality is in MLflow and in the
    printed statistics."""
    from orchestrator.report import sweep_statistics
    from orchestrator.sweep import run_sweep

    # labels.switch_at=0: dMpRL-II's loss is the same sum in every epoch (a switch in the middle of 3 epochs adds the
    # generated images' term, and the slower reference-code rates do not make up for it within an epoch)
    out = run_sweep(_smoke(tmp_path, "reid.epochs=3", "gan.epochs=1", "gan.arch=lsro", "gan.g_steps=2",
                           "labels.switch_at=0", "gan.sample_bn=batch", "gan.save_stretch=true",
                           "reid.lr_scheme=reference_code", "sweep.lr_schemes=[paper]"), log_models=False)
    assert len(out.rows) == 6 and all(r.error is None for r in out.rows)  # 3 methods x 2 schemes
    assert {r.spec.lr_scheme for r in out.rows} == {None, "paper"}
    store = GeneratedStore(out.stages.generate.out.store)
    assert store.info["meta"]["bn"] == "batch" and store.info["meta"]["stretch"] is True
    pool = out.stages.pool_quality
    assert pool is not None and Path(pool.out.sheet).is_file() and pool.out.gen_n == 64
    client, exp_id = tracking.setup(out.tracking_uri, "mprl", tmp_path)
    trials = _runs(client, exp_id, "trial")
    assert len(trials) == 6 and all(_learned(client, t.info.run_id) for t in trials
                                    if not (t.data.params["labels.method"] == "baseline"
                                            and t.data.params["reid.lr_scheme"] == "reference_code"))
    stage = next(r for r in _runs(client, exp_id, "stage") if r.data.tags["mprl.key"].startswith("pool_quality:"))
    assert stage.data.metrics["fd"] == pytest.approx(pool.out.fd)
    assert [a.path for a in client.list_artifacts(stage.info.run_id, "samples")] == ["samples/pool_sheet.png"]
    text = sweep_statistics(out.tracking_uri, "mprl", tmp_path, out.parent_run_id)
    assert "learning rates reference_code" in text and "learning rates paper" in text
    assert "generated pool (BatchNorm batch statistics over 32, per-image min-max byte map)" in text
