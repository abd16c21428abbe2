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

Names are checked before anything is signed (L{hostname_problem}): only
names a verifier can match are issued.  RFC 6125 (as tightened by RFC 9525)
allows a wildcard only as the whole left-most label, and this module also
wants at least two labels under it, so C{*.example.com} is issued but not
C{*.com}, C{*.localhost}, C{*}, C{f*.example.com} or C{a.*.example.com}
(C{service_identity} cannot even read most of those, which made an edge
certificate for C{*.localhost} pass any agent's hostname check).  Without
the public suffix list, a wildcard right under a multi-label public suffix
(C{*.co.uk}) is not caught.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AGENT_URI_SCHEME = "tunneld-agent"
# The URI SAN scheme naming an edge of a cluster in its certificate (relay links).
EDGE_URI_SCHEME = "tunneld-edge"
LEAF_DAYS = 365
LEAF_DAYS_MAX = 366
CA_DAYS = 3650

# A DNS label as RFC 1123 has it: letters, digits and inner hyphens, 1-63 long.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def hostname_problem(name: str, ip_allowed: bool = True) -> str | None:
    """
    Why C{name} may not go into a certificate as a hostname (or, with
    C{ip_allowed}, an IP address); None when it may.  See the module's
    docstring for the wildcard rule.
    """
    if not name:
        return "an empty hostname"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if ip_allowed:
            return None
        return f"{name!r}: an IP address, but an agent's hostnames are DNS names"
    if not name.isascii():
        return f"{name!r}: not ASCII; give an internationalised name in its xn-- (IDNA) form"
    if len(name) > 253:
        return f"{name!r}: longer than 253 characters"
    labels = name.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if len(labels) < 2:
            return (
                f"{name!r}: a wildcard must have at least two labels under it "
                "(*.example.com, not *.com or *.localhost)"
            )
    if "*" in ".".join(labels):
        return (
            f"{name!r}: a wildcard may only be the whole left-most label "
            "(*.example.com; not f*.example.com or a.*.example.com)"
        )
    for label in labels:
        if not label:
            return f"{name!r}: an empty label (a leading, trailing or doubled dot)"
        if _LABEL.fullmatch(label) is None:
            return (
                f"{name!r}: label {label!r} is not letters, digits and inner hyphens "
                "(at most 63)"
            )
    if labels[-1].isdigit():
        return f"{name!r}: neither a hostname nor an IP address (its last label is a number)"
    return None


def agent_id_problem(agent_id: str) -> str | None:
    """Why C{agent_id} may not name an agent (it must be one DNS label); None when it may."""
    if _LABEL.fullmatch(agent_id) is None:
        return (
            f"agent id {agent_id!r} must be one DNS label: letters, digits and inner hyphens, "
            "1 to 63 characters"
        )
    return None


def _check_hosts(hosts: list[str], ip_allowed: bool) -> None:
    for host in hosts:
        problem = hostname_problem(host, ip_allowed)
        if problem is not None:
            raise ValueError(problem)

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
    usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier],
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
        .add_extension(
            x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False
        )
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
    """
    A server certificate for the edge, valid for C{hosts} (names or IPs);
    ValueError for a name L{hostname_problem} refuses.
    """
    _check_hosts(hosts, ip_allowed=True)
    return _leaf(
        ca, hosts[0] if hosts else "edge", [_san(h) for h in hosts],
        ExtendedKeyUsageOID.SERVER_AUTH, days, not_before, not_after,
    )


