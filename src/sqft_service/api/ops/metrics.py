"""Prometheus metrics of one service process (``GET /metrics``).

Job numbers are read from the store at scrape time by :class:`StoreCollector`, so they are right after
a restart and need no bookkeeping beside the jobs table; a running job's throughput is its newest
metrics event, which the job process has written into SQLite (no other channel to the job). Request
counts, latencies and upload bytes are kept in memory by this process, the only API process (so no
multiprocess mode), and start from zero when it starts.

Every label has a bounded set of values: routes are templates (``/v1/fine_tuning/jobs/{job_id}``,
unknown paths are one ``unmatched`` route), methods outside HTTP's standard ones are ``OTHER``, and
``job_id`` labels only the running jobs (at most ``max_concurrent_jobs``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...inference.engine import InferenceEngine
from ...jobs.kinds import DISPLAY_NAMES
from ...jobs.manager import JobManager
from ...store import stats
from ...store.db import Database
from ...store.jobs import ACTIVE_STATUSES, FINAL_STATUSES

UNMATCHED_ROUTE = "unmatched"
_STATUSES = (*ACTIVE_STATUSES, "paused", *FINAL_STATUSES)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Requests range from sub-millisecond reads to uploads and operations that wait (up to hours).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ServiceMetrics:
    """The registry of one app and the metrics the API updates as it serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, resident memory, open fds
        PlatformCollector(registry=self.registry)  # python_info
        labels = ("method", "route", "status")
        self.requests = Counter("sqft_http_requests", "HTTP requests answered", labels, registry=self.registry)
        self.latency = Histogram(
            "sqft_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "sqft_upload_bytes", "Bytes of uploaded files stored (POST /v1/files)", registry=self.registry
        )
        self._store: StoreCollector | None = None
        self._inference: InferenceCollector | None = None

    def watch_inference(self, engine: Callable[[], InferenceEngine | None]) -> None:
        """Add the engine's token counts and requests in flight (``engine()``: None before its first request)."""
        self._inference = InferenceCollector(engine)
        self.registry.register(self._inference)

    def watch_store(self, db: Database, manager: JobManager) -> None:
        """Add the job metrics (the lifespan calls this once the store and the manager exist)."""
        self._store = StoreCollector(db, manager)
        self.registry.register(self._store)

    def unwatch_store(self) -> None:
        """Remove the job and engine metrics (the lifespan's end: another start adds them again)."""
        for collector in (self._store, self._inference):
            if collector is not None:
                self.registry.unregister(collector)
        self._store = self._inference = None


class InferenceCollector(Collector):
    """The in-process engine's prompt and generated tokens (since this process started) and the requests
    holding one of its slots (generating, or waiting behind the one generating)."""

    def __init__(self, engine: Callable[[], InferenceEngine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        tokens = CounterMetricFamily(
            "sqft_inference_tokens", "Tokens of the answers the inference engine gave", labels=("type",)
        )
        tokens.add_metric(("prompt",), engine.prompt_tokens if engine else 0)
        tokens.add_metric(("generated",), engine.generated_tokens if engine else 0)
        yield tokens
        yield GaugeMetricFamily(
            "sqft_inference_requests_in_flight",
            "Requests generating or waiting for the inference engine",
            value=engine.in_flight if engine else 0,
        )


class StoreCollector(Collector):
    def __init__(self, db: Database, manager: JobManager) -> None:
        self.db = db
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        by_status = stats.jobs_by_kind_and_status(self.db)
        jobs = GaugeMetricFamily("sqft_jobs", "Jobs in the store by kind and status", labels=("kind", "status"))
        # Every kind and status, zeros too: a series that vanishes at 0 breaks alerts such as `queued > 10`.
        grid = {(kind, status): 0 for kind in DISPLAY_NAMES for status in _STATUSES}
        for (kind, status), n in sorted({**grid, **by_status}.items()):
            jobs.add_metric((kind, status), n)
        yield jobs
        queued = sum(n for (_, status), n in by_status.items() if status == "queued")
        yield GaugeMetricFamily("sqft_job_queue_length", "Jobs queued and waiting for a free slot", value=queued)
        yield GaugeMetricFamily(
            "sqft_job_processes_running", "Job processes this service runs now", value=self.manager.running_count()
        )
        failures = CounterMetricFamily(
            "sqft_job_failures", "Failed jobs by kind and error code", labels=("kind", "code")
        )
        for (kind, code), n in sorted(stats.failures_by_code(self.db).items()):
            failures.add_metric((kind, code), n)
        yield failures
        yield from self._throughput()
        yield from self._gpus()

    def _gpus(self) -> Iterator[Metric]:
        """Jobs holding each GPU the subprocess runner hands out (none without GPUs, or under Ray)."""
        gpu_load = getattr(self.manager.runner, "gpu_load", None)
        load = gpu_load() if gpu_load is not None else None
        if not load:
            return
        per_gpu = GaugeMetricFamily("sqft_gpu_jobs", "Running jobs given this GPU (jobs/gpus.py)", labels=("gpu",))
        for gpu, jobs in load.items():
            per_gpu.add_metric((gpu,), jobs)
        yield per_gpu

    def _throughput(self) -> Iterator[Metric]:
        labels = ("job_id", "kind")
        tokens = GaugeMetricFamily(
            "sqft_job_tokens_per_second", "A running job's training throughput (its latest step)", labels=labels
        )
        step = GaugeMetricFamily("sqft_job_step_seconds", "A running job's time per optimizer step", labels=labels)
        gpu = GaugeMetricFamily(
            "sqft_job_gpu_peak_memory_bytes", "The most GPU memory a running job's tensors held", labels=labels
        )
        for job_id, kind in stats.running_jobs(self.db):
            row = stats.latest_step_metrics(self.db, job_id)
            if row is None:
                continue  # still loading, or an operation: no steps
            tokens.add_metric((job_id, kind), float(row["tokens_per_s"]))
            if row.get("step_s") is not None:
                step.add_metric((job_id, kind), float(row["step_s"]))
            if row.get("gpu_peak_memory_gib") is not None:  # GPU jobs only
                gpu.add_metric((job_id, kind), float(row["gpu_peak_memory_gib"]) * 2**30)
        yield tokens
        yield step
        yield gpu


class RouteTemplates:
    """The route template of a request: the route the router served it with (``scope["route"]``, set
    while routing), else, for a request answered before routing (a 401, a 413), the schema's path that
    matches (a concrete path before a template, as in routing); ``unmatched`` for any other path."""

    def __init__(self) -> None:
        self._schema: list[tuple[str, re.Pattern[str]]] | None = None

    def __call__(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path_format", None) or route.path
        if self._schema is None:  # built once: the schema does not change while the app runs
            paths = sorted(scope["app"].openapi()["paths"], key=lambda p: "{" in p)
            self._schema = [(p, re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(p)))) for p in paths]
        path = scope["path"]
        return next((template for template, regex in self._schema if regex.fullmatch(path)), UNMATCHED_ROUTE)


class HttpMetricsMiddleware:
    """Counts each request and times it by route template, method and status. Added outside the auth
    and body-limit middlewares, so their 401s and 413s are counted too."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.route_template = RouteTemplates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            labels = (method, self.route_template(scope), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
