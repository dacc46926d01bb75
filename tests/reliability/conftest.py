"""Fixtures of the reliability suite: short socket dirs, a throwaway CA and server certificate, and
processes (store, worker) with their output in log files shown when a test fails."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


class Proc:
    """A server subprocess with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        full_env.pop("NOTIFY_SOCKET", None)
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, address: str, timeout_s: float = START_TIMEOUT_S) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}:\n{self.output()[-3000:]}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:  # SERVING
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        pytest.fail(f"{self.name} not SERVING within {timeout_s} s:\n{self.output()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._out.close()
        return rc


def store_cmd(pack: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "expert_store", "serve", str(pack), "--listen", address, "--formats", "int4",
            "--grace-s", "1", *extra]


def worker_cmd(store: str, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpu_worker", "serve", "--store", store, "--listen", address, "--device", "cpu",
            "--format", "int4", "--grace-s", "2", *extra]


@pytest.fixture
def sock_dir():
    d = Path(tempfile.mkdtemp(prefix="fm-rel-"))  # short: unix socket paths are limited to ~100 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("fate-moe test CA")).issuer_name(name("fate-moe test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder().subject_name(name("fate-moe test client")).issuer_name(ca.subject)
              .public_key(client_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .sign(ca_key, hashes.SHA256()))
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "token": d / "token",
             "client_cert": d / "client.pem", "client_key": d / "client.key"}
    files["client_cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    files["client_key"].write_bytes(client_key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    files["token"].write_text("s3cret-token-for-tests\n")
    return files
