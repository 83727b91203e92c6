"""The launch rehearsal (bench.launch_rehearsal) end to end: Ray's autoscaler (v2, as `ray up` starts it) with its
fake multi-node provider, a cluster file generated from clusters/gpu.yaml, the smoke sweep submitted with
`ray job submit` as the README says, a worker node killed mid-trial (a spot reclaim), teardown (~3-5 min)."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_gpu_yaml_launches_on_demand_survives_a_spot_reclaim_and_tears_down(tmp_path, capsys):
    import yaml

    from bench import fake_cluster, launch_rehearsal

    keep = tmp_path / "rehearsal"
    code = launch_rehearsal.main(["--keep", str(keep)])
    out = capsys.readouterr().out
    res = json.loads((keep / "summary.json").read_text())
    assert code == 0 and not res["problems"], (res["problems"], out[-6000:])
    assert "launch rehearsal: passed" in out

    # the cluster file kept gpu.yaml's node types and custom resources
    config = yaml.safe_load((keep / "fake_gpu.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(types) == {"head", "gpu_worker_spot", "gpu_worker"}
    assert types["head"]["resources"]["tune_driver"] == 1 and "GPU" not in types["head"]["resources"]
    for name in ("gpu_worker_spot", "gpu_worker"):
        assert types[name]["resources"]["GPU"] == 1 and types[name]["resources"]["mprl_worker"] == 1000
        assert types[name]["min_workers"] == 0

    # zero workers at rest; the autoscaler launched them only after the submission, of gpu.yaml's worker types
    assert res["workers_before_submit"] == 0
    assert len(res["workers"]) >= 2 and all(w["first_seen_s"] > res["submit_at_s"] for w in res["workers"])
    assert {w["node_type"] for w in res["workers"]} <= {"gpu_worker_spot", "gpu_worker"}
    assert any(e["action"] == "add" for e in res["scaling"])

    # the spot reclaim: a trial's node killed after its checkpoint; the retry resumed from it, elsewhere
    kill = res["kill"]
    assert kill is not None and kill["processes"] >= 2  # the raylet and what it ran
    assert res["resumed_after_epoch"] >= kill["checkpoint_epoch"] >= 0
    assert res["retry_first_epoch"] > kill["checkpoint_epoch"] and res["epoch0_logged"] == 1
    assert res["trial_nodes"][kill["trial"]] != kill["node_id"]
    assert any(w["node_id"] == kill["node_id"] and w["dead_at_s"] for w in res["workers"])

    # the job and every trial finished; nothing computed on the head; nothing of the cluster is left running
    assert res["job_status"] == "SUCCEEDED" and res["submit_rc"] == 0
    assert len(res["trials"]) == 3 and set(res["trials"].values()) == {"FINISHED"}
    assert res["stage_nodes"] and not res["on_head"]
    assert res["scaled_down_s"] is not None and res["leftover"] == []
    assert fake_cluster.cluster_processes(res["ray_tmp"]) == []
