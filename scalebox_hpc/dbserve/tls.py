"""TLS material for a served database: a self-signed CA (made once, its key 0600 beside the
service file) and, at every start, a server certificate for the host the server runs on, signed
by that CA, so clients verify the host name (``sslmode=verify-full``) whichever node serves.

``openssl`` argv (no Python ``cryptography`` in the environment, and OpenSSL is on every
host the wheel's PostgreSQL runs on); the builders are pure, :func:`run` runs them."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from scalebox_hpc.errors import EmbeddedDatabaseError

_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def ca_argv(key: Path, cert: Path, days: int = 3650) -> list[str]:
    """openssl argv making the self-signed CA (key and certificate)."""
    return ["openssl", "req", "-x509", *_CURVE, "-keyout", str(key), "-out", str(cert), "-days", str(days),
            "-subj", "/CN=scalebox served database CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]


def request_argv(key: Path, csr: Path, common_name: str) -> list[str]:
    """openssl argv making the server's key and certificate request."""
    return ["openssl", "req", "-new", *_CURVE, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}"]


def extensions(names: Sequence[str]) -> str:
    """The server certificate's extensions: the host names it is valid for."""
    alt = ",".join(f"DNS:{n}" for n in names)
    return f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"


def sign_argv(csr: Path, ca_key: Path, ca_cert: Path, cert: Path, ext: Path, days: int = 825) -> list[str]:
    """openssl argv signing the request with the CA."""
    return ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", "0x" + _serial(), "-days", str(days), "-extfile", str(ext), "-out", str(cert)]


def _serial() -> str:
    import secrets

    return secrets.token_hex(16)


def run(argv: Sequence[str]) -> None:
    """Run one openssl command; its last stderr line becomes an EmbeddedDatabaseError."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedDatabaseError(f"cannot run openssl: {exc}", hint="install OpenSSL (`openssl`)") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EmbeddedDatabaseError(f"openssl {argv[1]} failed: {tail}")


def make_ca(key: Path, cert: Path) -> None:
    """Create the CA unless it exists (the key 0600)."""
    if key.exists() and cert.exists():
        return
    run(ca_argv(key, cert))
    key.chmod(0o600)
    cert.chmod(0o644)


def make_server_cert(ca_key: Path, ca_cert: Path, key: Path, cert: Path, names: Sequence[str]) -> None:
    """A fresh key and certificate for ``names`` (the first is the common name), signed by the CA."""
    with tempfile.TemporaryDirectory(prefix="sbx-tls-") as tmp:
        csr, ext = Path(tmp) / "server.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions(names))
        run(request_argv(key, csr, names[0]))
        key.chmod(0o600)
        run(sign_argv(csr, ca_key, ca_cert, cert, ext))
