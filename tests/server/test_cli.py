"""The admin CLI as a real process against a store on disk."""

from __future__ import annotations

from pathlib import Path

from helpers import rookery


def test_domain_account_alias_lifecycle(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert rookery("domain", "add", "Example.ORG", data=data).stdout.strip() == "added domain example.org"
    assert rookery("domain", "list", data=data).stdout.split() == ["example.org"]
    rookery("account", "add", "alice@example.org", "--password-stdin", data=data, stdin="s3cret\n")
    rookery("account", "add", "bob@example.org", "--password", "pw", "--quota", "1M", data=data)
    listing = rookery("account", "list", data=data).stdout
    assert "alice@example.org\tmessages=0" in listing and "quota=1048576" in listing
    rookery("alias", "add", "info@example.org", "alice@example.org", data=data)
    rookery("alias", "add", "@example.org", "bob@example.org", data=data)
    aliases = rookery("alias", "list", data=data).stdout
    assert "info@example.org\talice@example.org" in aliases and "@example.org\tbob@example.org" in aliases
    rookery("account", "passwd", "alice@example.org", "--password-stdin", data=data, stdin="new\n")
    rookery("alias", "remove", "info@example.org", data=data)
    rookery("alias", "remove", "@example.org", data=data)
    rookery("account", "remove", "bob@example.org", data=data)
    assert "bob@" not in rookery("account", "list", data=data).stdout
    assert rookery("mail", "list", "alice@example.org", data=data).stdout == ""


def test_bad_input_gives_clear_errors_and_nonzero_exit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rookery("domain", "add", "example.org", data=data)
    rookery("account", "add", "alice@example.org", "--password", "pw", data=data)
    cases = [
        (("domain", "add", "example.org"), "already exists"),
        (("domain", "add", "not a domain"), "invalid domain"),
        (("account", "add", "carol@unknown.test", "--password", "pw"), "not hosted"),
        (("account", "add", "alice@example.org", "--password", "pw"), "already exists"),
        (("account", "add", "no-at-sign", "--password", "pw"), "invalid address"),
        (("account", "add", "dave@example.org", "--password", ""), "password must not be empty"),
        (("account", "passwd", "ghost@example.org", "--password", "x"), "no account"),
        (("alias", "add", "x@example.org", "ghost@example.org"), "no account"),
        (("domain", "remove", "example.org"), "still has accounts"),
        (("mail", "list", "alice@example.org", "--mailbox", "Nope"), "does not exist"),
    ]
    for args, message in cases:
        result = rookery(*args, data=data, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    usage = rookery("account", "frobnicate", data=data, check=False)
    assert usage.returncode == 2


def test_help_and_config_listing() -> None:
    assert "serve" in rookery("--help").stdout
    assert "ROOKERY_LISTEN_SMTP" in rookery("config").stdout
