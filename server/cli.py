"""``rookery``: run a node, and administer the store directly.

Admin commands open the store themselves (``--data DIR`` or ``--config
FILE``) and work while nodes run: the embedded store is safe for several
processes, and FoundationDB for any number.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import functools
import getpass
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from storage import Storage
from storage.errors import RookeryError

from . import config as configmod
from . import cpu
from . import logs
from .node import Node, open_storage

log = logging.getLogger("rookery.cli")

EPILOG = """\
examples:
  rookery serve --config deploy/dev.toml
  rookery --data ./data domain add example.org
  rookery --data ./data account add alice@example.org --password-stdin
  rookery --data ./data mail list alice@example.org --mailbox INBOX
"""


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS, help="data directory (embedded store)")
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML config file")
    common.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=argparse.SUPPRESS,
        help="override one config option, or one [routes] / [throttle] entry: routes.DOMAIN=HOST:PORT, "
        "throttle.PATTERN='{\"connections\": 2, \"per_hour\": 500}' (repeatable)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="rookery",
        description="Rookery mail server: run a node, or administer its store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run a node with the configured listeners")
    serve.set_defaults(handler=cmd_serve)

    cfg = sub.add_parser("config", parents=[common], help="print every config option with its default and env name")
    cfg.set_defaults(handler=cmd_config)

    domain = sub.add_parser("domain", help="hosted domains").add_subparsers(dest="action", required=True)
    p = domain.add_parser("add", parents=[common], help="host a domain")
    p.add_argument("name")
    p.set_defaults(handler=cmd_domain_add)
    p = domain.add_parser("list", parents=[common], help="list hosted domains")
    p.set_defaults(handler=cmd_domain_list)
    p = domain.add_parser("remove", parents=[common], help="stop hosting a domain (it must have no accounts, aliases or catch-all)")
    p.add_argument("name")
    p.set_defaults(handler=cmd_domain_remove)

    account = sub.add_parser("account", help="mail accounts").add_subparsers(dest="action", required=True)
    p = account.add_parser("add", parents=[common], help="create an account with its default mailboxes")
    p.add_argument("email")
    _password_args(p)
    p.add_argument("--quota", default="0", help="storage quota, e.g. 1G (0: unlimited)")
    p.set_defaults(handler=cmd_account_add)
    p = account.add_parser("passwd", parents=[common], help="set an account's password")
    p.add_argument("email")
    _password_args(p)
    p.set_defaults(handler=cmd_account_passwd)
    p = account.add_parser("list", parents=[common], help="list accounts")
    p.add_argument("--domain")
    p.set_defaults(handler=cmd_account_list)
    p = account.add_parser("remove", parents=[common], help="remove an account and all its mail")
    p.add_argument("email")
    p.set_defaults(handler=cmd_account_remove)

    alias = sub.add_parser("alias", help="address aliases").add_subparsers(dest="action", required=True)
    p = alias.add_parser("add", parents=[common], help="deliver mail for ALIAS to account TARGET (@domain: catch-all)")
    p.add_argument("alias")
    p.add_argument("target")
    p.set_defaults(handler=cmd_alias_add)
    p = alias.add_parser("list", parents=[common], help="list aliases and catch-alls")
    p.set_defaults(handler=cmd_alias_list)
    p = alias.add_parser("remove", parents=[common], help="remove an alias or catch-all (@domain)")
    p.add_argument("alias")
    p.set_defaults(handler=cmd_alias_remove)

    queue = sub.add_parser("queue", help="the outbound queue").add_subparsers(dest="action", required=True)
    p = queue.add_parser("list", parents=[common], help="id, sender, recipients with status, attempts, next attempt, holder")
    p.add_argument("--domain", help="only messages with a recipient in this domain")
    p.set_defaults(handler=cmd_queue_list)
    p = queue.add_parser("show", parents=[common], help="one message in full")
    p.add_argument("id")
    p.set_defaults(handler=cmd_queue_show)
    p = queue.add_parser("retry", parents=[common], help="make a message (or --all) due now")
    p.add_argument("id", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(handler=cmd_queue_retry)
    p = queue.add_parser("delete", parents=[common], help="drop a message from the queue (no bounce)")
    p.add_argument("id")
    p.set_defaults(handler=cmd_queue_delete)
    for verb in ("pause", "resume"):
        p = queue.add_parser(verb, parents=[common], help=f"{verb} delivery to DOMAIN (default: everything)"
                             + (" and make held mail due now" if verb == "resume" else ""))
        p.add_argument("domain", nargs="?")
        p.set_defaults(handler=cmd_queue_pause if verb == "pause" else cmd_queue_resume)
    p = queue.add_parser("flush", parents=[common], help="deliver everything due now from this process")
    p.set_defaults(handler=cmd_queue_flush)
    p = queue.add_parser(
        "drain", parents=[common],
        help="relay every queued message (paused, backed off or not) to another server, one transaction each, "
             "dropping it once accepted; exit 1 if any stay",
    )
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.set_defaults(handler=cmd_queue_drain)

    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action", required=True)
    p = dkim.add_parser("generate", parents=[common], help="create DOMAIN's key in the store; print the DNS TXT record")
    p.add_argument("domain")
    p.add_argument("--selector", default="rookery")
    p.add_argument("--replace", action="store_true", help="replace an existing key")
    p.set_defaults(handler=cmd_dkim_generate)
    p = dkim.add_parser("show", parents=[common], help="print DOMAIN's DNS TXT record")
    p.add_argument("domain")
    p.set_defaults(handler=cmd_dkim_show)

    cluster = sub.add_parser("cluster", help="the nodes sharing this store").add_subparsers(dest="action", required=True)
    p = cluster.add_parser("status", parents=[common], help="node id, address, state, uptime, connections, heartbeat")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    p.set_defaults(handler=cmd_cluster_status)

    node = sub.add_parser("node", help="one node of the cluster").add_subparsers(dest="action", required=True)
    p = node.add_parser("drain", parents=[common], help="ask a node (id, id prefix or address) to drain and leave")
    p.add_argument(
        "node", nargs="?",
        help="default: this machine's node (by its advertised cluster address or host name), or the only live one",
    )
    p.set_defaults(handler=cmd_node_drain)

    mail = sub.add_parser("mail", help="inspect stored mail").add_subparsers(dest="action", required=True)
    p = mail.add_parser("list", parents=[common], help="list messages: UID, flags, size, date, subject")
    p.add_argument("email")
    p.add_argument("--mailbox", default="INBOX")
    p.add_argument("--page", type=_positive, default=None, metavar="N",
                   help="messages read per store transaction (default 500); lines are printed page by page")
    p.set_defaults(handler=cmd_mail_list)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _password_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    group.add_argument("--password", metavar="P", help="the password (visible to other local users; prefer stdin)")


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise RookeryError("passwords do not match")
    return first


def load_config(args: argparse.Namespace) -> configmod.Config:
    overrides: dict[str, Any] = {}
    for item in getattr(args, "set", []) or []:
        name, sep, value = item.partition("=")
        if not sep or ("." not in name and name.strip() not in configmod.FREE_TABLES):
            raise configmod.ConfigError(f"--set wants SECTION.KEY=VALUE, not {item!r}")
        overrides[name.strip()] = value
    if getattr(args, "data", None):
        overrides["server.data_dir"] = args.data
    return configmod.load(getattr(args, "config", None), overrides=overrides)


async def _with_storage(cfg: configmod.Config, fn: Callable[[Storage], Awaitable[int | None]]) -> int:
    storage = open_storage(cfg)
    try:
        return (await fn(storage)) or 0
    finally:
        await storage.close()


async def _hint(s: Storage, cfg: configmod.Config, msg_type: str, **payload: Any) -> None:
    """After a change in the store: tell the live nodes sooner than they would
    notice (only with a ``[cluster] secret``; a hint, failures ignored)."""
    from storage.nodes import Nodes

    from .cluster.status import hint_nodes

    await hint_nodes(Nodes(s.db), cfg.cluster.secret, msg_type, **payload)


async def _invalidate(s: Storage, cfg: configmod.Config, scope: str = "directory") -> None:
    await _hint(s, cfg, "invalidate", scope=scope)


# -- commands ------------------------------------------------------------------

#: How long a thread may hold the GIL while another waits for it (CPython's
#: default: 5 ms). The store's threads make many short blocking calls (each
#: SQLite statement lets go of the GIL and must take it back); behind a thread
#: busy in Python (the protocol loop, a reader decoding a page of records)
#: every take-back could wait the whole interval. With the node's threads
#: on one CPU (server/cpu.py), 1 ms did best in paired runs of the
#: benchmarks: against 0.2 ms (the best before the threads were pinned),
#: SMTP at 8 clients took 0-35% more messages/s and IMAP at 10 clients ran
#: about as many commands; 5 ms lost 10-20% on both.
SWITCH_INTERVAL = 0.001


async def _serve(node: Node, on_ready: Callable[[], None] | None = None) -> None:
    """Run the node; once it is up, move everything start-up created (modules,
    classes, functions: about 45,000 objects) out of the garbage collector's
    sight, so full collections walk only what serving creates and pause the
    loop for less (as CPython's gc.freeze documentation suggests for servers)."""
    ready = asyncio.Event()
    run = asyncio.create_task(node.run(ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        if on_ready is not None:
            on_ready()
        gc.collect()
        gc.freeze()
    waiter.cancel()
    await run


def _banner(args: argparse.Namespace, cfg: configmod.Config, listen: dict[str, str]) -> str:
    """What is listening, and how to add an account and connect, with
    commands that work on a fresh machine (Python's own clients)."""
    data = f"--data {cfg.data_dir}" if not getattr(args, "config", None) else f"--config {args.config}"
    lines = ["Rookery node ready"]
    lines += [f"  {name:<12} {addr}" for name, addr in listen.items()]
    lines += [f"  store        {cfg.store.backend} ({cfg.data_dir})", "", "Add a domain and an account (in another terminal):",
              f"  .venv/bin/rookery {data} domain add example.org",
              f"  echo secret | .venv/bin/rookery {data} account add alice@example.org --password-stdin"]
    if "smtp" in listen:
        host, _, port = listen["smtp"].rpartition(":")
        lines += ["Send a message:",
                  f"  python3 -c \"import smtplib; smtplib.SMTP('{host}', {port}).sendmail('bob@example.net', "
                  "['alice@example.org'], b'Subject: hi\\r\\n\\r\\nhello\\r\\n')\""]
    if "imap" in listen:
        host, _, port = listen["imap"].rpartition(":")
        lines += ["Read it over IMAP (any mail client; plaintext login is allowed from loopback):",
                  f"  python3 -c \"import imaplib; m = imaplib.IMAP4('{host}', {port}); m.login('alice@example.org', 'secret'); "
                  "m.select(); print(m.fetch('1:*', '(BODY[HEADER.FIELDS (SUBJECT)])'))\""]
    lines.append(f"Or list it:  .venv/bin/rookery {data} mail list alice@example.org")
    return "\n".join(lines) + "\n"


def cmd_serve(args: argparse.Namespace, cfg: configmod.Config) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Before any thread starts, so that every thread of the node is pinned.
    allowed = cpu.allowed_cpus()
    try:
        pinned = cpu.pin(cfg.server.cpu, allowed)
        parsers = cpu.parse_workers(cfg.server.parse_workers, allowed, pinned)
    except cpu.CpuSettingError as exc:
        print(f"rookery: config: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.log.level, cfg.log.format)
    if pinned is not None:
        logging.getLogger("rookery.node").info("threads pinned to cpu %d of %d allowed", pinned, len(allowed))
    listen = {k: v for k, v in cfg.listen.items() if v}
    if not listen:
        print(
            "rookery: no listener enabled; set [listen] smtp/imap/http/... in the config "
            "(e.g. --config deploy/dev.toml) or by environment (ROOKERY_LISTEN_SMTP=127.0.0.1:2525)",
            file=sys.stderr,
        )
        return 2
    if cfg.listen.cluster and not cfg.cluster.secret:
        # Checked before anything starts (the node would refuse it too).
        print("rookery: config: [cluster] secret is required when [listen] cluster is set", file=sys.stderr)
        return 2
    node = Node(cfg, hash_cpus=allowed if pinned is not None else None, parsers=parsers)

    def ready() -> None:
        # The addresses bound, so a port 0 in the config shows as the real one.
        state = node.state
        assert state is not None
        bound = {k: f"{v.rpartition(':')[0]}:{state.ports.get(k, v.rpartition(':')[2])}" for k, v in listen.items()}
        print(_banner(args, cfg, bound), flush=True)

    try:
        asyncio.run(_serve(node, ready))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_config(args: argparse.Namespace, cfg: configmod.Config) -> int:
    print(configmod.describe(), end="")
    return 0


def cmd_domain_add(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        print(f"added domain {await s.directory.add_domain(args.name)}")
        await _invalidate(s, cfg)

    return asyncio.run(_with_storage(cfg, fn))


def cmd_domain_list(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        for name in await s.directory.list_domains():
            print(name)

    return asyncio.run(_with_storage(cfg, fn))


def cmd_domain_remove(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        await s.directory.remove_domain(args.name)
        print(f"removed domain {args.name}")
        await _invalidate(s, cfg)

    return asyncio.run(_with_storage(cfg, fn))


def cmd_account_add(args: argparse.Namespace, cfg: configmod.Config) -> int:
    password = _read_password(args)
    quota = configmod._size(args.quota)

    async def fn(s: Storage) -> None:
        account = await s.directory.add_account(args.email, password, quota or cfg.limits.default_quota)
        print(f"added account {account.email} (id {account.id})")
        await _invalidate(s, cfg)

    return asyncio.run(_with_storage(cfg, fn))


def cmd_account_passwd(args: argparse.Namespace, cfg: configmod.Config) -> int:
    password = _read_password(args)

    async def fn(s: Storage) -> None:
        await s.directory.set_password(args.email, password)
        print(f"password changed for {args.email}")
        await _invalidate(s, cfg, f"credentials:{args.email}")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_account_list(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        from storage.mail import quota_usage

        for account in await s.directory.list_accounts(args.domain):
            used, count = await s.db.read(functools.partial(quota_usage, acct=account.id))
            quota = "unlimited" if not account.quota else f"{account.quota}"
            print(f"{account.email}\tmessages={count}\tused={used}\tquota={quota}")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_account_remove(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        await s.remove_account(args.email)
        print(f"removed account {args.email}")
        await _invalidate(s, cfg)

    return asyncio.run(_with_storage(cfg, fn))


def cmd_alias_add(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        if args.alias.startswith("@"):
            await s.directory.add_catchall(args.alias[1:], args.target)
        else:
            await s.directory.add_alias(args.alias, args.target)
        print(f"added alias {args.alias} -> {args.target}")
        await _invalidate(s, cfg)

    return asyncio.run(_with_storage(cfg, fn))


def cmd_alias_list(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        for alias, target in await s.directory.list_aliases():
            print(f"{alias}\t{target}")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_alias_remove(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        if args.alias.startswith("@"):
            await s.directory.remove_catchall(args.alias[1:])
        else:
            await s.directory.remove_alias(args.alias)
        print(f"removed alias {args.alias}")
        await _invalidate(s, cfg)

    return asyncio.run(_with_storage(cfg, fn))


def _queue(s: Storage, cfg: configmod.Config) -> Any:
    from storage.queue import Queue

    return Queue(s.db, lifetime=cfg.queue.lifetime)


def cmd_queue_list(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from .outbound import format_list

    async def fn(s: Storage) -> None:
        print(format_list(await _queue(s, cfg).list_messages(args.domain)))

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_show(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from .outbound import format_message

    async def fn(s: Storage) -> None:
        print(format_message(await _queue(s, cfg).show(args.id)))

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_retry(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if not args.all and not args.id:
        print("rookery: queue retry needs an ID or --all", file=sys.stderr)
        return 2

    async def fn(s: Storage) -> None:
        n = await _queue(s, cfg).retry(None if args.all else args.id)
        print(f"{n} message(s) due now")
        await _hint(s, cfg, "queue_refresh")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_delete(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        await _queue(s, cfg).delete(args.id)
        print(f"deleted {args.id}")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_pause(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        await _queue(s, cfg).pause(args.domain)
        print(f"paused {args.domain or 'all delivery'}")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_resume(args: argparse.Namespace, cfg: configmod.Config) -> int:
    async def fn(s: Storage) -> None:
        await _queue(s, cfg).resume(args.domain)
        print(f"resumed {args.domain or 'all delivery'}")
        await _hint(s, cfg, "queue_refresh")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_flush(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from .outbound import OutboundWorker, flush, from_config

    async def fn(s: Storage) -> None:
        settings, routes, throttles = from_config(cfg)
        worker = OutboundWorker(s, _queue(s, cfg), settings, routes=routes, throttles=throttles, node_id="cli")
        print(f"{await flush(worker)} message(s) handled")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_queue_drain(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from .outbound import from_config, relay_queue

    async def fn(s: Storage) -> int:
        # Paused or backed-off destinations go too (this store is being
        # emptied), and their pauses and backoffs stay as they are.
        report = await relay_queue(s, _queue(s, cfg), from_config(cfg)[0], args.to)
        print(f"{report.relayed} message(s) relayed to {args.to}")
        for qid, why in report.left.items():
            print(f"rookery: {qid} stays queued: {why}", file=sys.stderr)
        if report.left:
            print(f"rookery: {len(report.left)} message(s) could not be relayed and stay queued", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(_with_storage(cfg, fn))


def cmd_dkim_generate(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from . import dkim

    async def fn(s: Storage) -> None:
        print(await dkim.generate(_queue(s, cfg), args.domain, args.selector, replace=args.replace))

    return asyncio.run(_with_storage(cfg, fn))


def cmd_dkim_show(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from . import dkim

    async def fn(s: Storage) -> None:
        print(await dkim.show(_queue(s, cfg), args.domain))

    return asyncio.run(_with_storage(cfg, fn))


def cmd_cluster_status(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from storage.nodes import Nodes

    from .cluster.status import format_status, status_json

    async def fn(s: Storage) -> None:
        records = await Nodes(s.db).list()
        print(status_json(records) if args.json else format_status(records), end="" if args.json else "\n")

    return asyncio.run(_with_storage(cfg, fn))


def cmd_node_drain(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from storage.nodes import Nodes

    from .cluster.status import drain_node, local_addresses

    async def fn(s: Storage) -> int:
        try:
            local, hosts = local_addresses(cfg.cluster.advertise, cfg.listen.cluster, cfg.hostname)
            record = await drain_node(Nodes(s.db), args.node, local, hosts)
        except LookupError as exc:
            print(f"rookery: {exc}", file=sys.stderr)
            return 1
        print(f"drain requested for node {record.id} ({record.address or 'no address'})")
        return 0

    return asyncio.run(_with_storage(cfg, fn))


def cmd_mail_list(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from storage import mime

    from storage.mail import LIST_PAGE

    async def fn(s: Storage) -> None:
        account = await s.directory.get(args.email)
        # A page per read transaction (a big mailbox in one would pass
        # FoundationDB's 5 s), its lines out before the next is read.
        async for page in s.mail.message_pages(account.id, args.mailbox, page=args.page or LIST_PAGE):
            for msg, email in page:
                subject = ""
                structure = email.structure if email is not None else None
                if structure is not None:
                    subject = mime.decode_words(structure.envelope.subject or "")
                subject = subject.replace("\t", " ").replace("\r", " ").replace("\n", " ")
                date = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(msg.internal_date))
                flags = " ".join(msg.flags) or "-"
                print(f"{msg.uid}\t{flags}\t{msg.size}\t{date}\t{subject}")
            sys.stdout.flush()

    return asyncio.run(_with_storage(cfg, fn))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args)
        code: int = args.handler(args, cfg)
    except configmod.ConfigError as exc:
        print(f"rookery: config: {exc}", file=sys.stderr)
        return 2
    except RookeryError as exc:
        print(f"rookery: {exc.text}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        # Bad values given on the command line or found on disk: a message,
        # not a traceback.
        print(f"rookery: error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
