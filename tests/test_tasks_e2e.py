"""End to end with the task API: real coordinator and worker processes on 127.0.0.1 train the README's own task
file (tabular, scikit-learn's breast-cancer data), a task with its own training step and metric, and the
image-folder task on real images written as PNG folders; workers whose task or class folders differ are refused at
registration, exit 1 with one line and no traceback, and no round waits for them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrest.server.checkpoints import load_checkpoint
from processes import ROOT, free_port, procs, status_client, try_status, wait_for  # noqa: F401 - procs: a fixture

pytestmark = pytest.mark.e2e

TASKS = Path(__file__).parent / "tasks"


def readme_task() -> str:
    """The Python block of the README's "Write your own task" section."""
    section = (ROOT / "README.md").read_text().split("## Write your own task", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_to_the_end(procs, port: int, timeout: float = 300) -> dict:
    client = status_client(port)

    def finished():
        status = try_status(client)
        return status if status and status["state"] == "finished" else None

    status = wait_for(finished, timeout, "the run to finish", procs)
    for name in [n for n in procs.procs if n != "coordinator"]:
        assert procs.procs[name].wait(60) == 0, procs.output(name)
    return status


def test_the_readme_task_file_trains_a_tabular_mlp_and_reports_its_metrics(procs, tmp_path):
    assert readme_task() == (ROOT / "examples" / "breast_cancer.py").read_text()  # the README shows the example
    task = tmp_path / "my_task.py"
    task.write_text(readme_task())
    port = free_port()
    procs.coordinator(port, "--task", str(task), "--rounds", "3", "--min-nodes", "2", "--local-epochs", "2",
                      "--batch-size", "16", "--learning-rate", "0.05")
    for i in range(2):
        procs.worker(f"w{i}", port, "--task", str(task), "--partition-id", str(i), "--num-partitions", "2")
    status = run_to_the_end(procs, port)
    assert status["task"] == "breast-cancer-mlp" and status["model"] == "Sequential"
    last = status["history"][-1]
    assert set(last["test_metrics"]) == {"loss", "accuracy", "f1", "auc"}
    assert last["test_accuracy"] == last["test_metrics"]["accuracy"] > 0.9, status["history"]
    assert all(r["num_samples"] == 455 for r in status["history"])  # 569 - 114 held out, split over 2
    shown = subprocess.run([sys.executable, str(ROOT / "text_monitor.py"), "--coordinator-address",
                            f"127.0.0.1:{port}", "--token", "e2e-monitor-token-0123", "--once"],
                           capture_output=True, text=True, timeout=60, env={"COLUMNS": "120", "PATH": ""})
    assert shown.returncode == 0 and re.search(r"round\s+accuracy\s+loss\s+auc\s+f1", shown.stdout), shown.stdout
    metrics = status_client(port).session.get(f"http://127.0.0.1:{port}/metrics", timeout=10,
                                              headers={"Authorization": "Bearer e2e-monitor-token-0123"}).text
    assert 'fl_test_metric{name="auc"}' in metrics
    checkpoint = load_checkpoint(tmp_path / "models" / "global_model.pt")
    assert checkpoint["task"] == "breast-cancer-mlp" and checkpoint["test_metrics"] == last["test_metrics"]
    sys.path.insert(0, str(tmp_path))
    try:  # the README's way to use the model: the user's own build_model()
        import my_task

        model = my_task.build_model()
        model.load_state_dict(checkpoint["state_dict"])
        x, y = my_task.load_test_data(None)
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
        assert accuracy == pytest.approx(last["test_accuracy"], abs=1e-6)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_task", None)


def test_a_task_file_with_only_a_model_and_data_trains_with_the_built_in_loops(procs):
    port = free_port()
    task = str(TASKS / "only_model_and_data.py")
    procs.coordinator(port, "--task", task, "--rounds", "3", "--min-nodes", "2", "--batch-size", "8")
    for i in range(2):
        procs.worker(f"w{i}", port, "--task", task, "--partition-id", str(i), "--num-partitions", "2")
    status = run_to_the_end(procs, port)
    assert [set(r["test_metrics"]) for r in status["history"]] == [{"loss", "accuracy"}] * 3
    assert status["history"][-1]["test_accuracy"] >= 0.9 and status["history"][-1]["num_samples"] == 138
    assert status["model"] == "Sequential" and status["task"] == "only_model_and_data"


def test_a_task_with_its_own_training_step_and_metric(procs):
    port = free_port()
    task = str(TASKS / "digits_own_train.py")
    procs.coordinator(port, "--task", task, "--rounds", "2", "--min-nodes", "2", "--batch-size", "32")
    for i in range(2):
        procs.worker(f"w{i}", port, "--task", task, "--partition-id", str(i), "--num-partitions", "2")
    status = run_to_the_end(procs, port)
    last = status["history"][-1]["test_metrics"]
    assert set(last) == {"accuracy", "top2_accuracy"} and last["top2_accuracy"] >= last["accuracy"] > 0.85
    assert status["history"][-1]["test_loss"] is None  # the task reports none
    assert "trained 750 samples x 1 epochs" in procs.output("w0") and "loss " in procs.output("w0")


def write_png_folders(tmp_path: Path, per_class: int) -> Path:
    out = tmp_path / "png"
    made = subprocess.run([sys.executable, str(ROOT / "examples" / "make_image_folders.py"), "--out", str(out),
                           "--dataset", "mnist", "--workers", "2", "--per-class", str(per_class)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    return out


IMAGE_FLAGS = ("--task", "image-folder", "--image-size", "32", "--data-workers", "1")


def test_the_image_folder_task_trains_resnet18_on_real_pngs(procs, tmp_path):
    out = write_png_folders(tmp_path, per_class=16)
    port = free_port()
    procs.coordinator(port, *IMAGE_FLAGS, "--data-dir", str(out / "test"), "--rounds", "2", "--min-nodes", "2",
                      "--batch-size", "16")
    for i in range(2):
        procs.worker(f"w{i}", port, *IMAGE_FLAGS, "--data-dir", str(out / f"worker{i}"))
    status = run_to_the_end(procs, port, timeout=400)
    assert status["task"] == "image-folder" and status["model"] == "resnet18"
    assert all(r["num_samples"] == 160 and r["test_metrics"].keys() == {"loss", "accuracy"} for r in status["history"])
    assert "decoded 80 examples once" in procs.output("w0")  # cached after the first pass
    checkpoint = load_checkpoint(tmp_path / "models" / "global_model.pt")
    assert checkpoint["classes"] == [str(c) for c in range(10)] and checkpoint["model_name"] == "resnet18"
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.isfinite(net.fc.weight).all()


def test_workers_with_another_task_or_other_class_folders_are_refused_and_exit_1(procs, tmp_path):
    out = write_png_folders(tmp_path, per_class=2)
    shutil.rmtree(out / "worker1" / "3")  # a site without the class "3" folder
    port = free_port()
    procs.coordinator(port, *IMAGE_FLAGS, "--data-dir", str(out / "test"), "--min-nodes", "2")
    refused = {"other-classes": procs.worker("other-classes", port, *IMAGE_FLAGS, "--data-dir", str(out / "worker1")),
               "other-task": procs.worker("other-task", port, "--task", str(TASKS / "digits_own_train.py")),
               "other-size": procs.worker("other-size", port, *IMAGE_FLAGS, "--image-size", "64", "--data-dir",
                                          str(out / "worker0"))}
    for name, proc in refused.items():
        assert proc.wait(120) == 1, procs.output(name)
        text = procs.output(name)
        assert "Traceback" not in text and "the coordinator refused this worker's task" in text, text
    assert "class names differ: missing here [3] (1)" in procs.output("other-classes")
    assert "task: the coordinator runs 'image-folder', this worker 'digits-adam'" in procs.output("other-task")
    assert "image-size: the coordinator has 32, this worker 64" in procs.output("other-size")
    status = try_status(status_client(port))
    assert status["nodes"] == [] and status["state"] == "waiting_for_nodes"  # none of them joined
    assert "refused the registration of other-task" in procs.output("coordinator")


def test_federated_evaluation_when_the_coordinator_holds_no_data(procs):
    """--no-eval on the coordinator, --eval-fraction on the workers: each round's global model is evaluated on the
    workers' held-out parts, and the history records the sample-weighted mean beside the (absent) server side."""
    port = free_port()
    task = str(ROOT / "examples" / "breast_cancer.py")
    procs.coordinator(port, "--task", task, "--no-eval", "--rounds", "2", "--min-nodes", "2", "--local-epochs", "2",
                      "--batch-size", "16", "--learning-rate", "0.05")
    for i in range(2):
        procs.worker(f"w{i}", port, "--task", task, "--partition-id", str(i), "--num-partitions", "2",
                     "--eval-fraction", "0.2")
    status = run_to_the_end(procs, port)
    for r in status["history"]:
        assert r["test_accuracy"] is None and r["test_metrics"] == {}
        assert (r["federated_num_nodes"], r["federated_num_samples"], r["num_samples"]) == (2, 91, 364)
        assert {"loss", "accuracy", "f1"} <= set(r["federated_metrics"])
    assert status["history"][-1]["federated_metrics"]["accuracy"] > 0.9, status["history"]
    assert "held out 46 of 228 examples" in procs.output("w0")
    assert "evaluated the global model on 46 held-out examples" in procs.output("w0")
    assert "federated evaluation by 2 of 2 nodes on 91 examples" in procs.output("coordinator")