def issue_cluster_edge(
    ca: Issued,
    edge_name: str,
    hosts: list[str],
    days: int = LEAF_DAYS,
) -> Issued:
    """
    An edge's certificate in a cluster: its agent listeners show it (a
    server certificate for C{hosts}) and it dials the other edges' relay
    links with it (a client certificate naming C{tunneld-edge://EDGE_NAME},
    the edge's C{[edge.state] edge_name}).  Signed by the agent CA, which
    the other edges check client certificates against.
    """
    problem = agent_id_problem(edge_name)
    if problem is not None:
        raise ValueError(problem.replace("agent id", "edge name"))
    _check_hosts(hosts, ip_allowed=True)
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"{EDGE_URI_SCHEME}://{edge_name}")
    ]
    names += [_san(h) for h in hosts]
    return _leaf(
        ca, edge_name, names, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days, None, None,
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
    (hostnames or C{*.domain} patterns); ValueError for an id or a name
    this module refuses.
    """
    problem = agent_id_problem(agent_id)
    if problem is not None:
        raise ValueError(problem)
    _check_hosts(hosts, ip_allowed=False)
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


class _Parser(argparse.ArgumentParser):
    """argparse, with the errors it finds in the same words as ours."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"tunneld certs: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tunneld certs", description="Make a private CA and edge/agent certificates."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ca = sub.add_parser("ca", help="create a CA (DIR/ca.pem and DIR/ca.key)")
    ca.add_argument("--dir", default="certs", help="output directory (default: certs)")
    ca.add_argument("--name", default="tunneld agent CA", help="the CA's common name")
    for kind in ("edge", "agent"):
        p = sub.add_parser(kind, help=f"issue an {kind} certificate signed by the CA")
        p.add_argument("--dir", default="certs", help="directory with ca.pem/ca.key and the output")
        p.add_argument(
            "--host", action="append", default=[],
            help="a hostname (or *.domain with at least two labels under the *) the "
                 "certificate covers; repeatable" + ("; or an IP address" if kind == "edge" else ""),
        )
        p.add_argument(
            "--days", type=int, default=LEAF_DAYS,
            help=f"validity in days, 1 to {LEAF_DAYS_MAX} (default: {LEAF_DAYS})",
        )
        if kind == "agent":
            p.add_argument("--id", required=True, help="the agent id (one DNS label)")
        else:
            p.add_argument(
                "--edge-name", default="",
                help="for an edge of a cluster: its [edge.state] edge_name (one DNS label), "
                     "named in the certificate (tunneld-edge://NAME) so that the other edges "
                     "accept its relay links; the CA must be their agent CA",
            )
    show = sub.add_parser("show", help="print a certificate's identity")
    show.add_argument("file")
    return parser


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command's arguments (naming the option), or None."""
    if args.command == "show":
        return None
    if not args.dir:
        return "--dir: an empty directory name"
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        return f"--dir: {args.dir} exists and is not a directory"
    if args.command == "ca":
        name = args.name
        if not name or not name.isprintable() or len(name) > 64:
            return f"--name: the CA's name must be 1 to 64 printable characters, got {name!r}"
        return None
    if not 1 <= args.days <= LEAF_DAYS_MAX:
        return f"--days must be between 1 and {LEAF_DAYS_MAX}, got {args.days}"
    if args.command == "agent":
        problem = agent_id_problem(args.id)
        if problem is not None:
            return f"--id: {problem}"
    if args.command == "edge" and args.edge_name:
        problem = agent_id_problem(args.edge_name)
        if problem is not None:
            return "--edge-name: " + problem.replace("agent id", "edge name")
    if not args.host:
        return "give at least one --host"
    for host in args.host:
        problem = hostname_problem(host, ip_allowed=args.command == "edge")
        if problem is not None:
            return f"--host: {problem}"
    return None


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"tunneld certs: {message}\n")
    return status


def main(argv: list[str]) -> int:
    """C{tunneld certs ...}; returns the exit status (2 for bad arguments, 1 for other failures)."""
    args = _parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem is not None:
        return _fail(problem, 2)
    out = sys.stdout
    if args.command == "show":
        try:
            with open(args.file, "rb") as f:
                certificate = x509.load_pem_x509_certificate(f.read())
        except OSError as e:
            return _fail(f"cannot read {args.file}: {e.strerror or e}")
        except ValueError as e:
            return _fail(f"{args.file} is not a PEM certificate: {e}")
        out.write(describe(certificate) + "\n")
        return 0
    try:
        os.makedirs(args.dir, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create directory {args.dir}: {e.strerror or e}")
    ca_cert, ca_key = os.path.join(args.dir, "ca.pem"), os.path.join(args.dir, "ca.key")
    if args.command == "ca":
        if os.path.exists(ca_key):
            return _fail(f"{ca_key} exists; not overwriting a CA")
        try:
            make_ca(args.name).write(ca_cert, ca_key)
        except OSError as e:
            return _fail(f"cannot write the CA into {args.dir}: {e.strerror or e}")
        out.write(f"wrote {ca_cert} and {ca_key}\n")
        return 0
    try:
        ca = load_issued(ca_cert, ca_key)
    except (OSError, ValueError) as e:
        return _fail(f"cannot load the CA: {e}")
    try:
        if args.command == "edge" and args.edge_name:
            issued = issue_cluster_edge(ca, args.edge_name, args.host, days=args.days)
            stem = f"edge-{args.edge_name}"
        elif args.command == "edge":
            issued = issue_edge(ca, args.host, days=args.days)
            stem = "edge"
        else:
            issued = issue_agent(ca, args.id, args.host, days=args.days)
            stem = f"agent-{args.id}"
    except ValueError as e:  # what the checks above let through, in cryptography's words
        return _fail(f"cannot issue the certificate: {e}")
    cert_path, key_path = os.path.join(args.dir, f"{stem}.pem"), os.path.join(args.dir, f"{stem}.key")
    try:
        issued.write(cert_path, key_path)
    except OSError as e:
        return _fail(f"cannot write {stem}.pem/.key into {args.dir}: {e.strerror or e}")
    out.write(f"wrote {cert_path} and {key_path}\n{describe(issued.certificate)}\n")
    return 0
