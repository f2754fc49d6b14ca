"""Shared fixtures: a real engine on free ports with the shipped configuration."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "hl7"
PG_URL = os.environ.get("ENGINE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_reachable() -> bool:
    try:
        eng = sqlalchemy.create_engine(PG_URL)
        with eng.connect():
            pass
        eng.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_available() -> bool:
    return postgres_reachable()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on SQLite and on PostgreSQL (a schema of its own per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'engine.db'}"
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres, database test)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


def engine_env(tmp_path: Path, storage_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ENGINE_STORAGE_URL": storage_url or f"sqlite:///{tmp_path / 'engine.db'}",
        "ORDERS_MLLP_PORT": "0",
        "RESULTS_MLLP_PORT": "0",
        "DICOM_PORT": "0",
        "HTTP_PORT": "0",
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"),
        "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "MEDS_ARCHIVE_DIR": str(tmp_path / "meds-archive"),
    })
    return env


@pytest.fixture
async def running_engine(tmp_path: Path) -> AsyncIterator[object]:
    """The shipped engine.yaml and channels, started in-process on free ports."""
    from engine.runtime.app import EngineApp, default_registry
    from engine.runtime.config import load_config

    registry = default_registry()
    loaded = load_config(ROOT / "engine.yaml", registry, env=engine_env(tmp_path))
    app = EngineApp(loaded, registry)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


class EngineProcess:
    """`engine run` in a subprocess with the shipped configuration on free ports."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.orders_port, self.results_port, self.dicom_port = free_port(), free_port(), free_port()
        self.env = engine_env(tmp_path)
        self.env.update({
            "ORDERS_MLLP_PORT": str(self.orders_port),
            "RESULTS_MLLP_PORT": str(self.results_port),
            "DICOM_PORT": str(self.dicom_port),
            "ENGINE_LOG_LEVEL": "WARNING",
        })
        self.log = tmp_path / "engine.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:  # a file, not a pipe: a full pipe would stall the engine
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "run", "-c", str(ROOT / "engine.yaml")],
                env=self.env, stdout=out, stderr=out,
            )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.results_port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text(errors="replace")) from None
                time.sleep(0.1)
        raise RuntimeError("engine did not start")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "engine", *args], env=self.env, capture_output=True,
                                text=True, timeout=120, cwd=ROOT)
        if check and result.returncode != 0:
            shown = " ".join(args)
            raise AssertionError(f"engine {shown} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def engine_process(tmp_path: Path) -> Iterator[EngineProcess]:
    proc = EngineProcess(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def env_for(tmp_path: Path):  # noqa: ANN201
    """engine_env for tests that pick their own storage URL."""
    return lambda storage_url=None: engine_env(tmp_path, storage_url)


# -- a test PKI (certificates made at test time; no keys are committed) --------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _make_ca(path: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(path, cert, key)
    return cert, key


def _make_leaf(path: Path, cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    _write(path, builder.sign(ca_key, hashes.SHA256()), key)


class Pki:
    def __init__(self, root: Path) -> None:
        ca = _make_ca(root / "ca", "Test MLLP CA")
        rogue = _make_ca(root / "rogue-ca", "Rogue CA")
        _make_leaf(root / "server", "localhost", ca, server=True)
        _make_leaf(root / "client", "ris.example", ca, server=False)
        _make_leaf(root / "rogue-client", "intruder", rogue, server=False)
        self.root = root

    def p(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))
