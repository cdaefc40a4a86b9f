"""ServerSecurity: who may use a worker's gRPC port. TLS always, plus a shared token or client certificates.

The worker port runs models for whoever connects: on a network it must accept only routers (and the
k2serve CLI). With security on, the port speaks TLS with the worker's certificate, and every call must
either carry the shared token as `authorization: Bearer <token>` metadata (mode "token") or come over a
connection whose client certificate the CA signed (mode "mtls", checked in the TLS handshake). Calls
without it end UNAUTHENTICATED before reaching the servicer, the health service included (probes use
rank 0's plain-HTTP metrics port instead).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

CLIENT_AUTH = ("token", "mtls")


@dataclass(frozen=True)
class ServerSecurity:
    """PEM certificate and key the server presents, the CA that signs clients' certificates (mtls) and the
    token clients must send (token)."""

    cert_pem: bytes
    key_pem: bytes
    client_auth: str = "token"
    ca_pem: bytes | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.client_auth not in CLIENT_AUTH:
            raise ValueError(f"client_auth must be one of {CLIENT_AUTH}, got {self.client_auth!r}")
        if self.client_auth == "mtls" and not self.ca_pem:
            raise ValueError("client_auth mtls needs the CA that signs the clients' certificates")
        if self.client_auth == "token" and not self.token:
            raise ValueError("client_auth token needs a non-empty token")

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, client_auth: str = "token", ca_file: str | None = None,
                   token_file: str | None = None) -> "ServerSecurity":
        """Read the PEM files (e.g. a mounted Kubernetes Secret) and the token file (surrounding blanks dropped)."""
        return cls(Path(cert_file).read_bytes(), Path(key_file).read_bytes(), client_auth,
                   Path(ca_file).read_bytes() if ca_file else None,
                   Path(token_file).read_text().strip() if token_file else None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=self.client_auth == "mtls")

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.client_auth == "token" else []


class TokenCheck(grpc.aio.ServerInterceptor):
    """Ends every call whose `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusing(handler)

    def _authorized(self, metadata) -> bool:
        sent = next((value for key, value in metadata if key == "authorization"), "")
        sent = sent.encode() if isinstance(sent, str) else sent
        return hmac.compare_digest(sent, self._expected)


async def _refuse(request, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses the call."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
