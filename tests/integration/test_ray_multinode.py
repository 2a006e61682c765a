"""The worker group on a Ray cluster of several nodes (raylets on one machine): placement, gloo across nodes.

Runs as a script in a fresh process (the test starts it): Ray's per-process state from other
modules' local instances must not leak into the cluster this scenario builds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from colocate.ray import WorkerGroup
    from tests.integration.test_ray_ppo import CONFIG, run_iteration

    # A head that offers no CPU and two worker nodes of one CPU each: two bundles must land on two nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    group = WorkerGroup(CONFIG, num_workers=2, num_gpus_per_worker=0, cpus_per_worker=1)
    try:
        placed = ray.util.placement_group_table(group.placement_group)["bundles_to_node_id"]
        assert sorted(placed.values()) == sorted(n.node_id for n in nodes), placed  # one worker per node
        before = group.run("weights_checksum")
        phases = run_iteration(group, 0)
        assert all(r["reward_mean"] > 0 for r in phases["generate"])  # both shards carry a gradient
        after = group.run("weights_checksum")
        # Gradients were averaged through the gloo group that met at worker 0's node: the weights moved together.
        assert after[0] == after[1] and after != before, (before, after)
        assert phases["prepare"][1]["logprob_gap_max_abs"] < 1e-3
        print("multinode ok:", placed)
    finally:
        group.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(300)
def test_two_workers_on_two_nodes_train_in_step() -> None:
    pytest.importorskip("ray")
    # Token auth stays off for this throwaway cluster, as Ray's warning suggests for local ones.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": pythonpath}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0 and "multinode ok" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


if __name__ == "__main__":
    main()
