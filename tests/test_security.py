"""The worker port and the discovery port take only authenticated clients, with real certificates made here:
TLS plus a shared token or client certificates (mTLS); plaintext, no token, a wrong token, an unknown CA,
a wrong server name or a missing client certificate are refused. The cluster config's `security` section
reaches the router's pool, the discovery server and a worker group on Ray."""

from __future__ import annotations

import asyncio
import datetime
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from k2serve.cluster.config import ClusterConfig, SecuritySection
from k2serve.cluster.discovery import DiscoveryServer
from k2serve.cluster.router_service import build_pool
from k2serve.cluster.security import client_security, server_security
from k2serve.router.pool.discovery import DiscoveryError, HttpDiscovery, StaticDiscovery
from k2serve.router.pool.security import ClientSecurity
from k2serve.router.pool.worker import Finished, GenerateParams, WorkerError
from k2serve.router.pool.worker_client import WorkerClient
from k2serve.worker.server import serve_worker
from test_server import INFO, FakeEngine

TOKEN = "s3cret-token"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, name: str = "k2serve"):
    """A certificate for `name` (and nothing else: clients must verify the name, not 127.0.0.1), usable by
    servers and clients, as one Kubernetes Secret gives every k2serve process."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write(directory: Path, prefix: str, key, cert) -> tuple[str, str]:
    (directory / f"{prefix}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{prefix}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))
    return str(directory / f"{prefix}.crt"), str(directory / f"{prefix}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """ca.crt, tls.crt/key (signed by it), rogue.crt/key (a CA nobody trusts, and a cert it signed), token."""
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca("k2serve-ca"), make_ca("rogue-ca")
    (d / "ca.crt").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    (d / "rogue-ca.crt").write_bytes(rogue[1].public_bytes(serialization.Encoding.PEM))
    files = {"ca": str(d / "ca.crt"), "rogue_ca": str(d / "rogue-ca.crt")}
    files["cert"], files["key"] = write(d, "tls", *issue(ca))
    files["rogue_cert"], files["rogue_key"] = write(d, "rogue", *issue(rogue))
    (d / "token").write_text(TOKEN + "\n")
    files["token"] = str(d / "token")
    return files


def section(pki, client_auth: str = "token") -> SecuritySection:
    return SecuritySection(tls=True, client_auth=client_auth, ca_file=pki["ca"], cert_file=pki["cert"],
                           key_file=pki["key"], token_file=pki["token"])


def read(path: str) -> bytes:
    return Path(path).read_bytes()


async def works(client: WorkerClient) -> bool:
    """Whether a request through `client` is served (and its health check answers SERVING)."""
    try:
        items = [item async for item in client.generate(GenerateParams("r", (1, 2), max_tokens=2))]
        return isinstance(items[-1], Finished) and await client.health(timeout=2)
    except WorkerError:
        return False
    finally:
        await client.close()


def with_worker(security_section: SecuritySection, clients: dict[str, ClientSecurity | None]) -> dict[str, bool]:
    async def main():
        server = await serve_worker(FakeEngine(), "127.0.0.1", 0, INFO, server_security(security_section))
        try:
            address = f"127.0.0.1:{server.k2serve_port}"
            return {name: await works(WorkerClient(address, sec)) for name, sec in clients.items()}
        finally:
            await server.stop(0)
    return asyncio.run(main())


def test_the_worker_port_takes_only_clients_with_the_token(pki):
    ca = read(pki["ca"])
    outcome = with_worker(section(pki), {
        "token": ClientSecurity(ca, "k2serve", token=TOKEN),
        "plaintext": None,
        "no token": ClientSecurity(ca, "k2serve"),
        "wrong token": ClientSecurity(ca, "k2serve", token="guess"),
        "unknown CA": ClientSecurity(read(pki["rogue_ca"]), "k2serve", token=TOKEN),
        "wrong server name": ClientSecurity(ca, "someone-else", token=TOKEN),
    })
    assert outcome == {"token": True, "plaintext": False, "no token": False, "wrong token": False,
                       "unknown CA": False, "wrong server name": False}


def test_the_worker_port_with_mtls_takes_only_certificates_the_ca_signed(pki):
    ca = read(pki["ca"])
    outcome = with_worker(section(pki, "mtls"), {
        "signed": ClientSecurity(ca, "k2serve", cert_pem=read(pki["cert"]), key_pem=read(pki["key"])),
        "no certificate": ClientSecurity(ca, "k2serve"),
        "token only": ClientSecurity(ca, "k2serve", token=TOKEN),
        "rogue certificate": ClientSecurity(ca, "k2serve", cert_pem=read(pki["rogue_cert"]),
                                            key_pem=read(pki["rogue_key"])),
    })
    assert outcome == {"signed": True, "no certificate": False, "token only": False, "rogue certificate": False}


def test_the_config_section_needs_its_files():
    with pytest.raises(ValueError, match="token_file"):
        SecuritySection(tls=True, ca_file="a", cert_file="b", key_file="c")
    SecuritySection(tls=True, client_auth="mtls", ca_file="a", cert_file="b", key_file="c")
    assert client_security(SecuritySection()) is None and server_security(SecuritySection()) is None


def test_the_routers_pool_reaches_a_tls_worker_with_the_configs_credentials(pki):
    config = ClusterConfig(security=section(pki))

    async def main():
        server = await serve_worker(FakeEngine(), "127.0.0.1", 0, INFO, server_security(config.security))
        pool = build_pool(config, StaticDiscovery([("g0", f"127.0.0.1:{server.k2serve_port}")])).start()
        try:
            await pool.wait_discovered()
            return [item async for item in pool.generate(GenerateParams("p", (1, 2), max_tokens=3))]
        finally:
            await pool.close()
            await server.stop(0)
    assert isinstance(asyncio.run(main())[-1], Finished)


class OneGroup:
    def status(self):
        return [{"name": "g0", "address": "127.0.0.1:5", "healthy": True, "generation": 1}]


@pytest.mark.parametrize("client_auth", ["token", "mtls"])
def test_the_discovery_port_takes_only_authenticated_routers(pki, client_auth):
    security = section(pki, client_auth)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DiscoveryServer(OneGroup(), sock, security).start()

    async def fetch(url, sec):
        source = HttpDiscovery(url, timeout_s=5, security=sec)
        try:
            return [g.name for g in await source.fetch()]
        except DiscoveryError as exc:
            return str(exc)
        finally:
            await source.close()

    try:
        assert wait_serving(port)
        https = f"https://127.0.0.1:{port}"
        assert asyncio.run(fetch(https, client_security(security))) == ["g0"]
        assert "cannot read" in asyncio.run(fetch(f"http://127.0.0.1:{port}", None))
        assert "cannot read" in asyncio.run(fetch(https, ClientSecurity(read(pki["rogue_ca"]), "k2serve", TOKEN)))
        refused = asyncio.run(fetch(https, ClientSecurity(read(pki["ca"]), "k2serve")))
        assert ("401" if client_auth == "token" else "cannot read") in refused  # mtls: no handshake at all
    finally:
        server.stop()


def wait_serving(port: int, timeout_s: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def test_a_worker_group_on_ray_serves_tls_from_the_config(ray_session, tiny_model_dir, pki):
    from k2serve.cluster.config import GroupSection
    from k2serve.cluster.group import WorkerGroup
    from k2serve.cluster.rank_actor import ServeSpec
    from k2serve.worker.config import EngineConfig

    security = section(pki)
    group = WorkerGroup(GroupSection(name="tls", tp=1, ep=1), str(tiny_model_dir),
                        EngineConfig(num_kv_blocks=32, block_size=16)).start()
    try:
        address = group.serve(ServeSpec(security=security))

        async def both():
            return (await works(WorkerClient(address, client_security(security))),
                    await works(WorkerClient(address)))
        assert asyncio.run(both()) == (True, False)
    finally:
        group.stop(None)


def test_k2serve_restart_through_a_tls_discovery_port(pki, tmp_path, capsys):
    """`k2serve restart` reads the config's security section: https, the CA and the token."""
    import yaml

    from k2serve.cluster.cli import main
    from test_controller import make

    controller, _, _ = make()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DiscoveryServer(controller, sock, section(pki)).start()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"security": section(pki).model_dump()}))
    try:
        assert wait_serving(port)
        url = f"https://127.0.0.1:{port}"
        assert main(["restart", "--config", str(config), "--discovery", url, "--wait", "--timeout", "60"]) == 0
        assert {e.generation for e in controller.endpoints()} == {2}
        assert main(["restart", "--discovery", url]) == 1  # no CA: the controller's certificate is not trusted
        (tmp_path / "guess").write_text("guess")
        wrong = {**section(pki).model_dump(), "token_file": str(tmp_path / "guess")}
        config.write_text(yaml.safe_dump({"security": wrong}))
        assert main(["restart", "--config", str(config), "--discovery", url]) == 1
        assert "401" in capsys.readouterr().err and {e.generation for e in controller.endpoints()} == {2}
    finally:
        server.stop()
        controller.stop()
