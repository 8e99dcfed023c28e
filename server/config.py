"""One config schema feeding the TOML file, ``ROOKERY_*`` variables and the CLI.

Every option has a section, a key, a type, a default and a help line. The
resolved :class:`Config` is immutable and handed to constructors; nothing
reads ``os.environ`` deep inside a handler (STYLE.md, Radicale ``config.py``).

Precedence: defaults < TOML file < environment < ``--set section.key=value``.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any


class ConfigError(Exception):
    """A config value is missing, unknown or of the wrong type."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _size(value: Any) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().removesuffix("B")
    factor = 1
    for suffix, mult in (("K", 1024), ("M", 1024**2), ("G", 1024**3)):
        if text.endswith(suffix):
            text, factor = text[:-1], mult
    try:
        size = int(float(text) * factor)
    except ValueError:
        raise ValueError(f"not a size: {value!r} (bytes, or with K, M or G: 500M, 2G)") from None
    if size < 0:
        raise ValueError(f"not a size: {value!r} (negative)")
    return size


def _list(value: Any) -> tuple[str, ...]:
    """A TOML array, a JSON array (``["a:1", "b:2"]``, as an environment
    variable or ``--set`` gives it) or comma-separated text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON array: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ValueError("a JSON list must be an array of strings")
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


def _str(value: Any) -> str:
    return str(value)


def _float(value: Any) -> float:
    return float(value)


#: RFC 9051 §5.4: an authenticated client may stay silent at least 30 minutes.
MIN_AUTOLOGOUT = 1800.0


def _autologout(value: Any) -> float:
    seconds = float(value)
    if seconds < MIN_AUTOLOGOUT:
        raise ValueError(f"must be at least {MIN_AUTOLOGOUT:.0f} seconds (RFC 9051 §5.4)")
    return seconds


def _positive(value: Any) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise ValueError("must be more than 0")
    return seconds


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    return int(value)


@dataclass(frozen=True, slots=True)
class Option:
    section: str
    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return f"ROOKERY_{self.section}_{self.key}".upper()


SCHEMA: tuple[Option, ...] = (
    Option("server", "hostname", _str, "", "Host name used in greetings and Received: (default: the machine's FQDN)."),
    Option("server", "data_dir", _str, "./data", "Directory for the embedded store, TLS material and state."),
    Option("server", "cpu", _str, "auto",
           "CPU the node's threads run on, so they hand the interpreter lock to each other without waking another "
           "CPU: auto (one of those allowed, by process id), a CPU number, or off. Password hashing may use every CPU."),
    Option("server", "parse_workers", _str, "auto",
           "Worker processes that parse stored messages (MIME structure, blob hash) beside the node's threads: auto "
           "(one per CPU besides the node's own, at most 4; none on one CPU), a number, or 0 (parse in the node)."),
    Option("server", "shutdown_timeout", _float, 10.0, "Seconds sessions get to finish on SIGTERM before they are closed."),
    Option("listen", "smtp", _str, "", "Inbound MX SMTP listener host:port (empty: off)."),
    Option("listen", "submission", _str, "", "Submission listener with STARTTLS (RFC 6409) host:port."),
    Option("listen", "submissions", _str, "", "Submission listener with implicit TLS (RFC 8314) host:port."),
    Option("listen", "imap", _str, "", "IMAP listener host:port."),
    Option("listen", "imaps", _str, "", "IMAP listener with implicit TLS host:port."),
    Option("listen", "http", _str, "", "HTTP listener (health, metrics, JMAP, DAV) host:port."),
    Option("listen", "cluster", _str, "", "Peer channel listener host:port."),
    Option("store", "backend", _str, "embedded", "Store backend: embedded, foundationdb, or module:Class."),
    Option("store", "cluster_file", _str, "", "FoundationDB cluster file (backend = foundationdb); empty: $FDB_CLUSTER_FILE, then /etc/foundationdb/fdb.cluster."),
    Option("store", "api_version", _int, 730, "FoundationDB API version selected by the client (backend = foundationdb)."),
    Option("store", "retry_limit", _int, 100, "Retries of one FoundationDB transaction before it fails (transaction_retry_limit)."),
    Option("store", "timeout", _float, 5.0, "Seconds one FoundationDB transaction may take, retries included (transaction_timeout)."),
    Option("store", "inject_conflicts", _float, 0.0, "Test mode: fraction of embedded transactions failed as conflicts."),
    Option("tls", "cert", _str, "", "PEM certificate chain; empty: a self-signed one in the data directory."),
    Option("tls", "key", _str, "", "PEM private key for [tls] cert."),
    Option("smtp", "max_message_size", _size, 50 * 1024**2, "Largest message accepted, in bytes (SIZE, RFC 1870)."),
    Option("smtp", "max_recipients", _int, 100, "Most RCPT TO per message (RFC 5321 §4.5.3.1.8 asks for at least 100)."),
    Option("smtp", "command_timeout", _float, 300.0, "Seconds to wait for an SMTP command (RFC 5321 §4.5.3.2.7)."),
    Option("smtp", "data_timeout", _float, 600.0, "Seconds a DATA transfer may take in all."),
    Option("smtp", "max_connections", _int, 1000, "Concurrent SMTP connections per listener."),
    Option("smtp", "max_bad_commands", _int, 20, "Error replies without a message accepted before the connection is closed (421)."),
    Option("smtp", "max_line_length", _int, 998, "Longest DATA line in octets, CRLF not counted (RFC 5321 §4.5.3.1.6)."),
    Option("imap", "poll_interval", _float, 2.0, "Seconds between store polls for changes made by other nodes (push fallback)."),
    Option("imap", "autologout", _autologout, 1800.0, "Seconds an authenticated client may stay silent (RFC 9051 §5.4: at least 30 min)."),
    Option("imap", "write_timeout", _positive, 120.0,
           "Seconds a client may leave the server's output unread before the connection is closed."),
    Option("imap", "max_bad_commands", _int, 20, "Invalid commands in a row before BYE."),
    Option("imap", "max_connections", _int, 20000, "Concurrent IMAP connections per listener."),
    Option("imap", "max_literal", _size, 1024 * 1024, "Largest literal outside APPEND (APPEND takes up to smtp.max_message_size)."),
    Option("cluster", "peers", _list, (), "Peer channel addresses host:port of other nodes (ROOKERY_CLUSTER_PEERS: comma-separated or a JSON array)."),
    Option("cluster", "dns", _str, "", "A DNS name resolving to every node (e.g. a Kubernetes headless service)."),
    Option("cluster", "secret", _str, "", "Shared secret authenticating peer messages (HMAC); required with [listen] cluster."),
    Option("cluster", "advertise", _str, "", "host:port other nodes use to reach this one (default: the cluster listener)."),
    Option("cluster", "background", _bool, True, "Take part in one-node-at-a-time work (blob purge, node reaping)."),
    Option("cluster", "heartbeat", _float, 1.0, "Seconds between heartbeats on the peer channel and lease renewals."),
    Option("cluster", "timeout", _float, 5.0, "Seconds without a heartbeat before a peer counts as gone; node lease lifetime."),
    Option("cluster", "directory_check", _float, 2.0,
           "Seconds between reads of the store's directory version; cached directory answers (RCPT) are dropped "
           "when it moved. A peer's invalidate drops them sooner."),
    Option("queue", "worker", _bool, True, "Deliver queued mail from this node (false: it only queues; another node delivers)."),
    Option("queue", "retry_min", _float, 300.0, "Seconds before the first retry; the delay doubles each attempt."),
    Option("queue", "retry_max", _float, 3600.0, "Longest delay between retries."),
    Option("queue", "lifetime", _float, 432000.0, "Seconds before undelivered mail is bounced (default 5 days)."),
    Option("queue", "delay_warning", _float, 0.0,
           "Seconds a message may wait before its sender gets one delay warning (RFC 3464 Action: delayed); 0: never."),
    Option("queue", "backoff_min", _float, 60.0,
           "Seconds a destination is left alone after a 4xx (any phase, RCPT too); doubles while it goes on."),
    Option("queue", "backoff_max", _float, 3600.0, "Longest backoff of a destination after 4xx replies."),
    Option("queue", "lease_seconds", _float, 60.0, "A node's hold on a message it delivers; renewed every third of it."),
    Option("queue", "max_connections", _int, 20, "Outgoing SMTP connections per node."),
    Option("queue", "poll_interval", _float, 15.0, "Seconds between queue scans when no refresh arrives."),
    Option("queue", "connect_timeout", _float, 30.0, "Seconds to connect to a remote server."),
    Option("queue", "smtp_port", _int, 25, "Port of MX hosts."),
    Option("queue", "tls_verify", _bool, False, "Verify remote certificates when STARTTLS is used."),
    Option("queue", "tls_ca_file", _str, "", "CA bundle for [queue] tls_verify."),
    Option("submission", "max_messages_per_hour", _int, 500,
           "Recipients one account may send to per hour, all nodes together: a message to 100 uses 100 (0: unlimited)."),
    Option("security", "allow_plaintext_auth", _bool, False, "Allow AUTH/LOGIN without TLS from non-loopback peers."),
    Option("security", "failed_login_delay", _float, 1.0, "Seconds to wait before answering a failed or refused login."),
    Option("security", "max_failed_logins", _int, 10, "Failed logins per client IP per 5 minutes, all nodes together, before refusing."),
    Option("limits", "default_quota", _size, 0, "Storage quota of new accounts in bytes (0: unlimited)."),
    Option("log", "level", _str, "info", "Log level: debug, info, warning, error."),
    Option("log", "format", _str, "text", "Log format: text or json."),
)

_BY_NAME = {(o.section, o.key): o for o in SCHEMA}


class Section:
    """Read-only attribute access to one section's resolved values."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no option [{self._name}] {key}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("config is immutable")

    def items(self) -> Any:
        return self._values.items()


