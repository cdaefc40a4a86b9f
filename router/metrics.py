"""RouterMetrics: the router's Prometheus series (prefix ``k2serve_router_``, base units seconds).

The series are declared once, as data, in ``METRICS``; ``RouterMetrics`` builds them into a
caller-owned ``CollectorRegistry`` (no global registry) and offers one small method per event the
router code records. Tests, the Grafana dashboard and the alert rules are checked against ``METRICS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

# LLM-serving buckets (seconds): TTFT 5 ms..60 s, inter-token 1 ms..5 s, end-to-end 50 ms..600 s.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 60.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0)

# Numeric encoding of a circuit breaker's state for k2serve_router_circuit_state.
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class MetricSpec:
    """One exposed series family: name as scraped (counters end in _total), type, labels, help."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("k2serve_router_requests_total", "counter", ("endpoint", "status", "model"),
               "HTTP requests finished, by endpoint and HTTP status code."),
    MetricSpec("k2serve_router_request_duration_seconds", "histogram", ("endpoint", "model"),
               "End-to-end request latency, arrival to last byte.", E2E_BUCKETS),
    MetricSpec("k2serve_router_time_to_first_token_seconds", "histogram", ("model",),
               "Time from request arrival to the first generated token.", TTFT_BUCKETS),
    MetricSpec("k2serve_router_inter_token_latency_seconds", "histogram", ("model",),
               "Time between consecutive generated tokens of one request.", ITL_BUCKETS),
    MetricSpec("k2serve_router_queue_time_seconds", "histogram", ("model",),
               "Time from request arrival until it is dispatched to a worker group.", QUEUE_BUCKETS),
    MetricSpec("k2serve_router_prompt_tokens_total", "counter", ("model",),
               "Prompt tokens of finished requests."),
    MetricSpec("k2serve_router_cached_prompt_tokens_total", "counter", ("model",),
               "Prompt tokens served from a worker's prefix cache."),
    MetricSpec("k2serve_router_generation_tokens_total", "counter", ("model",),
               "Generated (completion) tokens streamed to clients."),
    MetricSpec("k2serve_router_requests_in_flight", "gauge", ("endpoint",),
               "Requests currently being served by this router replica."),
    MetricSpec("k2serve_router_retries_total", "counter", ("group",),
               "Requests re-sent to another worker group after this group failed them before their first token."),
    MetricSpec("k2serve_router_migrations_total", "counter", ("group",),
               "Requests moved to another worker group after this group failed them mid-stream (continued "
               "after the tokens already sent)."),
    MetricSpec("k2serve_router_requests_cancelled_total", "counter", ("reason",),
               "Requests the router cancelled on their worker: slow_client (the client did not read its "
               "stream) or deadline (the request's deadline passed)."),
    MetricSpec("k2serve_router_draining", "gauge", (),
               "1 while this router drains (after SIGTERM): it takes no new requests and finishes the "
               "ones in flight."),
    MetricSpec("k2serve_router_client_disconnects_total", "counter", ("endpoint",),
               "Requests aborted because the client went away."),
    MetricSpec("k2serve_router_group_dispatches_total", "counter", ("group",),
               "Requests dispatched to each worker group by the balancer."),
    MetricSpec("k2serve_router_group_healthy", "gauge", ("group",),
               "1 if the worker group is healthy as seen by this router, else 0."),
    MetricSpec("k2serve_router_healthy_groups", "gauge", (),
               "Number of worker groups this router currently considers healthy."),
    MetricSpec("k2serve_router_circuit_state", "gauge", ("group",),
               "Circuit breaker state per worker group: 0 closed, 1 half-open, 2 open."),
)

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def build_metrics(registry: CollectorRegistry, specs: tuple[MetricSpec, ...]) -> dict:
    """Create one prometheus_client object per spec in ``registry``; returns them by name."""
    built = {}
    for spec in specs:
        kwargs = {"labelnames": spec.labels, "registry": registry}
        if spec.buckets is not None:
            kwargs["buckets"] = spec.buckets
        built[spec.name] = _KINDS[spec.kind](spec.name, spec.help, **kwargs)
    return built


def _circuit_key(state) -> str:
    value = getattr(state, "value", state)
    if not isinstance(value, str):
        value = getattr(state, "name", str(value))
    return value.lower().replace("-", "_")


# Per-group series whose values describe the group now (removed with it); the others are counters, kept.
GROUP_STATE_SERIES = ("k2serve_router_group_healthy", "k2serve_router_circuit_state")


