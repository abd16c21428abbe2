# -*- test-case-name: tests.test_identity -*-
"""
C{tunneld certs}: a private CA and the edge and agent certificates it signs.

The quick start needs no openssl incantations, and the tests make their
certificates with the same functions, so what the tests prove is what the
command makes.

Identity convention (see docs/security.md):
  - an agent certificate carries a URI SAN C{tunneld-agent://NAME}: NAME is
    the agent id; its DNS SANs are the hostnames it may serve (C{*.domain}
    wildcards cover one label, as in RFC 6125); extended key usage clientAuth;
  - an edge certificate carries the edge's DNS (or IP) SANs; serverAuth.
Keys are ECDSA P-256; leaf certificates live at most 366 days (the Mozilla
"intermediate" profile's limit), the CA ten years.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AGENT_URI_SCHEME = "tunneld-agent"
LEAF_DAYS = 365
CA_DAYS = 3650

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate."""

    key: PrivateKey
    certificate: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, certificate_path: str, key_path: str) -> None:
        """Write both as PEM; the key readable by its owner only."""
        with open(certificate_path, "wb") as f:
            f.write(self.certificate_pem())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tunneld"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _validity(
    days: int, not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    start = not_before or _now() - datetime.timedelta(minutes=5)
    return start, not_after or start + datetime.timedelta(days=days)


def make_ca(name: str = "tunneld agent CA", days: int = CA_DAYS) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, None, None)
    subject = _name(name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, certificate)


def _leaf(
    ca: Issued,
    common_name: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
) -> Issued:
    if not names:
        raise ValueError("a certificate needs at least one subject alternative name")
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, not_before, not_after)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, certificate)


def issue_edge(
    ca: Issued,
    hosts: list[str],
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A server certificate for the edge, valid for C{hosts} (names or IPs)."""
    return _leaf(
        ca, hosts[0] if hosts else "edge", [_san(h) for h in hosts],
        ExtendedKeyUsageOID.SERVER_AUTH, days, not_before, not_after,
    )


def agent_uri(agent_id: str) -> str:
    """The URI SAN that names agent C{agent_id}."""
    return f"{AGENT_URI_SCHEME}://{agent_id}"


def issue_agent(
    ca: Issued,
    agent_id: str,
    hosts: list[str],
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """
    A client certificate for agent C{agent_id}, allowed to serve C{hosts}
    (hostnames or C{*.domain} patterns).
    """
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(agent_uri(agent_id))]
    names += [x509.DNSName(h) for h in hosts]
    return _leaf(
        ca, agent_id, names, ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before, not_after
    )


def load_issued(certificate_path: str, key_path: str) -> Issued:
    """A CA (or any key pair) from PEM files."""
    with open(certificate_path, "rb") as f:
        certificate = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key")
    return Issued(key, certificate)


def describe(certificate: x509.Certificate) -> str:
    """What a certificate says about identity, in a few lines."""
    lines = [
        f"subject:   {certificate.subject.rfc4514_string()}",
        f"issuer:    {certificate.issuer.rfc4514_string()}",
        f"valid:     {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
        f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
    ]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    prefix = f"{AGENT_URI_SCHEME}://"
    agents = [u[len(prefix):] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
              if u.startswith(prefix)]
    if agents:
        lines.append(f"agent id:  {', '.join(agents)}")
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    if dns or ips:
        lines.append(f"hostnames: {', '.join(dns + ips)}")
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        names = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
                 ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
        lines.append("usage:     " + ", ".join(names.get(o, o.dotted_string) for o in eku))
    except x509.ExtensionNotFound:
        pass
    try:
        basic = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            lines.append("ca:        yes")
    except x509.ExtensionNotFound:
        pass
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunneld certs", description="Make a private CA and edge/agent certificates."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca", help="create a CA (DIR/ca.pem and DIR/ca.key)")
    ca.add_argument("--dir", default="certs", help="output directory (default: certs)")
    ca.add_argument("--name", default="tunneld agent CA", help="the CA's common name")
    for kind in ("edge", "agent"):
        p = sub.add_parser(kind, help=f"issue an {kind} certificate signed by the CA")
        p.add_argument("--dir", default="certs", help="directory with ca.pem/ca.key and the output")
        p.add_argument(
            "--host", action="append", default=[],
            help="a hostname (or *.domain) the certificate covers; repeatable",
        )
        p.add_argument("--days", type=int, default=LEAF_DAYS, help="validity in days")
        if kind == "agent":
            p.add_argument("--id", required=True, help="the agent id")
    show = sub.add_parser("show", help="print a certificate's identity")
    show.add_argument("file")
    return parser


def main(argv: list[str]) -> int:
    """C{tunneld certs ...}; returns the exit status."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    if args.command == "show":
        with open(args.file, "rb") as f:
            out.write(describe(x509.load_pem_x509_certificate(f.read())) + "\n")
        return 0
    os.makedirs(args.dir, exist_ok=True)
    ca_cert, ca_key = os.path.join(args.dir, "ca.pem"), os.path.join(args.dir, "ca.key")
    if args.command == "ca":
        if os.path.exists(ca_key):
            sys.stderr.write(f"tunneld certs: {ca_key} exists; not overwriting a CA\n")
            return 1
        make_ca(args.name).write(ca_cert, ca_key)
        out.write(f"wrote {ca_cert} and {ca_key}\n")
        return 0
    try:
        ca = load_issued(ca_cert, ca_key)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"tunneld certs: cannot load the CA: {e}\n")
        return 1
    if not args.host:
        sys.stderr.write("tunneld certs: give at least one --host\n")
        return 2
    if args.command == "edge":
        issued = issue_edge(ca, args.host, days=args.days)
        stem = "edge"
    else:
        issued = issue_agent(ca, args.id, args.host, days=args.days)
        stem = f"agent-{args.id}"
    cert_path, key_path = os.path.join(args.dir, f"{stem}.pem"), os.path.join(args.dir, f"{stem}.key")
    issued.write(cert_path, key_path)
    out.write(f"wrote {cert_path} and {key_path}\n{describe(issued.certificate)}\n")
    return 0
