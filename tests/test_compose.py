"""docker-compose.yml cannot drift from what is tested: its services run here as processes
(cachesvc_lab.compose: their command, environment and ports as written, host names and
published ports mapped to this host), and the demo service's main job must pass against
them. Where a compose implementation is installed, ``config`` validates the file too."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from cachesvc_client import CacheClient, Kind
from cachesvc_client.cluster import ClusterClient
from cachesvc_lab.compose import COMPOSE_FILE, Topology, load
from conftest import TINY, make_entry


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_is_a_valid_cluster_description():
    services = load()
    assert {"redis", "node1", "node2", "node3", "demo"} <= set(services)
    nodes = [services[f"node{i}"] for i in (1, 2, 3)]
    ports = [p for node in nodes for p in node.ports]
    assert len(ports) == len(set(ports)) == 6            # distinct ports: one host can run them all
    for node in nodes:
        args = node.command
        assert args[:2] == ["cachesvc", "serve"]
        assert args[args.index("--advertise-host") + 1] == node.name    # reachable by its service name
        assert args[args.index("--node-id") + 1] == node.name
        assert node.environment["CACHESVC_REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in node.depends_on
    assert services["demo"].environment["CACHESVC_DEMO_NODES"] == "3"
    command = compose_command()
    if command is None:
        pytest.skip("no compose implementation installed here (apt install docker-compose validates the file)")
    check = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_compose_topology_runs_as_processes_and_serves_the_demo(tmp_path):
    services = load()
    with Topology(services, tmp_path) as topology:
        for service in topology.order():
            if service.name != "demo":
                topology.start(service)
        redis_url = topology.translate(services["demo"], services["demo"].environment["CACHESVC_REDIS_URL"])
        seeds = [f"127.0.0.1:{topology.ports[services[n].ports[0]]}" for n in ("node1", "node2", "node3")]
        # the nodes found each other through Redis, each advertising what compose publishes
        with ClusterClient(seeds=seeds[:1]) as cluster:
            live = cluster.wait_ready(3, timeout_s=30)
            assert {n.grpc_address for n in live.values()} == set(seeds)
            assert all(set(n.transports) == {"tcp"} for n in live.values())   # --shm false, --ucx off
            reg = cluster.register_model("tiny", "abcdef01", TINY)
            rng = np.random.default_rng(0)
            hashes = cluster.hash_tokens(list(range(256 * 6)), reg.family_id)
            entries = [make_entry(rng, TINY, h, 256, position_offset=256 * i) for i, h in enumerate(hashes)]
            assert cluster.put(reg.family_id, "tiny", entries).replicas_written == 12
        with ClusterClient(redis_url=redis_url) as cluster:
            hit = cluster.lookup(reg.family_id, hashes).best("tiny")
            slabs = cluster.get(reg.family_id, hit, (Kind.K, Kind.V))
            assert slabs.valid_chunks == 6
            assert all(slabs.arrays[k][layer, 256 * i:256 * (i + 1)].tobytes() == e.slabs[(k, layer)].tobytes()
                       for i, e in enumerate(entries) for k in (Kind.K, Kind.V) for layer in range(4))
        # the demo service, as written, against them: the main job end to end
        demo = services["demo"]
        run = subprocess.run(topology.argv(demo), env=topology.env(demo), capture_output=True, text=True,
                             timeout=1200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "cachesvc cluster of 3 nodes (node1, node2, node3)" in run.stdout
        assert "reuse, plan [20,24)" in run.stdout and "(right;" in run.stdout
        stored = 0
        for seed in seeds:    # the demo's entries went through the cluster's nodes
            with CacheClient(seed) as one:
                stats = one.stats()
                assert stats["counters"]["cluster_members"] == 3
                stored += stats["entries"]
        assert stored > 2 * 6     # the demo's context (and our 6 chunks), twice each