class RouterMetrics:
    """The router's metrics, registered in ``registry`` and labelled with the served ``model``.

    A group that leaves (removed, or replaced by the controller under the same name) loses its state
    gauges at once, but its counters stay, so that a scrape after a failover still sees its retries and
    migrations (Prometheus handles a series that stops moving). The counters of at most
    ``max_retired_groups`` groups that are gone are kept: the oldest are dropped beyond that.
    """

    def __init__(self, registry: CollectorRegistry, model: str = "kimi-k2", max_retired_groups: int = 32):
        self.registry = registry
        self.model = model
        self.max_retired_groups = max_retired_groups
        self._m = build_metrics(registry, METRICS)
        self._children: dict[tuple, object] = {}  # labelled series by (name, labels): labels() is slow per token
        self._health: dict[str, bool] = {}
        self._retired: dict[str, None] = {}  # groups gone, oldest first
        self._m["k2serve_router_healthy_groups"].set(0)
        self._m["k2serve_router_draining"].set(0)
        # The model label never changes: the per-token series are resolved here, not looked up per token.
        self._ttft = self._child("k2serve_router_time_to_first_token_seconds", model=model)
        self._itl = self._child("k2serve_router_inter_token_latency_seconds", model=model)
        self._prompt = self._child("k2serve_router_prompt_tokens_total", model=model)
        self._generated = self._child("k2serve_router_generation_tokens_total", model=model)
        self._cached = self._child("k2serve_router_cached_prompt_tokens_total", model=model)

    def _child(self, name: str, **labels):
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._m[name].labels(**labels)
        return child

    # ---- per request -----------------------------------------------------------------------
    def request_started(self, endpoint: str) -> None:
        """A request entered the router (increments the in-flight gauge)."""
        self._child("k2serve_router_requests_in_flight", endpoint=endpoint).inc()

    def request_finished(self, endpoint: str, status: int | str, e2e_s: float) -> None:
        """A request ended with HTTP ``status`` after ``e2e_s`` seconds (decrements in-flight)."""
        self._child("k2serve_router_requests_total", endpoint=endpoint, status=str(status),
                    model=self.model).inc()
        self._child("k2serve_router_request_duration_seconds", endpoint=endpoint,
                    model=self.model).observe(e2e_s)
        self._child("k2serve_router_requests_in_flight", endpoint=endpoint).dec()

    def observe_ttft(self, seconds: float) -> None:
        """Time to first token of one request."""
        self._ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        """Gap before one generated token (every token after the first)."""
        self._itl.observe(seconds)

    def queue_time(self, seconds: float) -> None:
        """Time a request waited in the router before being dispatched to a group."""
        self._child("k2serve_router_queue_time_seconds", model=self.model).observe(seconds)

    def tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        """Add token counts (prompt at completion; generated as they stream; cached prompt hits)."""
        if generated:
            self._generated.inc(generated)
        if prompt:
            self._prompt.inc(prompt)
        if cached:
            self._cached.inc(cached)

    def client_disconnect(self, endpoint: str) -> None:
        """The client went away before the response finished."""
        self._child("k2serve_router_client_disconnects_total", endpoint=endpoint).inc()

    def cancelled(self, reason: str) -> None:
        """The router cancelled a request on its worker: ``slow_client`` or ``deadline``."""
        self._child("k2serve_router_requests_cancelled_total", reason=reason).inc()

    def draining(self, draining: bool) -> None:
        """The router started (or stopped) draining."""
        self._m["k2serve_router_draining"].set(1 if draining else 0)

    # ---- per worker group ------------------------------------------------------------------
    def dispatched(self, group: str) -> None:
        """The balancer sent a request to ``group``."""
        self._child("k2serve_router_group_dispatches_total", group=group).inc()

    def retry(self, group: str) -> None:
        """A request failed on ``group`` before its first token and is being re-sent elsewhere."""
        self._child("k2serve_router_retries_total", group=group).inc()

    def migration(self, group: str) -> None:
        """A request failed on ``group`` mid-stream and is being continued elsewhere."""
        self._child("k2serve_router_migrations_total", group=group).inc()

    def set_group_health(self, group: str, healthy: bool) -> None:
        """Record ``group``'s health; keeps k2serve_router_healthy_groups equal to the count."""
        self._retired.pop(group, None)
        self._health[group] = bool(healthy)
        self._child("k2serve_router_group_healthy", group=group).set(1 if healthy else 0)
        self._m["k2serve_router_healthy_groups"].set(sum(self._health.values()))

    def set_circuit_state(self, group: str, state) -> None:
        """Record ``group``'s circuit breaker state: closed, half_open (or half-open) or open.

        ``state`` may be a string or an enum whose ``value`` (or ``name``) is one of those.
        """
        key = _circuit_key(state)
        if key not in CIRCUIT_STATES:
            raise ValueError(f"unknown circuit state {state!r}; expected one of {sorted(CIRCUIT_STATES)}")
        self._child("k2serve_router_circuit_state", group=group).set(CIRCUIT_STATES[key])

    def remove_group(self, group: str) -> None:
        """A worker group is gone (or being replaced): drop its state gauges, keep its counters (within
        ``max_retired_groups`` groups gone)."""
        self._health.pop(group, None)
        self._m["k2serve_router_healthy_groups"].set(sum(self._health.values()))
        self._drop_series(group, GROUP_STATE_SERIES)
        self._retired.pop(group, None)
        self._retired[group] = None
        while len(self._retired) > self.max_retired_groups:
            oldest = next(iter(self._retired))
            del self._retired[oldest]
            self._drop_series(oldest, tuple(spec.name for spec in METRICS if spec.labels == ("group",)))

    def _drop_series(self, group: str, names: tuple[str, ...]) -> None:
        for name in names:
            self._children.pop((name, ("group", group)), None)
            try:
                self._m[name].remove(group)
            except KeyError:
                pass

    # ---- exposition ------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition of this registry and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
