"""ClientSecurity: how a router (or the k2serve CLI) reaches worker groups and the controller when they
require it: TLS verified against the cluster's CA and the name their certificate carries, plus a shared
token sent as `authorization: Bearer <token>` or a client certificate (mTLS).

Workers listen on addresses that change (pod IPs), so the certificate is checked against `server_name`,
not the address dialled: gRPC through `grpc.ssl_target_name_override`, HTTP through the SNI host name.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class ClientSecurity:
    """The CA bundle (PEM), the server name to verify, and this client's credentials: `token` and/or a PEM
    certificate and key (mTLS)."""

    ca_pem: bytes
    server_name: str
    token: str | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    @classmethod
    def from_files(cls, ca_file: str, server_name: str, token_file: str | None = None, cert_file: str | None = None,
                   key_file: str | None = None) -> "ClientSecurity":
        """Read the files (e.g. a mounted Kubernetes Secret); the token's surrounding blanks are dropped."""
        return cls(Path(ca_file).read_bytes(), server_name,
                   Path(token_file).read_text().strip() if token_file else None,
                   Path(cert_file).read_bytes() if cert_file else None,
                   Path(key_file).read_bytes() if key_file else None)

    def grpc_channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """A TLS channel to `address` that presents this client's credentials on every call."""
        credentials = grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)
        if self.token:
            credentials = grpc.composite_channel_credentials(credentials,
                                                             grpc.access_token_call_credentials(self.token))
        options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS to the controller: the CA, and this client's certificate when it has one."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        if self.cert_pem is not None:
            _load_cert_chain(context, self.cert_pem, self.key_pem)
        return context

    def http_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def http_extensions(self) -> dict[str, str]:
        """Per-request httpx extensions: verify the certificate against `server_name`."""
        return {"sni_hostname": self.server_name}


def _load_cert_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes | None) -> None:
    """ssl loads a certificate chain only from files: write them to a private temporary directory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem or b"")
        key.chmod(0o600)
        context.load_cert_chain(cert, key if key_pem else None)
