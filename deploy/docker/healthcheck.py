"""Container health check: ``GET /healthz/ready`` on the node's HTTP listener.

Exits 0 when the node answers 200 (ready: serving, and the store answers),
1 otherwise. The slim image has no curl, so this is the image's HEALTHCHECK.
The address follows ``rookery serve``'s precedence: ``ROOKERY_LISTEN_HTTP``
over ``[listen] http`` in the config file. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping

PATH = "/healthz/ready"


def http_address(config: str | None, environ: Mapping[str, str]) -> str:
    """The configured ``[listen] http`` host:port ("" when off)."""
    if "ROOKERY_LISTEN_HTTP" in environ:
        return environ["ROOKERY_LISTEN_HTTP"].strip()
    if config:
        with open(config, "rb") as fh:
            return str(tomllib.load(fh).get("listen", {}).get("http", "")).strip()
    return ""


def url_for(address: str, path: str = PATH) -> str:
    """The URL to probe for a listen address; wildcard hosts become loopback."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"[listen] http must be host:port, not {address!r}")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the node's TOML config file")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        address = http_address(args.config, os.environ)
        if not address:
            print("unhealthy: no [listen] http listener configured", file=sys.stderr)
            return 1
        url = url_for(address)
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 (fixed http URL)
            ok = resp.status == 200
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.code} {exc.read(200).decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
