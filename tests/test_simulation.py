"""Simulation (simulate.py, fedrest.simulation): the clients' parts and hosts, and real runs of 50 virtual clients
over 2 processes of the pool and over a local Ray cluster, read back from the coordinator's run database."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrest.partition import partition_indices
from fedrest.simulation.plan import client_name, client_parts, default_hosts, host_clients
from fedrest.tasks.data import TensorData
from fedrest.tasks.node_data import hold_out, hold_out_positions

ROOT = Path(__file__).resolve().parent.parent


def test_client_names_sort_as_their_numbers():
    names = [client_name(k, 12_000) for k in range(12_000)]
    assert names[7] == "client-00007" and client_name(7, 50) == "client-0007"
    assert sorted(names) == names and len(set(names)) == 12_000


def test_hosts_share_the_clients_without_overlap():
    served = [list(host_clients(h, 3, 50)) for h in range(3)]
    assert sorted(k for part in served for k in part) == list(range(50))
    assert served[1][:3] == [1, 4, 7]
    assert default_hosts(50, 2) == 2 and default_hosts(1, 16) == 1
    with pytest.raises(ValueError):
        host_clients(3, 3, 50)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_a_clients_part_is_the_part_a_worker_keeps(scheme):
    """client_parts computes the split once for a host's clients; each part equals what a worker with
    --partition-id k --num-partitions N keeps, and the held-out share equals the worker's hold_out."""
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    parts = client_parts(labels, 3000, 40, range(1, 40, 2), scheme, 0.3, seed=5)
    assert sorted(parts) == list(range(1, 40, 2))
    for k, part in parts.items():
        assert part.train.dtype == np.int32 and part.held_out is None
        assert np.array_equal(part.train, partition_indices(labels, 40, k, scheme, 0.3, 5))
    held = client_parts(labels, 3000, 40, [3], scheme, 0.3, 5, eval_fraction=0.2, hold_out=hold_out_positions)[3]
    indices = partition_indices(labels, 40, 3, scheme, 0.3, 5)
    data = TensorData(torch.from_numpy(indices).float().unsqueeze(1), torch.from_numpy(labels[indices]))
    rest, out = hold_out(data, 0.2, "5/3")  # a worker's key: f"{seed}/{partition_id}"
    assert np.array_equal(held.train, rest.x[:, 0].long().numpy())
    assert np.array_equal(held.held_out, out.x[:, 0].long().numpy())


def test_a_dirichlet_split_without_labels_is_refused():
    with pytest.raises(ValueError, match="class labels"):
        client_parts(None, 100, 4, range(4), "dirichlet", 0.5, 0)


# ----------------------------------------------------------------------------- real runs


def _simulate(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "simulate.py"), "--clients", "50", "--processes", "2",
                           "--rounds", "2", "--client-fraction", "0.2", "--cpu", "--data-dir", str(ROOT / "data"),
                           *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _run_database(workdir: Path) -> tuple[dict, list]:
    db = sqlite3.connect(workdir / "temp" / "simulation" / "coordinator.sqlite3")
    nodes = {json.loads(r[0])["name"]: json.loads(r[0]) for r in db.execute("SELECT record FROM nodes")}
    history = [json.loads(r[0]) for r in db.execute("SELECT record FROM history ORDER BY round")]
    db.close()
    return nodes, history


def _mnist_train_labels() -> np.ndarray:
    from config import Config
    from fedrest.tasks import load_task
    from fedrest.tasks.node_data import context

    cfg = Config(data_dir=str(ROOT / "data"))
    return load_task(cfg).load_data(context(cfg, "worker"), "train").labels().numpy()


@pytest.mark.e2e
def test_fifty_virtual_clients_on_two_processes_and_on_ray_train_the_same_model(tmp_path, monkeypatch):
    """50 virtual clients, Dirichlet(0.5) split, C=0.2: each registered with its own name and its part's size, 10
    sampled a round, every round's samples the sum of its clients' parts; the same seeded run on a local Ray
    cluster gives the same accuracies."""
    pool_dir, ray_dir = tmp_path / "pool", tmp_path / "ray"
    pool_dir.mkdir(), ray_dir.mkdir()
    pool = _simulate(pool_dir, "--partition", "dirichlet", "--alpha", "0.5", "--tensorboard-dir", "tb",
                     "--mlflow-uri", "mlruns")
    assert "50/50 virtual clients registered" in pool.stdout
    assert "on 2 processes" in pool.stdout
    nodes, history = _run_database(pool_dir)
    labels = _mnist_train_labels()
    sizes = {client_name(k, 50): len(partition_indices(labels, 50, k, "dirichlet", 0.5, 0)) for k in range(50)}
    assert {name: node["num_samples"] for name, node in nodes.items()} == sizes
    assert len(set(sizes.values())) > 5  # a skewed split: parts of many sizes
    by_id = {node["node_id"]: name for name, node in nodes.items()}
    assert [h["round"] for h in history] == [1, 2]
    for record in history:
        assert record["num_updates"] == 10 and len(record["node_ids"]) == 10
        assert record["num_samples"] == sum(sizes[by_id[i]] for i in record["node_ids"])
    assert {by_id[i] for i in history[0]["node_ids"]} != {by_id[i] for i in history[1]["node_ids"]}
    hosts = [(pool_dir / "logs" / "simulation" / f"simulation_host{h}.log").read_text() for h in range(2)]
    assert all("25 virtual clients of 50" in text for text in hosts)
    assert sum(text.count("update sent") for text in hosts) == 20

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    _check_tracking(pool_dir, history)

    ray = _simulate(ray_dir, "--partition", "dirichlet", "--alpha", "0.5", "--backend", "ray", timeout=400)
    accuracies = [re.search(r"accuracy per round:\s+(.*)", p.stdout).group(1) for p in (pool, ray)]
    assert accuracies[0] == accuracies[1], accuracies
    ray_nodes, ray_history = _run_database(ray_dir)
    ray_by_id = {node["node_id"]: name for name, node in ray_nodes.items()}
    assert [sorted(ray_by_id[i] for i in h["node_ids"]) for h in ray_history] == \
        [sorted(by_id[i] for i in h["node_ids"]) for h in history]  # the same clients sampled, other ids
    assert (ray_dir / "logs" / "simulation" / "simulation_host1.log").exists()


