"""The `security` section turned into each side's credentials: the workers' ServerSecurity, the routers'
and k2serve commands' ClientSecurity, and TLS with token checks for the controller's discovery port."""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path

from fastapi import HTTPException, Request

from k2serve.cluster.config import SecuritySection
from k2serve.router.pool.security import ClientSecurity
from k2serve.worker.security import ServerSecurity


def server_security(section: SecuritySection) -> ServerSecurity | None:
    """A worker's credentials, read from the files on the host it runs on (None: plaintext)."""
    if not section.tls:
        return None
    token = section.token_file if section.client_auth == "token" else None
    return ServerSecurity.from_files(section.cert_file, section.key_file, section.client_auth, section.ca_file, token)


def client_security(section: SecuritySection) -> ClientSecurity | None:
    """A router's (or command's) credentials for the workers and the controller (None: plaintext)."""
    if not section.tls:
        return None
    if section.client_auth == "mtls":
        return ClientSecurity.from_files(section.ca_file, section.server_name, cert_file=section.cert_file,
                                         key_file=section.key_file)
    return ClientSecurity.from_files(section.ca_file, section.server_name, token_file=section.token_file)


def discovery_scheme(section: SecuritySection) -> str:
    return "https" if section.tls else "http"


def uvicorn_tls(section: SecuritySection) -> dict:
    """uvicorn.Config arguments for the discovery port: TLS, and client certificates with mtls."""
    if not section.tls:
        return {}
    kwargs = dict(ssl_certfile=section.cert_file, ssl_keyfile=section.key_file)
    if section.client_auth == "mtls":
        kwargs.update(ssl_ca_certs=section.ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return kwargs


def token_check(section: SecuritySection):
    """A FastAPI dependency answering 401 unless the request carries the shared token (None: no check)."""
    if not section.tls or section.client_auth != "token":
        return None
    expected = f"Bearer {Path(section.token_file).read_text().strip()}".encode()

    def check(request: Request) -> None:
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise HTTPException(401, "missing or wrong token")
    return check
