"""Per-round metrics in TensorBoard and MLflow (fedrest/server/tracking.py), written by a coordinator and read back
with each project's own reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import filled_state_dict, post_update, register

from fedrest.server.tracking import TrackingError, round_metrics


def _record(**changes) -> dict:
    record = {"round": 2, "num_updates": 3, "num_samples": 120, "duration_s": 4.5, "aggregation_s": 0.05,
              "mean_train_loss": 0.7, "max_train_seconds": 3.1, "epsilon": None, "evaluation_pending": False,
              "test_loss": 0.4, "test_accuracy": 0.9, "test_metrics": {"loss": 0.4, "accuracy": 0.9, "f1": 0.88},
              "evaluation_s": 0.6, "federated_metrics": {}}
    record.update(changes)
    return record


def test_round_metrics_name_what_is_known():
    metrics = round_metrics(_record())
    assert metrics["test/accuracy"] == 0.9 and metrics["test/f1"] == 0.88 and metrics["round/updates"] == 3.0
    assert metrics["train/loss"] == 0.7 and metrics["round/evaluation_s"] == 0.6
    assert "privacy/epsilon" not in metrics and not any(k.startswith("federated/") for k in metrics)
    pending = round_metrics(_record(evaluation_pending=True, test_loss=None, test_accuracy=None, test_metrics={}))
    assert not any(k.startswith("test/") for k in pending) and "round/evaluation_s" not in pending
    later = round_metrics(_record(federated_metrics={"accuracy": 0.85}, epsilon=1.5, mean_train_loss=math.nan))
    assert later["federated/accuracy"] == 0.85 and later["privacy/epsilon"] == 1.5 and "train/loss" not in later


def _accuracy_of(state_dict) -> dict:
    value = float(state_dict["conv1.weight"].mean())
    return {"loss": 2.0 - value, "accuracy": value / 10}


def test_a_run_logs_each_rounds_metrics_once_to_tensorboard_and_mlflow(make_app, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, mlruns = tmp_path / "tb", tmp_path / "mlruns"
    app = make_app(min_nodes_to_start=2, communication_rounds=3, max_share=1.0, evaluator=_accuracy_of,
                   tensorboard_dir=str(tb), mlflow_uri=str(mlruns), mlflow_experiment="tests")
    client, fed = app.test_client(), app.extensions["federation"]
    a, b = register(client, "a", num_samples=10), register(client, "b", num_samples=30)
    fed.tick()
    for number in (1, 2, 3):
        post_update(client, a, number, filled_state_dict(float(number), 4), {"num_samples": 10, "train_loss": 1.0})
        post_update(client, b, number, filled_state_dict(number + 4.0, 8), {"num_samples": 30, "train_loss": 0.5})
        fed.tick()
        fed.tick()  # the follow-up: the coordinator's evaluation of the new model
    app.extensions["tracking"].close()
    history = fed.state.history
    assert [r.round for r in history] == [1, 2, 3] and all(r.test_accuracy is not None for r in history)

    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("test/accuracy")] == \
        [(r.round, r.test_accuracy) for r in history]  # once each
    assert [e.value for e in events.Scalars("round/samples")] == [40.0, 40.0, 40.0]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r.mean_train_loss for r in history])

    mlflow = MlflowClient(tracking_uri=mlruns.absolute().as_uri())
    experiment = mlflow.get_experiment_by_name("tests")
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`fedrest.run_id` = '{fed.run_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["strategy"] == "fedavg" and runs[0].data.params["communication_rounds"] == "3"
    logged = mlflow.get_metric_history(runs[0].info.run_id, "test/loss")
    assert sorted((m.step, m.value) for m in logged) == [(r.round, pytest.approx(r.test_loss)) for r in history]


def test_a_tracking_server_that_does_not_answer_stops_the_start(make_app, tmp_path):
    with pytest.raises(TrackingError, match="--mlflow-uri http://127.0.0.1:9"):
        make_app(mlflow_uri="http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="--tensorboard-dir"):
        (tmp_path / "file").write_text("not a folder")
        make_app(tensorboard_dir=str(Path(tmp_path / "file" / "tb")))
