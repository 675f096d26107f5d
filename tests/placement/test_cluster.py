"""Placement on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: two nodes of 6 CPUs and
4 ``fake_gpu`` each, all on 127.0.0.1), asserting on which node every actor lands.

The cluster lives in a subprocess (tests/placement/_cluster_probe.py): this pytest process keeps the
session's single-node cluster, and a process joins one Ray cluster only. The probe runs every
scenario once and writes JSON; the tests below read their part of it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe(tiny_random_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("placement_probe") / "probe.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "tests.placement._cluster_probe", tiny_random_model, str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        # Ray gives a starting raylet a fixed 30 s to register; on an overloaded machine try again
        if out.exists() or "timed out during startup" not in proc.stderr:
            break
    assert out.exists(), f"probe wrote nothing (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert "error" not in data, data["error"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data


def test_simulated_nodes_bind_loopback(probe):
    assert probe["node_ips"] == ["127.0.0.1"]
    assert len(set(probe["nodes"])) == 2


def test_disaggregated_roles_land_on_their_bundles(probe):
    d = probe["disaggregated"]
    nodes = set(probe["nodes"])
    for role, landed in d["roles"].items():
        for i, node in enumerate(landed):
            group, bundle = d["slots"][role][i]
            assert node == d["bundles"][group][bundle], (role, i)
    rollout, learner = d["roles"]["rollout"], d["roles"]["learner"]
    # tensor-parallel engines of 2 fake_gpu each, STRICT_SPREAD: one on each node
    assert set(rollout) == nodes and len(rollout) == 2
    # 4 ranks of 1 fake_gpu: the 2 left on each node -> two ranks per node
    assert Counter(learner) == Counter({n: 2 for n in nodes})
    # every fake_gpu handed out once (4 per node)
    used = Counter()
    for node in rollout:
        used[node] += 2
    for node in learner:
        used[node] += 1
    assert used == Counter({n: 4 for n in nodes})
    annot = d["roles"]["annotator"]
    assert len(set(annot)) == 2  # STRICT_SPREAD


def test_a_plan_that_cannot_fit_fails_before_reserving(probe):
    m = probe["misfit"]
    assert m["error"] is not None
    assert "bundle 0 of the rollout group needs {CPU: 1, fake_gpu: 8}" in m["error"]
    assert "Fix:" in m["error"]
    assert m["groups_created"] == 0 and m["seconds"] < 10


def test_colocated_real_pool_and_learners_share_bundles_across_two_nodes(probe):
    c = probe["colocated"]
    shared = c["bundles"]["shared"]
    assert set(shared) == set(probe["nodes"])  # STRICT_SPREAD over the two nodes
    assert c["engines"] == shared  # engine e on bundle e ...
    assert c["ranks"] == shared    # ... with learner rank e
    assert c["rank_devices"] == ["cpu", "cpu"]  # a simulated accelerator gives no device
    assert c["loss_finite"]


def test_colocation_protocol_order(probe):
    c = probe["colocated"]
    s = c["stamps"]
    # driver sequence: start-up offload, then sleep -> reload -> [train] -> offload -> wake
    assert c["events"] == ["offload", "sleep", "reload", "offload", "wake"]
    for log in c["engine_logs"]:  # every engine: sleeps after generating, wakes after training
        assert [e for e, _ in log] == ["sleep", "wake"]
        assert s["generate_end"] <= log[0][1] <= s["train_start"]
        assert log[1][1] >= s["train_end"]
    for log in c["rank_logs"]:  # every rank: offloaded while generating, resident while training
        assert [e for e, _ in log] == ["offload", "reload", "offload"]
        assert log[0][1] <= s["generate_start"]
        assert s["generate_end"] <= log[1][1] <= s["train_start"]
        assert log[2][1] >= s["train_end"]
    sleeps = [log[0][1] for log in c["engine_logs"]]
    reloads = [log[1][1] for log in c["rank_logs"]]
    assert max(sleeps) <= min(reloads)  # the learners reload only once every engine is asleep
