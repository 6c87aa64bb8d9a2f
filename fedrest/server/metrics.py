"""Prometheus metrics of a federation, computed from its state at each scrape (``GET /metrics``).

A custom collector on a registry of the app's own (never the process-global one), so every coordinator
built by ``create_app`` has its own metrics and a resumed run reports its whole history.

Metrics (text exposition format, ``prometheus_client``):

- ``fl_rounds_completed_total`` (counter), ``fl_current_round`` and ``fl_total_rounds`` (gauges)
- ``fl_nodes{status="online|training|offline"}`` (gauge)
- ``fl_updates_accepted_total`` and ``fl_updates_rejected_total{reason=...}`` (counters)
- ``fl_uploads_in_progress`` and ``fl_upload_slots`` (gauges: uploads being received, and the cap MAX_UPLOADS;
  uploads over it count in ``fl_requests_refused_total{reason="busy"}``)
- ``fl_bytes_received_total`` (update uploads) and ``fl_bytes_sent_total`` (global models) (counters, bytes)
- ``fl_round_duration_seconds`` and ``fl_aggregation_duration_seconds`` (histograms over completed rounds)
- ``fl_test_accuracy`` and ``fl_test_loss`` of the last evaluated global model (gauges), and every metric the task
  reports as ``fl_test_metric{name="f1"}``; the workers' federated evaluation as ``fl_federated_metric{name=...}``
- with DP-FedAvg: ``fl_privacy_epsilon`` (epsilon spent so far, at ``fl_privacy_delta``) and
  ``fl_privacy_epsilon_budget`` when there is a budget (gauges)
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

ROUND_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)  # seconds
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds


def _histogram(name: str, documentation: str, values: list[float], bounds: tuple) -> HistogramMetricFamily:
    ordered = sorted(values)
    buckets = [(str(float(b)), bisect.bisect_right(ordered, b)) for b in bounds]
    buckets.append(("+Inf", len(ordered)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(ordered))


class FederationCollector(Collector):
    """Reads one federation's typed :meth:`~fedrest.server.federation.Federation.snapshot` at each scrape."""

    def __init__(self, federation, upload_slots=None) -> None:
        self.federation = federation
        self.upload_slots = upload_slots

    def collect(self):
        snap = self.federation.snapshot()
        history = snap.history
        yield CounterMetricFamily("fl_rounds_completed", "Rounds aggregated into the global model",
                                  value=len(history))
        yield GaugeMetricFamily("fl_current_round", "Round in progress, or the last one finished", value=snap.round)
        yield GaugeMetricFamily("fl_total_rounds", "Rounds this run trains (COMMUNICATION_ROUNDS)",
                                value=snap.total_rounds)
        nodes = GaugeMetricFamily("fl_nodes", "Registered nodes by status", labels=["status"])
        for state in ("online", "training", "offline"):
            nodes.add_metric([state], snap.node_counts.get(state, 0))
        yield nodes
        yield CounterMetricFamily("fl_updates_accepted", "Updates accepted (answered 202)",
                                  value=snap.updates_submitted_total)
        yield _by_reason("fl_updates_rejected", "Updates refused (400/413), by error", snap.updates_refused_total)
        yield _by_reason("fl_requests_refused", "Other requests refused, by error (429: rate limits)",
                         snap.requests_refused_total)
        if self.upload_slots is not None:
            yield GaugeMetricFamily("fl_uploads_in_progress", "Update uploads being received",
                                    value=self.upload_slots.in_progress)
            yield GaugeMetricFamily("fl_upload_slots", "Update uploads received at once at most (MAX_UPLOADS)",
                                    value=self.upload_slots.limit)
        yield CounterMetricFamily("fl_bytes_received", "Bytes of update uploads received", value=snap.bytes_received)
        yield CounterMetricFamily("fl_bytes_sent", "Bytes of global models sent to workers", value=snap.bytes_sent)
        yield _histogram("fl_round_duration_seconds", "Duration of completed rounds (first attempt to saved model)",
                         [r.duration_s for r in history], ROUND_BUCKETS)
        yield _histogram("fl_aggregation_duration_seconds", "FedAvg time of completed rounds",
                         [r.aggregation_s for r in history], AGGREGATION_BUCKETS)
        accuracies = [r.test_accuracy for r in history if r.test_accuracy is not None]
        if accuracies:
            yield GaugeMetricFamily("fl_test_accuracy", "Test accuracy of the last evaluated global model",
                                    value=accuracies[-1])
        losses = [r.test_loss for r in history if r.test_loss is not None]
        if losses:
            yield GaugeMetricFamily("fl_test_loss", "Test loss of the last evaluated global model", value=losses[-1])
        yield _last_by_name("fl_test_metric", "Every metric of the task on the coordinator's test data, last "
                            "evaluated round", [r.test_metrics for r in history])
        if snap.privacy is not None:
            yield GaugeMetricFamily("fl_privacy_epsilon", "DP-FedAvg: epsilon spent so far (at fl_privacy_delta)",
                                    value=snap.privacy["epsilon"])
            yield GaugeMetricFamily("fl_privacy_delta", "DP-FedAvg: the delta of the reported epsilon",
                                    value=snap.privacy["delta"])
            if snap.privacy["epsilon_budget"]:
                yield GaugeMetricFamily("fl_privacy_epsilon_budget", "DP-FedAvg: the run stops before exceeding this",
                                        value=snap.privacy["epsilon_budget"])
        yield _last_by_name("fl_federated_metric", "Sample-weighted mean of the workers' evaluations of the global "
                            "model on their held-out data, last round", [r.federated_metrics for r in history])


def _last_by_name(name: str, documentation: str, per_round: list[dict]) -> GaugeMetricFamily:
    """A gauge labelled ``name=<metric>`` with each metric's value in the last round that reported it."""
    family = GaugeMetricFamily(name, documentation, labels=["name"])
    last: dict[str, float] = {}
    for metrics in per_round:
        last.update(metrics or {})
    for metric, value in sorted(last.items()):
        family.add_metric([metric], value)
    return family


def _by_reason(name: str, documentation: str, counts: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


def make_registry(federation, upload_slots=None) -> CollectorRegistry:
    """A registry holding only ``federation``'s collector (with the gauges of ``upload_slots``, an
    :class:`~fedrest.server.uploads.UploadSlots`, when given)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(federation, upload_slots))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text exposition format."""
    return generate_latest(registry)
