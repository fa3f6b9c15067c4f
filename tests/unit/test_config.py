"""Settings: TOML file + CDRANON_ environment, secrets masked, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from service.config import MASK, load_settings, plain_conf
from service.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CDRANON_ variable from the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CDRANON_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cdranon.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    s = load_settings()
    assert s.kafka.topic_prefix == "cdr"
    assert s.kafka.input_topic_name == "cdr.raw"
    assert s.batch.max_records == 10_000
    assert s.batch.max_wait_ms == 100
    assert s.metrics.port == 9464
    assert s.metrics.host == "127.0.0.1"
    assert s.timezone is None  # the policy's zone


def test_file_then_environment_deep_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
timezone = "Europe/Paris"
[kafka]
topic_prefix = "acme"
bootstrap_servers = "file:9092"
[kafka.librdkafka]
"security.protocol" = "SASL_SSL"
[batch]
max_records = 500
max_wait_ms = 20
""",
    )
    monkeypatch.setenv("CDRANON_KAFKA__BOOTSTRAP_SERVERS", "env:9093")
    monkeypatch.setenv("CDRANON_BATCH__MAX_WAIT_MS", "250")
    monkeypatch.setenv("CDRANON_KAFKA__LIBRDKAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    s = load_settings(path)
    # Environment wins where both speak; the file's other settings survive the merge.
    assert s.kafka.bootstrap_servers == "env:9093"
    assert s.batch.max_wait_ms == 250
    assert s.batch.max_records == 500
    assert s.kafka.topic_prefix == "acme"
    assert s.kafka.input_topic_name == "acme.raw"
    assert s.timezone == "Europe/Paris"
    # Underscores in an environment key become librdkafka's dots.
    assert plain_conf(s.kafka.librdkafka) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
    }


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[batch]\nmax_records = 7\n")
    monkeypatch.setenv("CDRANON_CONFIG", str(path))
    assert load_settings().batch.max_records == 7


def test_secrets_masked_everywhere_but_the_client_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        """
[kafka.librdkafka]
"sasl.username" = "svc-cdranon"
"sasl.password" = "s3cret-from-file"
[kafka.producer]
"ssl.key.password" = "keypass-42"
""",
    )
    monkeypatch.setenv("CDRANON_KAFKA__CONSUMER__SASL_OAUTHBEARER_CLIENT_SECRET", "oauth-77")
    s = load_settings(path)
    assert isinstance(s.kafka.librdkafka["sasl.password"], SecretStr)
    assert s.kafka.librdkafka["sasl.username"] == "svc-cdranon"
    for text in (repr(s), str(s), str(s.shown()), s.model_dump_json()):
        assert "s3cret-from-file" not in text
        assert "keypass-42" not in text
        assert "oauth-77" not in text
    shown = s.shown()
    assert shown["kafka"]["librdkafka"]["sasl.password"] == MASK
    assert shown["kafka"]["producer"]["ssl.key.password"] == MASK
    assert shown["kafka"]["consumer"]["sasl.oauthbearer.client.secret"] == MASK
    assert shown["kafka"]["librdkafka"]["sasl.username"] == "svc-cdranon"
    assert plain_conf(s.kafka.librdkafka)["sasl.password"] == "s3cret-from-file"


def test_keystore_url_password_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDRANON_KEYSTORE", "vault://svc:hunter2@vault.local/keys?token=abc")
    s = load_settings()
    assert s.keystore.url.startswith("vault://svc:hunter2@")
    shown = str(s.shown())
    assert "hunter2" not in shown
    assert "abc" not in shown


def test_keystore_url_from_the_same_variable_as_cdranon_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDRANON_KEYSTORE", "file:///srv/keys")
    assert load_settings().keystore.url == "file:///srv/keys"
    monkeypatch.delenv("CDRANON_KEYSTORE")
    monkeypatch.setenv("CDRANON_KEYSTORE__RECHECK_S", "5")
    monkeypatch.setenv("CDRANON_HOME", "/opt/cdranon")
    s = load_settings()
    assert s.keystore.recheck_s == 5
    assert s.keystore.url == "file:///opt/cdranon/keys"


def test_bad_value_names_the_setting_not_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDRANON_BATCH__MAX_RECORDS", "-31337")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "batch.max_records" in msg
    assert "CDRANON_BATCH__MAX_RECORDS" in msg
    assert "-31337" not in msg


def test_invalid_secret_value_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, '[kafka.librdkafka]\n"sasl.password" = ["not", "a", "string-pw9"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "string-pw9" not in str(info.value)
    assert "kafka.librdkafka" in str(info.value)


@pytest.mark.parametrize(
    "key", ["enable.auto.commit", "isolation_level", "transactional.id", "group.id"]
)
def test_exactly_once_settings_cannot_be_overridden(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f'[kafka.librdkafka]\n"{key}" = "x"\n')
    with pytest.raises(ConfigError, match="managed by cdranon"):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[batch]\nmax_recordz = 5\n", "batch.max_recordz"),
        ('timezone = "Mars/Olympus"\n', "timezone"),
        ('[kafka]\ntopic_prefix = "bad prefix!"\n', "kafka.topic_prefix"),
        # Ten digits in a row: the audit log would refuse the topic names at the first batch.
        ('[kafka]\ntopic_prefix = "int-u-930478622962"\n', "kafka.topic_prefix"),
        ('[kafka]\ninput_topic = "in.4477009001234"\n', "kafka.input_topic"),
        ("[topics]\nreplication_factor = 0\n", "topics.replication_factor"),
        ("[metrics]\nport = 70000\n", "metrics.port"),
    ],
)
def test_invalid_settings_raise_config_error(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert needle in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[batch\nmax_records = 1\n"))


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.batch.max_records = 3


def test_topic_prefix_digit_runs_next_to_letters_are_fine(tmp_path: Path) -> None:
    for prefix in ("cdr", "tenant1234567890a", "u-930478x622962", "cdr-2026"):
        text = f'[kafka]\ntopic_prefix = "{prefix}"\n'
        assert load_settings(write(tmp_path, text)).kafka.topic_prefix == prefix
