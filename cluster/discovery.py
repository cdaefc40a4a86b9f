"""Discovery: the controller publishes its live worker groups at GET /v1/groups (JSON) for routers.

Each entry is a GroupEndpoint as a dict: name, address (gRPC), healthy, generation, pids and
metrics_address (rank 0's Prometheus host:port, or null).
"""

from __future__ import annotations

import socket
import threading

from fastapi import FastAPI


def discovery_app(controller) -> FastAPI:
    app = FastAPI(title="k2serve discovery", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/groups")
    def groups() -> dict:
        return {"groups": controller.status()}

    return app


class DiscoveryServer:
    """uvicorn on a daemon thread serving discovery_app(controller) on `sock` (bound by cluster.listener)."""

    def __init__(self, controller, sock: socket.socket):
        import uvicorn

        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(discovery_app(controller), host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="discovery",
                                       daemon=True)

    def start(self) -> "DiscoveryServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
