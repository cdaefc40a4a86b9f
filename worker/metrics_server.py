"""Rank 0's plain-HTTP port: the group's Prometheus series at /metrics, and the probes Kubernetes uses.

`GET /ready` answers 200 while the group can generate (steps and heartbeats pass every rank, not
draining) and 503 otherwise; `GET /health` answers 200 while the process does. They live here, not on
the gRPC port, because that port may require TLS and a token, which kubelet's probes cannot present;
what they reveal (up, ready) is no secret.
"""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


def _text(start_response, status: str, body: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


def metrics_app(registry: CollectorRegistry, is_ready: Callable[[], bool]):
    """The WSGI app: /ready and /health as above, anything else the Prometheus exposition."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/ready":
            ready = is_ready()
            return _text(start_response, "200 OK" if ready else "503 Service Unavailable",
                         "ready\n" if ready else "not ready\n")
        if path == "/health":
            return _text(start_response, "200 OK", "ok\n")
        return metrics(environ, start_response)
    return app


def serve_metrics(host: str, port: int, registry: CollectorRegistry, is_ready: Callable[[], bool]) -> WSGIServer:
    """Serve metrics_app on (host, port; 0: a free one) from a daemon thread; stop with shutdown() and
    server_close(); the bound port is `server_port`."""
    server = make_server(host, port, metrics_app(registry, is_ready), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
