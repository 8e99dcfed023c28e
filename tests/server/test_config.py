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
