"""Certificates for TLS tests, made with the openssl command line (a CA and a server cert)."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA's certificate (what a client trusts)
    cert: Path  # the server's certificate, signed by the CA
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def make_certs(where: Path, names: str = "IP:127.0.0.1,DNS:localhost") -> Certs:
    """A CA and a server certificate for `names` (subjectAltName), valid for a day."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vgate test CA",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=engine", "-keyout", "server.key",
        "-out", "server.csr")  # fmt: skip
    (where / "ext.cnf").write_text(f"subjectAltName={names}\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "server.pem")  # fmt: skip
    return Certs(where / "ca.pem", where / "server.pem", where / "server.key")
