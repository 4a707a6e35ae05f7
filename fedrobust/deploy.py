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
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .atomic import write_text
from .errors import ConfigError, one_line

__all__ = ["RunFailed", "follow_run", "make_certificates", "make_supernode_keys", "submit_run", "superlink_argv",
           "supernode_argv", "write_connection"]

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


def _need_certificate(key: str, path: str | Path) -> str:
    """A PEM certificate (``ca.crt``), not a key or another file."""
    found = _need_file(key, path)
    try:
        x509.load_pem_x509_certificate(Path(found).read_bytes())
    except ValueError:
        raise ConfigError(f"{key}: {path} is not a PEM certificate; pass ca.crt from `fedrobust deploy certs`") from None
    return found


def _need_private_key(key: str, path: str | Path) -> str:
    """An unencrypted OpenSSH ECDSA private key, which ``flower-supernode`` loads (not its ``.pub``)."""
    found = _need_file(key, path)
    data = Path(found).read_bytes()
    if data.startswith(b"ecdsa-sha2-") or data.startswith(b"ssh-"):
        raise ConfigError(f"{key}: {path} is a public key; pass the private key (the same name without .pub)")
    try:
        private = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: encrypted with a passphrase
        raise ConfigError(f"{key}: {path} is not an unencrypted OpenSSH private key ({_first_line(exc)}); "
                          "write one with `fedrobust deploy keys`") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key}: {path} is not an ECDSA key (Flower's SuperNode authentication needs one); "
                          "write one with `fedrobust deploy keys`")
    return found


def _squash(text: str) -> str:
    return one_line(text)


def _first_line(exc: BaseException) -> str:
    return _squash(str(exc)) or type(exc).__name__


def _on_path(program: str) -> str:
    if shutil.which(program) is None:
        raise ConfigError(f"{program}: not found on PATH; activate the environment Flower is installed in "
                          "(e.g. `. .venv/bin/activate`)")
    return program


def _one_of(flag: str, given: bool, insecure: bool) -> None:
    if given and insecure:
        raise ConfigError(f"{flag} and --insecure: give one, not both ({flag} for TLS, --insecure for none)")


