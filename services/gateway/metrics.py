"""The Prometheus metrics the gateway serves at ``/metrics``: one scrape target for the whole
deployment. Request metrics are counted as the gateway serves requests; the cluster's state (queues,
running requests, KV pools, deployments, models, GPUs) is read over NATS at each scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from iserve.messages import Completion, DeploymentList, GpuLoad, ModelList, SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "iserve_requests", "Requests served, by model and outcome", ["model", "outcome"], registry=r
        )
        self.prompt_tokens = Counter(
            "iserve_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "iserve_completion_tokens", "Tokens generated for finished requests", ["model"], registry=r
        )
        self.ttft = Histogram(
            "iserve_ttft_seconds", "Time to first token (worker)", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "iserve_tpot_seconds",
            "Time per output token after the first",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "iserve_e2e_seconds",
            "Request time at the gateway, end to end",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "iserve_queue_seconds", "Time queued in the scheduler", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        labels = ["deployment", "model"]
        self.queue_depth = Gauge("iserve_queue_depth", "Requests queued per deployment", labels, registry=r)
        self.running = Gauge("iserve_running_requests", "Requests running per deployment", labels, registry=r)
        self.max_batch = Gauge("iserve_max_batch", "Requests a deployment runs at once", labels, registry=r)
        self.kv_used = Gauge("iserve_kv_blocks_used", "KV-pool blocks in use per deployment", labels, registry=r)
        self.kv_total = Gauge("iserve_kv_blocks_total", "KV-pool blocks per deployment", labels, registry=r)
        self.deployments = Gauge("iserve_deployments", "Deployments by state", ["state"], registry=r)
        self.models = Gauge(
            "iserve_models", "Registered models by status (profiling: jobs running)", ["status"], registry=r
        )
        gpu = ["agent", "gpu", "gpu_type"]
        self.gpu_busy = Gauge("iserve_gpu_busy_fraction", "GPU load: busy fraction of its window", gpu, registry=r)
        self.gpu_used = Gauge("iserve_gpu_memory_used_bytes", "GPU memory in use", gpu, registry=r)
        self.gpu_total = Gauge("iserve_gpu_memory_total_bytes", "GPU memory", gpu, registry=r)

    def finished(self, model: str, done: Completion, e2e_s: float, outcome: str) -> None:
        self.requests.labels(model, outcome).inc()
        self.prompt_tokens.labels(model).inc(done.prompt_tokens)
        self.completion_tokens.labels(model).inc(done.completion_tokens)
        self.ttft.labels(model).observe(done.ttft_ms / 1000.0)
        if done.completion_tokens > 1:
            self.tpot.labels(model).observe(done.tpot_ms / 1000.0)
        self.e2e.labels(model).observe(e2e_s)
        self.queue.labels(model).observe(done.queue_ms / 1000.0)

    def failed(self, model: str, code: str) -> None:
        self.requests.labels(model, code).inc()

    def cluster(
        self,
        stats: SchedulerStats | None,
        deployments: DeploymentList | None,
        models: ModelList | None,
        gpus: list[GpuLoad],
    ) -> None:
        """Replace the cluster gauges with what was read at this scrape (None: that service did not answer)."""
        for gauge in (self.queue_depth, self.running, self.max_batch, self.kv_used, self.kv_total):
            gauge.clear()
        for q in stats.queues if stats else []:
            self.queue_depth.labels(q.deployment_id, q.model).set(q.queue_depth)
            self.running.labels(q.deployment_id, q.model).set(q.in_flight)
            self.max_batch.labels(q.deployment_id, q.model).set(q.max_batch)
            self.kv_used.labels(q.deployment_id, q.model).set(q.kv_blocks_used)
            self.kv_total.labels(q.deployment_id, q.model).set(q.kv_blocks_total)
        if deployments is not None:
            self.deployments.clear()
            for state in ("launching", "ready", "failed", "stopped"):
                self.deployments.labels(state).set(sum(d.status == state for d in deployments.deployments))
        if models is not None:
            self.models.clear()
            for status in ("registered", "profiling", "profiled", "failed"):
                self.models.labels(status).set(sum(m.status == status for m in models.models))
        for g in gpus:
            key = (g.agent_id, str(g.gpu_index), g.gpu_type)
            self.gpu_busy.labels(*key).set(g.busy_fraction)
            self.gpu_used.labels(*key).set(g.used_bytes)
            self.gpu_total.labels(*key).set(g.total_bytes)
