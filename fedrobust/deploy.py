"""Credentials for a real deployment: a CA and SuperLink TLS certificate, SuperNode key pairs.

Written with ``cryptography`` (a Flower dependency) so no openssl binary is
needed. The SuperLink certificate names every host SuperNodes and the
``flwr`` CLI will dial (``localhost``/``127.0.0.1`` by default, plus
``--host``). SuperNode keys are ECDSA P-384 in OpenSSH format, the format
``flwr supernode register`` and ``flower-supernode
--auth-supernode-private-key`` expect. Nothing existing is overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .atomic import write_text
from .config import ConfigError

__all__ = ["make_certificates", "make_supernode_keys"]

DAYS = 365


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrobust"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(f"out_dir: {existing[0]} already exists; choose another folder (nothing was overwritten)")


def make_certificates(out_dir: str | Path, hosts: list[str] | tuple[str, ...] = ()) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` for the SuperLink; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / k for k in ("ca.crt", "ca.key", "server.pem", "server.key")}
    _refuse_existing(list(paths.values()))
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedrobust CA")).issuer_name(_name("fedrobust CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in ["localhost", "127.0.0.1", "::1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(paths["ca.crt"], ca.public_bytes(pem))
    _write(paths["ca.key"], ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(paths["server.pem"], cert.public_bytes(pem))
    _write(paths["server.key"], key.private_bytes(pem, pkcs8, none), private=True)
    return paths


def make_supernode_keys(out_dir: str | Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """One ECDSA P-384 key pair per SuperNode name: ``NAME`` (private, OpenSSH) and ``NAME.pub``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = {n: (out / n, out / f"{n}.pub") for n in names}
    _refuse_existing([p for pair in pairs.values() for p in pair])
    for name, (priv, pub) in pairs.items():
        key = ec.generate_private_key(ec.SECP384R1())
        _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(pub, public + f" {name}\n".encode())
    return pairs


# ------------------------------------------------------------------ launchers --
def _need_file(key: str, path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: {p} not found")
    return str(p.resolve())


def superlink_argv(certs: str | None, *, port: int = 8000, bind: str = "127.0.0.1", database: str | None = None,
                   log_file: str | None = None, insecure: bool = False, node_auth: bool = True) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (only registered keys may connect)."""
    argv = ["flower-superlink", "--host", bind, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs:
        d = Path(certs)
        argv += ["--ssl-ca-certfile", _need_file("--certs", d / "ca.crt"),
                 "--ssl-certfile", _need_file("--certs", d / "server.pem"),
                 "--ssl-keyfile", _need_file("--certs", d / "server.key")]
        if node_auth:
            argv.append("--enable-supernode-auth")
    elif insecure:
        argv.append("--insecure")
    else:
        raise ConfigError("--certs: required (a folder from `fedrobust deploy certs`); "
                          "pass --insecure to run without TLS and without SuperNode authentication")
    if database:
        argv += ["--database", str(Path(database).expanduser().resolve())]
    if log_file:
        argv += ["--log-file", str(Path(log_file).expanduser().resolve())]
    return argv


def supernode_argv(superlink: str, partition_id: int, num_partitions: int, *, ca: str | None = None,
                   key: str | None = None, data_root: str | None = None, port: int = 9094,
                   insecure: bool = False) -> list[str]:
    """``flower-supernode`` for one shard: TLS (``ca``), its authentication key, and its node config."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"--partition-id: must be in [0, {num_partitions}), got {partition_id}")
    argv = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    if ca:
        argv += ["--root-certificates", _need_file("--ca", ca)]
        if key:
            argv += ["--auth-supernode-private-key", _need_file("--key", key)]
    elif insecure:
        argv.append("--insecure")
    else:
        raise ConfigError("--ca: required (the CA certificate from `fedrobust deploy certs`); "
                          "pass --insecure to connect without TLS")
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_root:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--data-root: {root} is not a folder")
        node_config += f' data-root="{root.resolve()}"'
    argv += ["--node-config", node_config]
    return argv


def write_connection(name: str, address: str, ca: str | None, *, insecure: bool = False) -> Path:
    """Add or replace ``[superlink.NAME]`` in the flwr CLI's config ($FLWR_HOME/config.toml)."""
    import tomli
    import tomli_w
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
    from flwr.supercore.utils import get_flwr_home

    entry: dict = {"address": address}
    if ca:
        entry["root-certificates"] = _need_file("--ca", ca)
    elif insecure:
        entry["insecure"] = True
    else:
        raise ConfigError("--ca: required; pass --insecure for a SuperLink without TLS")
    path = Path(get_flwr_home()) / "config.toml"
    try:
        doc = tomli.loads(path.read_text() if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML)  # flwr's own default file
    except (tomli.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc}); fix or move it (nothing was changed)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.setdefault("superlink", {})[name] = entry
    write_text(path, tomli_w.dumps(doc))
    return path