def superlink_argv(certs: str | None, *, port: int = 8000, bind: str = "127.0.0.1", database: str | None = None,
                   log_file: str | None = None, insecure: bool = False, node_auth: bool = True) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (only registered keys may connect)."""
    _one_of("--certs", bool(certs), insecure)
    argv = [_on_path("flower-superlink"), "--host", bind, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs:
        d = Path(certs)
        argv += ["--ssl-ca-certfile", _need_certificate("--certs", d / "ca.crt"),
                 "--ssl-certfile", _need_certificate("--certs", d / "server.pem"),
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
    """``flower-supernode`` for one shard: TLS (``ca``), its authentication key, and its node config.

    ``ca`` and ``key`` go together: ``fedrobust deploy superlink --certs`` always authenticates
    SuperNodes, and an ``--insecure`` one authenticates none (Flower authenticates over TLS only).
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"--partition-id: must be in [0, {num_partitions}), got {partition_id}")
    _one_of("--ca", bool(ca), insecure)
    if key and not ca:
        raise ConfigError("--key: needs --ca (SuperNode authentication runs over TLS; "
                          "a SuperLink started with --insecure authenticates no SuperNode)")
    if ca and not key:
        raise ConfigError("--key: required with --ca (a SuperLink started with --certs admits registered "
                          "SuperNode keys only); pass this SuperNode's private key from `fedrobust deploy keys`")
    argv = [_on_path("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if ca and key:
        argv += ["--root-certificates", _need_certificate("--ca", ca),
                 "--auth-supernode-private-key", _need_private_key("--key", key)]
    elif insecure:
        argv.append("--insecure")
    else:
        raise ConfigError("--ca: required (the CA certificate from `fedrobust deploy certs`, with --key); "
                          "pass --insecure to connect without TLS")
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_root:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--data-root: {root} is not a folder")
        node_config += f' data-root="{root.resolve()}"'
    argv += ["--node-config", node_config]
    return argv


def _flwr_config() -> tuple[Path, dict]:
    """The flwr CLI's config file ($FLWR_HOME/config.toml) and its content (flwr's default if there is none)."""
    import tomli
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
    from flwr.supercore.utils import get_flwr_home

    path = Path(get_flwr_home()) / "config.toml"
    try:
        return path, tomli.loads(path.read_text() if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML)
    except (tomli.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML file ({exc}); fix or move it (nothing was changed)") from None


def write_connection(name: str, address: str, ca: str | None, *, insecure: bool = False) -> Path:
    """Add or replace ``[superlink.NAME]`` in the flwr CLI's config ($FLWR_HOME/config.toml)."""
    import tomli_w

    _one_of("--ca", bool(ca), insecure)
    entry: dict = {"address": address}
    if ca:
        entry["root-certificates"] = _need_certificate("--ca", ca)
    elif insecure:
        entry["insecure"] = True
    else:
        raise ConfigError("--ca: required; pass --insecure for a SuperLink without TLS")
    path, doc = _flwr_config()
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.setdefault("superlink", {})[name] = entry
    write_text(path, tomli_w.dumps(doc))
    return path


# ---------------------------------------------------------------------- runs --
class RunFailed(RuntimeError):
    """The SuperLink refused a run, or reports it finished other than ``finished:completed``."""


def _flwr(args: list[str], *, what: str, timeout: float | None = 300) -> dict:
    """One ``flwr ... --format json`` command (an argument list, no shell): its JSON answer."""
    argv = [_on_path("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"{what}: `{shlex.join(argv)}` gave no answer in {timeout:.0f}s") from None
    try:  # rich prints it indented, over several lines
        answer = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{"):])[0]
    except ValueError:
        answer = {"success": False, "error-message": (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"}
    if done.returncode != 0 or not answer.get("success"):
        raise RunFailed(f"{what}: {_squash(answer.get('error-message', ''))[:500]}")
    return answer


def submit_run(connection: str, overrides: Sequence[str], run_dir: str | None = None, app: str | Path = ".") -> int:
    """``flwr run APP CONNECTION`` with ``overrides`` (and ``run-dir``) as the run config; the run id.

    The run config travels in a TOML file, so any override (quotes, spaces) arrives as written;
    the ServerApp splits ``overrides`` with :func:`shlex.split`."""
    import tomli_w

    path, doc = _flwr_config()
    if not isinstance(doc.get("superlink", {}).get(connection), dict):
        raise ConfigError(f"connection: no [superlink.{connection}] in {path}; add it with "
                          f"`fedrobust deploy connection {connection} --address HOST:PORT --ca ca.crt`")
    app_dir = Path(app).expanduser()
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"--app: {app_dir} holds no pyproject.toml; run from the fedrobust repository or pass --app")
    config = {"overrides": shlex.join(overrides), "run-dir": run_dir or ""}
    with tempfile.TemporaryDirectory(prefix="fedrobust-run-") as tmp:
        path = Path(tmp) / "run-config.toml"
        path.write_text(tomli_w.dumps(config))
        answer = _flwr(["run", str(app_dir.resolve()), connection, "--run-config", str(path)],
                       what=f"flwr run (connection {connection})")
    return int(answer["run-id"])


def follow_run(connection: str, run_id: int, *, settle_s: float = 30.0) -> str:
    """Stream the run's log to stdout (``flwr log --stream``) until it finishes; its final status.

    Raises :class:`RunFailed` unless the status is ``finished:completed``, with the SuperLink's
    reason (for a ServerApp that raised: ``ServerApp failed with exception: ...``)."""
    argv = [_on_path("flwr"), "log", str(run_id), connection, "--stream"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line as it comes, into a file or pipe too
    streamed = subprocess.run(argv, stderr=subprocess.PIPE, text=True, env=env)  # the log goes to our stdout
    deadline = time.monotonic() + settle_s
    while True:  # the stream ends when the run finishes; a dropped stream leaves it running
        run = _flwr(["ls", connection, "--run-id", str(run_id)], what=f"flwr ls (run {run_id})")["runs"][0]
        status, details = run.get("status", ""), _squash(run.get("status-details", ""))
        if status.startswith("finished") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if status == "finished:completed":
        return status
    if not status.startswith("finished"):
        lost = _squash(streamed.stderr.strip().splitlines()[-1]) if streamed.stderr.strip() else ""
        raise RunFailed(f"run {run_id} is {status} but its log stream ended{f' ({lost})' if lost else ''}; "
                        f"follow it with `flwr log {run_id} {connection}`")
    raise RunFailed(f"run {run_id} {status}" + (f": {details}" if details not in ("", "N/A") else ""))

