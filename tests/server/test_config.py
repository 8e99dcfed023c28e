"""The config schema: file, environment and overrides, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import config as configmod


def test_defaults() -> None:
    cfg = configmod.load(None, environ={})
    assert cfg.store.backend == "embedded"
    assert cfg.listen.smtp == ""
    assert cfg.smtp.max_message_size == 50 * 1024 * 1024
    assert cfg.security.allow_plaintext_auth is False


def test_file_env_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "rookery.toml"
    path.write_text('[listen]\nsmtp = "127.0.0.1:25"\nimap = "127.0.0.1:143"\n[smtp]\nmax_message_size = "10M"\n[routes]\n"example.net" = "127.0.0.1:2526"\n')
    env = {"ROOKERY_LISTEN_IMAP": "127.0.0.1:1143", "ROOKERY_SECURITY_ALLOW_PLAINTEXT_AUTH": "true"}
    cfg = configmod.load(path, environ=env, overrides={"listen.smtp": "127.0.0.1:2525"})
    assert cfg.listen.smtp == "127.0.0.1:2525"
    assert cfg.listen.imap == "127.0.0.1:1143"
    assert cfg.smtp.max_message_size == 10 * 1024 * 1024
    assert cfg.security.allow_plaintext_auth is True
    assert cfg.extra["routes"]["example.net"] == "127.0.0.1:2526"


def test_config_is_immutable() -> None:
    cfg = configmod.load(None, environ={})
    with pytest.raises(AttributeError):
        cfg.listen.smtp = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[listen]\nbogus = 1\n", "unknown option"),
        ("[smtp]\nmax_recipients = \"many\"\n", "bad value"),
        ("not toml at all [", "cannot read config"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(configmod.ConfigError, match=message):
        configmod.load(path, environ={})


def test_imap_autologout_has_the_rfc_minimum() -> None:
    # RFC 9051 §5.4: at least 30 minutes for an authenticated client.
    assert configmod.load(None, environ={}).imap.autologout == 1800.0
    assert configmod.load(None, environ={"ROOKERY_IMAP_AUTOLOGOUT": "3600"}).imap.autologout == 3600.0
    with pytest.raises(configmod.ConfigError, match="at least 1800"):
        configmod.load(None, environ={"ROOKERY_IMAP_AUTOLOGOUT": "60"})
    with pytest.raises(configmod.ConfigError, match="at least 1800"):
        configmod.load(None, environ={}, overrides={"imap.autologout": 1799.5})


def test_bad_environment_is_refused() -> None:
    with pytest.raises(configmod.ConfigError, match="ROOKERY_SECURITY_ALLOW_PLAINTEXT_AUTH"):
        configmod.load(None, environ={"ROOKERY_SECURITY_ALLOW_PLAINTEXT_AUTH": "perhaps"})


def test_describe_lists_every_option_and_parses_back(tmp_path: Path) -> None:
    text = configmod.describe()
    for opt in configmod.SCHEMA:
        assert opt.env in text
    path = tmp_path / "all.toml"
    path.write_text(text)
    assert configmod.load(path, environ={}).as_dict() == configmod.load(None, environ={}).as_dict()


def test_foundationdb_settings_come_from_config_and_an_empty_cluster_file_means_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.node import open_storage
    from storage.kv.base import StoreUnavailable

    env = {"ROOKERY_STORE_BACKEND": "foundationdb", "ROOKERY_STORE_RETRY_LIMIT": "7", "ROOKERY_STORE_TIMEOUT": "2.5"}
    cfg = configmod.load(None, environ=env, overrides={"server.data_dir": str(tmp_path)})
    assert (cfg.store.retry_limit, cfg.store.timeout, cfg.store.api_version) == (7, 2.5, 730)
    # No cluster file named: FoundationDB's own FDB_CLUSTER_FILE decides (missing here, so a clear error).
    missing = tmp_path / "nowhere" / "fdb.cluster"
    monkeypatch.setenv("FDB_CLUSTER_FILE", str(missing))
    with pytest.raises(StoreUnavailable, match=str(missing)):
        open_storage(cfg)


def test_routes_and_throttle_come_from_the_environment_as_json_or_pairs() -> None:
    from server.outbound import Route, from_config
    from storage.queue import ThrottleRule

    env = {
        "ROOKERY_ROUTES": '{"Example.NET": "127.0.0.1:2526", "*": {"host": "relay.test:587", "username": "u", '
                          '"password": "p", "tls": "required"}}',
        "ROOKERY_THROTTLE": '{"gmail.com": {"connections": 2, "per_hour": 500}, "mx:*.google.com": {"connections": 4}}',
    }
    _, routes, throttles = from_config(configmod.load(None, environ=env))
    assert routes == {
        "example.net": Route("127.0.0.1", 2526),
        "*": Route("relay.test", 587, "u", "p", "required", None),
    }
    assert sorted(throttles, key=lambda r: r.name) == [
        ThrottleRule("gmail.com", "domain", 2, 500), ThrottleRule("*.google.com", "mx", 4, 0),
    ]
    pairs = configmod.load(None, environ={"ROOKERY_ROUTES": " a.test=10.0.0.5:25, *=[::1]:2525 ,"})
    assert from_config(pairs)[1] == {"a.test": Route("10.0.0.5", 25), "*": Route("::1", 2525)}


def test_a_table_variable_replaces_the_files_table_and_set_entries_go_on_top(tmp_path: Path) -> None:
    path = tmp_path / "rookery.toml"
    path.write_text('[routes]\n"old.test" = "10.0.0.1:25"\n"a.test" = "10.0.0.2:25"\n'
                    '[throttle]\n"old.test" = { connections = 1 }\n')
    env = {"ROOKERY_ROUTES": "a.test=10.0.0.3:25", "ROOKERY_THROTTLE": '{"a.test": {"per_hour": 9}}'}
    cfg = configmod.load(path, environ=env, overrides={
        "routes.b.test": "10.0.0.4:26",
        "routes.*": '{"host": "relay.test", "port": 587}',
        "throttle.mx:*.example.com": '{"connections": 3}',
    })
    assert dict(cfg.extra["routes"]) == {
        "a.test": "10.0.0.3:25", "b.test": "10.0.0.4:26", "*": {"host": "relay.test", "port": 587},
    }
    assert dict(cfg.extra["throttle"]) == {"a.test": {"per_hour": 9}, "mx:*.example.com": {"connections": 3}}
    # Without the variables the file's tables stand; `--set routes=` replaces a whole table too.
    assert dict(configmod.load(path, environ={}).extra["routes"]) == {"old.test": "10.0.0.1:25", "a.test": "10.0.0.2:25"}
    assert dict(configmod.load(path, environ={}, overrides={"routes": ""}).extra["routes"]) == {}


@pytest.mark.parametrize(
    "env, overrides, message",
    [
        ({"ROOKERY_THROTTLE": '{"gmail.com": 2}'}, {}, r"bad \[throttle\] table: .*must be a table"),
        ({"ROOKERY_THROTTLE": "gmail.com=2"}, {}, r"bad \[throttle\] table"),
        ({"ROOKERY_THROTTLE": '{"gmail.com": {"connections": 2}'}, {}, r"\$ROOKERY_THROTTLE: bad value .*JSON"),
        ({"ROOKERY_ROUTES": '["a.test"]'}, {}, r"\$ROOKERY_ROUTES: bad value"),
        ({"ROOKERY_ROUTES": "a.test"}, {}, r"\$ROOKERY_ROUTES: bad value .*KEY=VALUE"),
        ({"ROOKERY_ROUTES": '{"a.test": {"host": "h", "tls": "sometimes"}}'}, {}, r"bad \[routes\] table: .*tls"),
        ({}, {"throttle.gmail.com": "2"}, r"bad \[throttle\] table"),
        ({}, {"throttle.gmail.com": "{connections: 2}"}, r"command line: bad value for \[throttle\] 'gmail.com'"),
    ],
)
def test_bad_tables_are_refused_when_the_config_is_read(env: dict[str, str], overrides: dict[str, str], message: str) -> None:
    with pytest.raises(configmod.ConfigError, match=message):
        configmod.load(None, environ=env, overrides=overrides)


def test_list_options_take_a_json_array_or_commas() -> None:
    def peers(text: str) -> tuple[str, ...]:
        return tuple(configmod.load(None, environ={"ROOKERY_CLUSTER_PEERS": text}).cluster.peers)

    assert peers('["a.test:1", "b.test:2"]') == ("a.test:1", "b.test:2")
    assert peers(' [ "[::1]:7946" ] ') == ("[::1]:7946",)
    assert peers("a.test:1, b.test:2") == ("a.test:1", "b.test:2")
    assert peers("") == ()
    assert configmod.load(None, environ={}, overrides={"cluster.peers": '["c:3"]'}).cluster.peers == ("c:3",)
    for bad in ('["a.test:1"', '[{"host": "a"}]'):
        with pytest.raises(configmod.ConfigError, match=r"\$ROOKERY_CLUSTER_PEERS: bad value"):
            peers(bad)


def test_unknown_variables_of_a_known_section_are_refused_others_ignored() -> None:
    with pytest.raises(configmod.ConfigError, match=r"\$ROOKERY_LISTEN_SMPT: unknown option \[listen\].*ROOKERY_LISTEN_SMTP"):
        configmod.load(None, environ={"ROOKERY_LISTEN_SMPT": "127.0.0.1:25"})
    with pytest.raises(configmod.ConfigError, match=r"\$ROOKERY_QUEUE: unknown option \[queue\]"):
        configmod.load(None, environ={"ROOKERY_QUEUE": "x"})
    with pytest.raises(configmod.ConfigError, match=r"\$ROOKERY_ROUTES_EXAMPLE_NET.*ROOKERY_ROUTES"):
        configmod.load(None, environ={"ROOKERY_ROUTES_EXAMPLE_NET": "127.0.0.1:25"})
    # Not a section of ours: someone else's variable (the FoundationDB tests', Compose's image tag).
    cfg = configmod.load(None, environ={"ROOKERY_FDB_CLUSTER_FILE": "/x", "ROOKERY_TAG": "local", "ROOKERYX": "1"})
    assert cfg.store.cluster_file == ""


def test_describe_documents_the_free_tables() -> None:
    text = configmod.describe()
    for needle in ("[routes]", "[throttle]", "ROOKERY_ROUTES=", "ROOKERY_THROTTLE=", "--set routes.", "--set 'throttle."):
        assert needle in text