class Config:
    """The resolved, immutable configuration of one node."""

    def __init__(self, values: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> None:
        self._sections = {name: Section(name, vals) for name, vals in values.items()}
        #: Free-form tables (e.g. ``[routes]``) whose keys are not fixed.
        self.extra = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in extra.items()})

    def __getattr__(self, name: str) -> Section:
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(f"no config section [{name}]") from None

    @property
    def hostname(self) -> str:
        return str(self._sections["server"].hostname) or socket.getfqdn()

    @property
    def data_dir(self) -> Path:
        return Path(self._sections["server"].data_dir)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dict(sec.items()) for name, sec in self._sections.items()}


#: Tables allowed in the file beside the schema's sections, with free keys:
#: ``[routes]`` (destination domain -> next hop) and ``[throttle]`` (pattern ->
#: limits). Each is set from the environment as a whole by ``ROOKERY_ROUTES``
#: / ``ROOKERY_THROTTLE`` (see :func:`parse_table`), and entry by entry with
#: ``--set routes.DOMAIN=...`` / ``--set throttle.PATTERN=...``.
FREE_TABLES = ("routes", "throttle")

#: The sections of the schema; a ``ROOKERY_<SECTION>_...`` variable naming one
#: of them (or a free table) must be a real option.
SECTIONS = frozenset(o.section for o in SCHEMA)