def _check_tracking(workdir: Path, history: list) -> None:
    """The coordinator that simulate.py started wrote each round's test accuracy to TensorBoard and MLflow."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = [(h["round"], pytest.approx(h["test_accuracy"])) for h in history]
    events = EventAccumulator(str(workdir / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("test/accuracy")] == expected
    mlflow = MlflowClient(tracking_uri=(workdir / "mlruns").absolute().as_uri())
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("fedrest").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = mlflow.get_metric_history(runs[0].info.run_id, "test/accuracy")
    assert sorted((m.step, m.value) for m in logged) == expected


@pytest.mark.e2e
def test_a_finished_simulation_of_150_clients_is_summarised_and_drawn(tmp_path):
    """simulate.py --keep-serving: after the summary its coordinator serves the finished run; /status of 150 nodes
    (more than STATUS_NODES) counts them and lists the featured ones; monitor.py --once --save draws it, the text
    monitor summarises it; Ctrl-C ends it with status 0."""
    from fedrest.client import CoordinatorClient
    from fedrest.server.status import STATUS_NODES

    proc = subprocess.Popen([sys.executable, str(ROOT / "simulate.py"), "--clients", "150", "--processes", "2",
                             "--rounds", "1", "--client-fraction", "0.1", "--cpu", "--data-dir", str(ROOT / "data"),
                             "--keep-serving"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group: stopped with its children
    try:
        lines = []
        while not any("serves the finished run" in line for line in lines[-3:]):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        address, token = re.search(r"--coordinator-address (\S+) --token=(\S+) --once", proc.stdout.readline()).groups()
        status = CoordinatorClient(address, token=token).status()
        assert 150 > STATUS_NODES and status["nodes_listed"] == "featured"
        assert status["node_counts"]["total"] == 150 and status["state"] == "finished"
        assert len(status["nodes"]) <= STATUS_NODES and status["history"][0]["num_updates"] == 15
        monitor = subprocess.run([sys.executable, str(ROOT / "monitor.py"), "--coordinator-address", address,
                                  f"--token={token}", "--once", "--save", "run.png"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)
        assert monitor.returncode == 0, monitor.stdout + monitor.stderr
        assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        text = subprocess.run([sys.executable, str(ROOT / "text_monitor.py"), "--coordinator-address", address,
                               f"--token={token}", "--once"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert text.returncode == 0 and "150" in text.stdout, text.stdout + text.stderr
    finally:
        proc.send_signal(subprocess.signal.SIGINT)
        try:
            status = proc.wait(30)
        except subprocess.TimeoutExpired:
            status = None
        if proc.poll() is None or status != 0:  # never leave its coordinator or hosts behind
            try:
                os.killpg(proc.pid, subprocess.signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        proc.stdout.close()
    assert status == 0


@pytest.mark.e2e
def test_a_ray_cluster_too_small_for_the_hosts_is_refused_before_the_run(tmp_path):
    cores = os.cpu_count() or 1
    proc = subprocess.run([sys.executable, str(ROOT / "simulate.py"), "--clients", "50", "--processes",
                           str(cores + 1), "--backend", "ray", "--cpu", "--data-dir", str(ROOT / "data")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: the Ray cluster has {cores} CPUs: room for {cores} hosts" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_an_unreachable_ray_head_and_an_unusable_folder_are_one_line_each(tmp_path):
    """No Ray head at --ray-address: refused in seconds (Ray itself retries for minutes); --logs-dir under a file:
    an error line, not a traceback; nothing left running."""
    (tmp_path / "afile").write_text("not a folder")
    for args, expected in ((["--backend", "ray", "--ray-address", "127.0.0.1:1"],
                            "error: cannot connect to the Ray cluster at 127.0.0.1:1"),
                           (["--logs-dir", "afile/logs"], "error: cannot use --logs-dir afile/logs")):
        proc = subprocess.run([sys.executable, str(ROOT / "simulate.py"), "--clients", "4", "--rounds", "1", "--cpu",
                               "--data-dir", str(ROOT / "data"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1 and expected in proc.stdout, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
