"""A run's per-round metrics in TensorBoard (``--tensorboard-dir``) and MLflow (``--mlflow-uri``), through those
projects' own client libraries (``torch.utils.tensorboard``, which needs the ``tensorboard`` package, and
``mlflow``'s MlflowClient; either is imported only when asked for).

A thread of its own follows the run's history (woken by the federation's changes, never holding its lock while it
writes) and logs each round's numbers, at step = the round, as soon as they are known:

- at the round's commit: ``round/updates``, ``round/samples``, ``round/duration_s``, ``round/aggregation_s``,
  ``train/loss`` (the updates' mean training loss), ``train/max_seconds`` (the slowest update's training), and
  ``privacy/epsilon`` with DP-FedAvg;
- after the coordinator's evaluation of its global model: ``test/<metric>`` (``test/accuracy``, ``test/loss``, and
  the task's other metrics) and ``round/evaluation_s``;
- after the federated evaluation: ``federated/<metric>`` (the sample-weighted mean of the workers').

Each (round, name) is logged once. The coordinator's settings and strategy are the MLflow run's parameters and a
TensorBoard text; the MLflow run is named after the task, strategy and run id, tagged ``fedrest.run_id``, and found
again by that tag when the coordinator resumes the run (TensorBoard: the same folder, a new event file). A restarted
coordinator logs the rounds from the one it resumed at. A tracking backend that fails is logged as a warning and
tried again at the next change: the run goes on.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from config import COORDINATOR_FIELDS

log = logging.getLogger("fl.tracking")

MAX_MLFLOW_PARAMS = 100  # per log_batch call (MLflow's limit)


class TrackingError(Exception):
    """A tracking backend cannot be set up (library missing, folder not writable, server refusing); one line."""


def round_metrics(record: dict) -> dict[str, float]:
    """The numbers of one history record (:class:`fedrest.server.rounds.RoundRecord` as a dict) known so far,
    by metric name (see the module's text); None and non-finite values are left out."""
    values = {"round/updates": record["num_updates"], "round/samples": record["num_samples"],
              "round/duration_s": record["duration_s"], "round/aggregation_s": record["aggregation_s"],
              "train/loss": record.get("mean_train_loss"), "train/max_seconds": record.get("max_train_seconds"),
              "privacy/epsilon": record.get("epsilon")}
    if not record.get("evaluation_pending"):
        test = dict(record.get("test_metrics") or {})
        for name, value in (("loss", record.get("test_loss")), ("accuracy", record.get("test_accuracy"))):
            test.setdefault(name, value)
        values.update({f"test/{k}": v for k, v in test.items()})
        if test.get("accuracy") is not None or test.get("loss") is not None:
            values["round/evaluation_s"] = record.get("evaluation_s")
    values.update({f"federated/{k}": v for k, v in (record.get("federated_metrics") or {}).items()})
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    """Scalars into ``directory`` (read with ``tensorboard --logdir DIRECTORY``)."""

    def __init__(self, directory: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
        try:
            self.writer = SummaryWriter(log_dir=directory)
        except OSError as exc:
            raise TrackingError(f"--tensorboard-dir {directory}: {exc}") from None
        self.directory = directory
        self.errors = (OSError,)

    def start(self, run_id: str, name: str, params: dict) -> None:
        self.writer.add_text("run", f"run {run_id} ({name})\n\n"
                             + "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())), 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class MLflowSink:
    """A run in experiment ``experiment`` of the MLflow tracking URI ``uri`` (an ``http(s)://`` server, a database
    such as ``sqlite:///mlflow.db``, or a folder: MLflow's file store)."""

    def __init__(self, uri: str, experiment: str) -> None:
        if "://" not in uri and not uri.startswith("file:"):
            uri = Path(uri).absolute().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind an opt-in; a folder was asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that is down: fail in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("--mlflow-uri needs MLflow's client: pip install mlflow-skinny (or mlflow)") from None
        self.Metric, self.Param, self.errors = Metric, Param, (MlflowException, OSError)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except self.errors as exc:
            raise TrackingError(f"--mlflow-uri {uri}: {str(exc).splitlines()[0]}") from None
        self.uri, self.run_id = uri, None

    def start(self, run_id: str, name: str, params: dict) -> None:
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`fedrest.run_id` = '{run_id}'")
        if found:  # a resumed run
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(self.experiment_id, run_name=name,
                                             tags={"fedrest.run_id": run_id}).info.run_id
        items = [self.Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_MLFLOW_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_MLFLOW_PARAMS])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, finished: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class Tracking:
    """Follows ``federation``'s history and logs each round's new numbers to ``sinks`` (see the module's text)
    from a thread of its own; :meth:`close` logs what is left and closes them."""

    def __init__(self, federation, sinks: list) -> None:
        self.fed, self.sinks = federation, sinks
        self.errors = tuple({e for sink in sinks for e in sink.errors})
        self.logged: dict[int, set[str]] = {}
        self.wake = threading.Event()
        self._closing = threading.Event()
        self._failing = False
        with federation.changed:
            history = list(federation.state.history)
            settled = self._settled(history, federation.state.round, federation.finished)
        for record in history[:settled]:  # logged by the coordinator's earlier life
            self.logged[record.round] = set(round_metrics(asdict(record)))
        self._from = settled  # the first history index whose numbers may still change
        name = f"{federation.task.name}-{federation.strategy.name}-{federation.run_id}"
        cfg = federation.config  # the coordinator's own settings (a worker's, such as its partition, are not here)
        public = cfg.public_dict()  # secrets left out
        params = {**{f: public[f] for f in COORDINATOR_FIELDS if f in public},
                  **{f"strategy.{k}": v for k, v in federation.strategy.describe().items()}}
        for sink in sinks:
            try:
                sink.start(federation.run_id, name, params)
            except self.errors as exc:
                raise TrackingError(f"{type(sink).__name__}: {str(exc).splitlines()[0] if str(exc) else exc}") \
                    from None
        federation.add_change_listener(self.wake.set)
        self._thread = threading.Thread(target=self._follow, name="tracking", daemon=True)
        self._thread.start()

    @staticmethod
    def _settled(history: list, current_round: int, finished: bool) -> int:
        """How many records at the head of ``history`` can no longer change: all but a pending record and the
        last round's (its federated evaluation may still come), unless the run is finished."""
        n = len(history)
        while n and (history[n - 1].evaluation_pending or (not finished and history[n - 1].round >= current_round)):
            n -= 1
        return n

    def _follow(self) -> None:
        while not self._closing.is_set():
            self.wake.wait(5.0)
            self._closing.wait(0.2)  # changes come in bursts (an update a request): one pass for them
            self.wake.clear()
            self.flush()

    def flush(self) -> None:
        """Log the numbers that appeared since the last pass (called by the thread; and by :meth:`close`)."""
        with self.fed.changed:
            history = self.fed.state.history
            records = [asdict(r) for r in history[self._from:]]
            settled = self._settled(history, self.fed.state.round, self.fed.finished)
        try:
            for record in records:
                metrics = round_metrics(record)
                new = {k: v for k, v in metrics.items() if k not in self.logged.get(record["round"], ())}
                if new:
                    for sink in self.sinks:
                        sink.log(record["round"], new)
                    self.logged.setdefault(record["round"], set()).update(new)
        except self.errors as exc:  # a sink's failure (its library's errors): the run goes on
            if not self._failing:
                log.warning("cannot log the round metrics (%s: %s); trying again at the next change",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._failing = True
            return
        if self._failing:
            log.info("round metrics logged again")
        self._failing = False
        self._from = max(self._from, settled)

    def close(self, timeout: float = 10.0) -> None:
        """Stop following, log what is left, and close the sinks (MLflow: the run ends FINISHED, or KILLED when the
        coordinator stops before the run's end)."""
        self._closing.set()
        self.wake.set()
        self._thread.join(timeout)
        self.fed.remove_change_listener(self.wake.set)
        self.flush()
        for sink in self.sinks:
            try:
                sink.close(self.fed.finished)
            except self.errors as exc:
                log.warning("closing %s: %s", type(sink).__name__, exc)


def start_tracking(config, federation) -> Tracking | None:
    """The run's :class:`Tracking` for ``--tensorboard-dir`` and ``--mlflow-uri`` (None when neither is given).

    Raises
    ------
    TrackingError
        When a backend's library is missing or it cannot be set up (the message says which and why).
    """
    sinks = []
    if config.tensorboard_dir:
        sinks.append(TensorBoardSink(config.tensorboard_dir))
        log.info("round metrics to TensorBoard: tensorboard --logdir %s", config.tensorboard_dir)
    if config.mlflow_uri:
        sinks.append(MLflowSink(config.mlflow_uri, config.mlflow_experiment))
        log.info("round metrics to MLflow: %s, experiment %s", sinks[-1].uri, config.mlflow_experiment)
    return Tracking(federation, sinks) if sinks else None