def table_env(table: str) -> str:
    return f"ROOKERY_{table.upper()}"


def parse_entry(text: str) -> Any:
    """One entry's value given as text (``--set``, ``ROOKERY_ROUTES``): a JSON
    object (``{"host": "relay:587", "username": "u"}``, ``{"connections": 2}``)
    becomes a table; anything else stays a string (a route's ``host:port``)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
        return value
    return text.strip()


def parse_table(text: str) -> dict[str, Any]:
    """A whole free table given as text (``ROOKERY_ROUTES``, ``ROOKERY_THROTTLE``,
    ``--set routes=...``): a JSON object of entries, as the TOML table would
    hold them, or ``key=value,key=value`` whose values are plain strings (a
    route's ``host:port``: ``example.net=10.0.0.5:25,*=relay.example:587``).
    Empty text is an empty table."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value
    entries: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item.strip()!r} is not KEY=VALUE (or give a JSON object)")
        entries[key.strip()] = raw.strip()
    return entries


def _check_tables(extra: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse bad ``[routes]`` / ``[throttle]`` entries when the config is read,
    with the parsers the node uses (imported here only when there is a table)."""
    for table, spec in extra.items():
        if not spec:
            continue
        try:
            if table == "routes":
                from .outbound import parse_routes

                parse_routes(spec)
            else:
                from storage.queue import parse_throttles

                parse_throttles(spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad [{table}] table: {exc}") from None


def _check_environment(environ: Mapping[str, str]) -> None:
    """A ``ROOKERY_<SECTION>_<KEY>`` variable whose SECTION is one of ours must
    name a real option, as an unknown key in the file is refused; variables
    naming no section (``ROOKERY_FDB_CLUSTER_FILE``, ``ROOKERY_TAG``) are not
    Rookery options and are left alone."""
    known = {o.env for o in SCHEMA} | {table_env(t) for t in FREE_TABLES}
    for name in environ:
        if not name.startswith("ROOKERY_") or name in known:
            continue
        section = name[len("ROOKERY_"):].split("_", 1)[0].lower()
        if section in FREE_TABLES:
            raise ConfigError(f"${name}: unknown variable; the [{section}] table is set as a whole by ${table_env(section)}")
        if section in SECTIONS:
            near = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hint = f" (did you mean ${near[0]}?)" if near else " (see `rookery config`)"
            raise ConfigError(f"${name}: unknown option [{section}]{hint}")


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the configuration.

    ``overrides`` maps ``"section.key"`` to a value (the CLI's ``--set`` and
    ``--data``); ``"routes.DOMAIN"`` / ``"throttle.PATTERN"`` set one entry of
    a free table (text as :func:`parse_entry` reads it) and ``"routes"`` /
    ``"throttle"`` the whole table (as :func:`parse_table`). A free table's
    variable replaces the file's table; ``--set`` entries go on top. Raises
    :class:`ConfigError` on unknown keys or bad values.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {}
    for opt in SCHEMA:
        values.setdefault(opt.section, {})[opt.key] = opt.default
    extra: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, raw: Any, origin: str) -> None:
        opt = _BY_NAME.get((section, key))
        if opt is None:
            raise ConfigError(f"{origin}: unknown option [{section}] {key}")
        try:
            values[section][key] = opt.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: bad value for [{section}] {key}: {exc}") from None

    def put_table(table: str, raw: Any, origin: str) -> None:
        try:
            extra[table] = dict(raw) if isinstance(raw, Mapping) else parse_table(str(raw))
        except ValueError as exc:
            raise ConfigError(f"{origin}: bad value for [{table}]: {exc}") from None

    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            if section in FREE_TABLES:
                extra[section] = dict(table)
                continue
            for key, raw in table.items():
                put(section, key, raw, str(path))
    _check_environment(environ)
    for opt in SCHEMA:
        if opt.env in environ:
            put(opt.section, opt.key, environ[opt.env], f"${opt.env}")
    for table in FREE_TABLES:
        if table_env(table) in environ:
            put_table(table, environ[table_env(table)], f"${table_env(table)}")
    for name, raw in (overrides or {}).items():
        section, _, key = name.partition(".")
        if section in FREE_TABLES:
            if not key:
                put_table(section, raw, "command line")
                continue
            try:
                entry = raw if not isinstance(raw, str) else parse_entry(raw)
            except ValueError as exc:
                raise ConfigError(f"command line: bad value for [{section}] {key!r}: {exc}") from None
            extra.setdefault(section, {})[key] = entry
            continue
        put(section, key, raw, "command line")
    _check_tables(extra)
    return Config(values, extra)


def describe() -> str:
    """The schema as a commented TOML document (``rookery config``)."""
    lines: list[str] = []
    section = None
    for opt in SCHEMA:
        if opt.section != section:
            section = opt.section
            lines.append(f"\n[{section}]")
        default = opt.default
        if isinstance(default, str):
            rendered = json.dumps(default)
        elif isinstance(default, bool):
            rendered = str(default).lower()
        elif isinstance(default, (tuple, list)):
            rendered = "[" + ", ".join(json.dumps(str(v)) for v in default) + "]"
        else:
            rendered = repr(default)
        lines.append(f"# {opt.help}  (env {opt.env})")
        lines.append(f"{opt.key} = {rendered}")
    lines.append(TABLES_HELP)
    return "\n".join(lines).lstrip() + "\n"


#: The free tables in ``rookery config``: commented examples, then the (empty) tables.
TABLES_HELP = """
# Free tables: the keys are yours. ROOKERY_ROUTES / ROOKERY_THROTTLE replace a
# whole table (a JSON object, as the TOML table would hold it); --set
# routes.DOMAIN=... / throttle.PATTERN=... add or replace one entry on top.

# Next hop per destination domain instead of its MX; "*" routes every other
# domain (a smarthost). An entry is "host:port" or a table with host, port,
# username, password, tls (opportunistic, required, implicit, none) and verify.
#   "example.net" = "127.0.0.1:2526"
#   "*" = { host = "smarthost.example:587", username = "u", password = "p" }
# env ROOKERY_ROUTES='{"example.net": "127.0.0.1:2526", "*": {"host": "smarthost.example:587"}}'
#     or ROOKERY_ROUTES='example.net=127.0.0.1:2526,*=smarthost.example:587' (host:port entries only)
# --set routes.example.net=127.0.0.1:2526  --set 'routes.*={"host": "smarthost.example:587", "tls": "required"}'
[routes]

# Cluster-wide limits per destination domain pattern (fnmatch), or per MX host
# with an "mx:" prefix: connections at once and messages per hour (0: no limit).
#   "gmail.com" = { connections = 2, per_hour = 500 }
#   "mx:*.google.com" = { connections = 4 }
# env ROOKERY_THROTTLE='{"gmail.com": {"connections": 2, "per_hour": 500}}'
# --set 'throttle.gmail.com={"connections": 2, "per_hour": 500}'
[throttle]"""
