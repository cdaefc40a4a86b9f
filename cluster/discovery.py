"""Discovery: the controller publishes its live worker groups at GET /v1/groups (JSON) for routers, and
takes `POST /v1/groups/restart` (a rolling restart, `k2serve restart`). With `security.tls` the port speaks
TLS and every request must carry the shared token (or come with a client certificate, mtls).

Each entry is a GroupEndpoint as a dict: name, address (gRPC), healthy, generation, pids and
metrics_address (rank 0's Prometheus host:port, or null).
"""

from __future__ import annotations

import socket
import threading

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from k2serve.cluster.config import SecuritySection
from k2serve.cluster.security import token_check, uvicorn_tls


class RestartRequest(BaseModel):
    """Body of POST /v1/groups/restart."""

    model_config = ConfigDict(extra="forbid")

    groups: list[str] | None = Field(None, description="groups to restart, in this order (None: all)")
    grace_s: float | None = Field(None, ge=0, description="drain time per group (None: controller.drain_timeout_s)")


def discovery_app(controller, security: SecuritySection = SecuritySection()) -> FastAPI:
    check = token_check(security)
    app = FastAPI(title="k2serve discovery", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(check)] if check is not None else [])

    @app.get("/v1/groups")
    def groups() -> dict:
        return {"groups": controller.status()}

    @app.post("/v1/groups/restart", status_code=202)
    def restart(body: RestartRequest):
        try:
            names = controller.start_rolling_restart(body.groups, body.grace_s)
        except KeyError as exc:
            return JSONResponse({"error": str(exc.args[0])}, status_code=404)
        except RuntimeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return {"restarting": names}

    return app


class DiscoveryServer:
    """uvicorn on a daemon thread serving discovery_app(controller) on `sock` (bound by cluster.listener)."""

    def __init__(self, controller, sock: socket.socket, security: SecuritySection = SecuritySection()):
        import uvicorn

        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(discovery_app(controller, security), host=host, port=port, log_level="warning",
                                lifespan="off", **uvicorn_tls(security))
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
