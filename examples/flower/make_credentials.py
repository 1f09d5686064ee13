"""Credentials for a Flower deployment with TLS and authenticated SuperNodes, made locally (no openssl needed).

Writes into `--out_dir`:
- `ca.crt`: a self-made certificate authority. Every SuperNode and the `flwr` CLI get it (`--root-certificates`,
  `root-certificates` in `$FLWR_HOME/config.toml`) to check the SuperLink's certificate.
- `server.pem` / `server.key`: the SuperLink's TLS certificate for `--hosts` (IP addresses or DNS names), signed by
  that CA (`flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`).
- `node<i>.key` / `node<i>.pub` for i < `--nodes`: each SuperNode's key pair (ECDSA on NIST P-384, OpenSSH
  format, as Flower wants). The public key is registered with the SuperLink (`flwr supernode register
  node<i>.pub`); the private key stays with that SuperNode (`--auth-supernode-private-key node<i>.key`). With
  `--enable-supernode-auth` the SuperLink refuses a SuperNode whose key was not registered.

For a real federation each site makes its own node key pair and sends only the `.pub` file, and the CA is your
organisation's (or the certificate comes from a public CA): this script is for a test or a first deployment.
Private keys are written readable by their owner only; existing files are never overwritten.

    python examples/flower/make_credentials.py --out_dir .flwr/credentials --hosts 127.0.0.1 --nodes 2
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CURVE = ec.SECP384R1  # a NIST curve: Flower refuses SuperNode keys on other curves


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Create the file (never overwrite), private keys with mode 0600 from the start."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def make_credentials(out_dir: str | Path, hosts: list[str], nodes: int, days: int = 365) -> dict[str, Path]:
    """Write the CA, the SuperLink's certificate and key, and `nodes` SuperNode key pairs; returns their paths."""
    if not hosts:
        raise ValueError("hosts: name at least one IP address or DNS name the SuperNodes will connect to")
    if nodes < 0:
        raise ValueError(f"nodes must be 0 or more, got {nodes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "server.pem", "server.key"] + [f"node{i}.{ext}" for i in range(nodes) for ext in ("key", "pub")]
    existing = [name for name in names if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out} already holds {existing}: move them away (a new key locks out registered nodes)")

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days)}
    ca_key = ec.generate_private_key(CURVE())
    ca = (
        x509.CertificateBuilder(
            subject_name=_name("hf-fedlora federation CA"), issuer_name=_name("hf-fedlora federation CA")
        )
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(CURVE())
    server = (
        x509.CertificateBuilder(subject_name=_name(hosts[0]), issuer_name=ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName([_subject_alternative_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "server.pem", server.public_bytes(pem))
    _write(
        out / "server.key",
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        private=True,
    )
    for index in range(nodes):
        key = ec.generate_private_key(CURVE())
        _write(
            out / f"node{index}.key",
            key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            private=True,
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / f"node{index}.pub", public + b"\n")
    return {name: out / name for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="Folder for the files (created; existing files are kept).")
    parser.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="The SuperLink's addresses.")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make.")
    parser.add_argument("--days", type=int, default=365, help="Validity of the certificates.")
    args = parser.parse_args(argv)
    try:
        paths = make_credentials(args.out_dir, args.hosts, args.nodes, args.days)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    main()
