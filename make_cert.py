"""Make a self-signed TLS certificate and key for a lab coordinator (one command, any OS).

    python make_cert.py --host 192.168.1.10 --host coordinator.lab [--out-dir certs] [--days 365]

Writes ``coordinator.crt`` (give it to workers and monitors: ``--ca-cert certs/coordinator.crt``) and
``coordinator.key`` (mode 0600; keep it on the coordinator: ``--certfile ... --keyfile ...``). The certificate
names every ``--host`` (IP addresses and DNS names) plus localhost and 127.0.0.1, so clients check that they
reach the right machine. For production, use a certificate from your organisation's CA instead.

The same pair with OpenSSL (1.1.1 or newer)::

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj /CN=fl-coordinator \\
        -addext "subjectAltName=IP:192.168.1.10,IP:127.0.0.1,DNS:localhost" \\
        -keyout coordinator.key -out coordinator.crt
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from utils import program_command, url_host


def make_self_signed(hosts: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``hosts`` (IPs and DNS names); returns (cert PEM, key PEM).

    The certificate is its own CA (basicConstraints CA:TRUE, pathlen 0) so that clients can trust it directly,
    and is valid for server authentication for ``days`` days from one hour ago.

    Raises
    ------
    ValueError
        If ``hosts`` is empty or ``days`` < 1.
    """
    if not hosts or days < 1:
        raise ValueError("need at least one host and days >= 1")
    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-coordinator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_pair(out_dir: str | os.PathLike, hosts: list[str], days: int = 365) -> tuple[Path, Path]:
    """Write ``coordinator.crt`` and ``coordinator.key`` (0600) into ``out_dir``; returns their paths."""
    cert_pem, key_pem = make_self_signed(hosts, days)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "coordinator.crt", out / "coordinator.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert_pem)
    return cert_path, key_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Make a self-signed certificate and key for the coordinator.")
    parser.add_argument("--host", action="append", default=[],
                        help="IP address or DNS name workers use to reach the coordinator (repeat for several; "
                             "localhost and 127.0.0.1 are always included)")
    parser.add_argument("--out-dir", default="certs", help="directory to write into (default: certs)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    parser.add_argument("--force", action="store_true", help="replace an existing pair in --out-dir")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be >= 1")
    existing = [p for p in (Path(args.out_dir) / "coordinator.crt", Path(args.out_dir) / "coordinator.key")
                if p.exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists; workers may trust that certificate already. Pass --force to replace "
              "the pair (every worker then needs the new certificate)", file=sys.stderr)
        return 2
    try:
        cert_path, key_path = write_pair(args.out_dir, args.host + ["localhost", "127.0.0.1"], args.days)
    except OSError as exc:
        print(f"error: cannot write into {args.out_dir}: {exc}", file=sys.stderr)
        return 2
    host = url_host(args.host[0]) if args.host else "HOST"
    print(f"wrote {cert_path} and {key_path} (valid {args.days} days for {', '.join(args.host) or 'localhost'})\n"
          f"coordinator: {program_command('coordinator.py')} --certfile {cert_path} --keyfile {key_path}\n"
          f"workers:     {program_command('worker.py')} --coordinator-address https://{host}:PORT "
          f"--ca-cert {cert_path} ...\n(the key never leaves this host; copy only the .crt to the workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
