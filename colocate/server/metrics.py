"""Prometheus metrics of one server: counters and histograms it updates, gauges read from the engine at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from colocate.engine import GenerationOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Pauses and resumes take milliseconds to seconds; a weight update from disk can take minutes.
_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Every metric of one app, in a registry of its own (several apps may share a process, e.g. in tests).

    >>> metrics = ServerMetrics(engine.memory_status)
    >>> metrics.requests.labels(route="/generate", method="POST", status="200").inc()
    >>> metrics.render()   # Prometheus text, engine gauges read now
    """

    def __init__(self, memory_status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("colocate_requests", "HTTP requests answered, by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("colocate_request_duration_seconds", "HTTP request latency, by route",
                                         ["route"], buckets=_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("colocate_prompt_tokens", "Prompt tokens of finished sequences", registry=r)
        self.generated_tokens = Counter("colocate_generated_tokens", "Tokens generated", registry=r)
        self.sequences = Counter("colocate_sequences", "Sequences finished, by finish reason", ["finish_reason"],
                                 registry=r)
        self.pauses = Counter("colocate_pauses", "POST /pause calls, by outcome (ok or the error type)",
                              ["outcome"], registry=r)
        self.resumes = Counter("colocate_resumes", "POST /resume calls, by outcome", ["outcome"], registry=r)
        self.weight_updates = Counter("colocate_weight_updates", "POST /update_weights calls, by format and outcome",
                                      ["format", "outcome"], registry=r)
        self.pause_seconds = Histogram("colocate_pause_duration_seconds", "Wall time of successful pauses",
                                       buckets=_BUCKETS_S, registry=r)
        self.resume_seconds = Histogram("colocate_resume_duration_seconds", "Wall time of successful resumes",
                                        buckets=_BUCKETS_S, registry=r)
        self.weight_update_seconds = Histogram("colocate_weight_update_duration_seconds",
                                               "Wall time of successful weight updates", ["format"],
                                               buckets=_BUCKETS_S, registry=r)
        r.register(_EngineCollector(memory_status))

    def observe_outputs(self, outs: list[GenerationOutput], *, n: int = 1, first_index: int = 0) -> None:
        """Count outputs; a prompt's `n` responses (consecutive indices) share one prefill, counted once."""
        for i, out in enumerate(outs, start=first_index):
            if i % n == 0:
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.generated_tokens.inc(len(out.token_ids))
            self.sequences.labels(finish_reason=out.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from `memory_status()` at each scrape, so they are never stale."""

    def __init__(self, memory_status: Callable[[], dict[str, Any]]) -> None:
        self.memory_status = memory_status

    def describe(self) -> list[Metric]:
        return []  # the gauges exist only at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("colocate_engine_up", "1 if the engine answered this scrape, else 0")
        try:
            status = self.memory_status()
        except Exception:  # noqa: BLE001 - a dead engine is reported as a metric, not a failed scrape
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        awake = GaugeMetricFamily("colocate_tag_awake", "1 if the tag is awake, 0 if paused", labels=["tag"])
        for tag, state in status["state"].items():
            awake.add_metric([tag], 1 if state == "awake" else 0)
        yield awake
        device = GaugeMetricFamily("colocate_device_bytes", "Device bytes held, by tag", labels=["tag"])
        for tag, nbytes in status["device_bytes"].items():
            device.add_metric([tag], nbytes)
        yield device
        host = GaugeMetricFamily("colocate_host_bytes",
                                 "Host bytes held: the pinned arena of paused weights, streamed layers", labels=["tag"])
        for tag, nbytes in status["host_bytes"].items():
            host.add_metric([tag], nbytes)
        yield host
        for name, key, doc in (
                ("colocate_device_free_bytes", "device_free_bytes", "Free memory of the engine's device"),
                ("colocate_device_total_bytes", "device_total_bytes", "Total memory of the engine's device"),
                ("colocate_num_running", "num_running", "Sequences being generated"),
                ("colocate_num_waiting", "num_waiting", "Sequences queued or held by a pause"),
                ("colocate_num_missing_weights", "num_missing_weights", "Weights discarded and not yet rewritten"),
                ("colocate_weight_update_in_progress", "weight_update_in_progress",
                 "1 while a bucketed weight update is open")):
            yield GaugeMetricFamily(name, doc, value=float(status[key]))
        if status["weights_version"] is not None:
            yield GaugeMetricFamily("colocate_weights_version", "Version of the last weight update",
                                    value=float(status["weights_version"]))
