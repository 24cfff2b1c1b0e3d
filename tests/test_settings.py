"""Settings: documented defaults, environment over TOML over defaults, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from facecaption.settings import DEFAULT_HOME, Settings, SourceColumns


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No FACECAPTION_* variables and a private $HOME, so no real config file is read."""
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("FACECAPTION_CONFIG", "FACECAPTION_HOME", "FACECAPTION_SHARD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return home


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_the_documented_ones(isolated_env: Path) -> None:
    settings = Settings()
    assert settings.shard_size == 10_000
    assert settings.home == DEFAULT_HOME
    assert settings.home_dir == (isolated_env / ".facecaption").resolve()
    assert settings.db_url is None
    assert settings.store_root is None
    assert settings.columns.url[:2] == ["url", "URL"]
    assert settings.columns.caption[:2] == ["caption", "TEXT"]
    assert settings.columns.sample_id[:2] == ["id", "SAMPLE_ID"]
    assert settings.fetch.concurrency == 64
    assert settings.fetch.retries == 2
    output = settings.fetch.output_settings()
    assert output["max_bytes"] == 20_000_000 and output["max_pixels"] == 89_478_485
    assert output["opt_out_directives"] == ["noai", "noimageai", "noindex", "noimageindex"]
    assert output["respect_robots_txt"] is True and output["allow_networks"] == []
    assert "concurrency" not in output and "total_timeout_s" not in output


def test_artifact_root_defaults_to_home_artifacts(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "h")
    assert settings.artifact_root == str((tmp_path / "h").resolve() / "artifacts")
    assert Settings(home=tmp_path / "h", store_root="s3://bucket/x").artifact_root == (
        "s3://bucket/x"
    )


def test_artifact_root_follows_home_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACECAPTION_HOME", str(tmp_path / "envhome"))
    assert Settings().artifact_root == str((tmp_path / "envhome").resolve() / "artifacts")


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACECAPTION_SHARD_SIZE", "250")
    monkeypatch.setenv("FACECAPTION_FETCH__CONCURRENCY", "3")
    monkeypatch.setenv("FACECAPTION_FETCH__TOTAL_TIMEOUT_S", "1.5")
    monkeypatch.setenv("FACECAPTION_COLUMNS__URL", '["link"]')
    monkeypatch.setenv("FACECAPTION_DB_URL", "postgresql://u@h/d")
    settings = Settings()
    assert settings.shard_size == 250
    assert settings.fetch.concurrency == 3
    assert settings.fetch.total_timeout_s == 1.5
    # Untouched nested fields keep their defaults.
    assert settings.fetch.retries == 2
    assert settings.columns.url == ["link"]
    assert settings.columns.caption == SourceColumns().caption
    assert settings.db_url == "postgresql://u@h/d"


def test_init_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACECAPTION_SHARD_SIZE", "250")
    assert Settings(shard_size=5).shard_size == 5


def test_config_file_named_by_env_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(
        tmp_path / "conf" / "fc.toml",
        'shard_size = 123\n\n[fetch]\nconcurrency = 7\n\n[columns]\nurl = ["href"]\n',
    )
    monkeypatch.setenv("FACECAPTION_CONFIG", str(config))
    settings = Settings()
    assert settings.shard_size == 123
    assert settings.fetch.concurrency == 7
    assert settings.fetch.retries == 2
    assert settings.columns.url == ["href"]


def test_environment_beats_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(
        tmp_path / "fc.toml", "shard_size = 123\n\n[fetch]\nconcurrency = 7\nretries = 5\n"
    )
    monkeypatch.setenv("FACECAPTION_CONFIG", str(config))
    monkeypatch.setenv("FACECAPTION_FETCH__CONCURRENCY", "9")
    settings = Settings()
    assert settings.fetch.concurrency == 9
    # The file's other values in the same section still apply (sections merge, not replace).
    assert settings.fetch.retries == 5
    assert settings.shard_size == 123


def test_config_file_in_home_is_read_when_no_explicit_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "fchome"
    write_toml(home / "facecaption.toml", "shard_size = 77\n")
    monkeypatch.setenv("FACECAPTION_HOME", str(home))
    assert Settings().shard_size == 77


def test_config_file_in_default_home_is_read(isolated_env: Path) -> None:
    write_toml(isolated_env / ".facecaption" / "facecaption.toml", "[fetch]\nretries = 4\n")
    assert Settings().fetch.retries == 4


def test_missing_config_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACECAPTION_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        Settings()


def test_config_pointing_at_a_folder_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACECAPTION_CONFIG", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        Settings()


def test_unknown_key_in_config_file_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(tmp_path / "fc.toml", "shard_sise = 10\n")
    monkeypatch.setenv("FACECAPTION_CONFIG", str(config))
    with pytest.raises(ValidationError, match="shard_sise"):
        Settings()


@pytest.mark.parametrize("value", ["0", "-5", "ten", "1.5", ""])
def test_invalid_shard_size_from_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FACECAPTION_SHARD_SIZE", value)
    with pytest.raises(ValidationError, match="shard_size"):
        Settings()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shard_size": 0},
        {"shard_size": "many"},
        {"fetch": {"concurrency": 0}},
        {"fetch": {"total_timeout_s": 0}},
        {"fetch": {"retries": -1}},
        {"columns": {"url": "url"}},
        {"no_such_setting": 1},
    ],
)
def test_invalid_values_raise_validation_error(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_invalid_nested_value_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACECAPTION_FETCH__CONCURRENCY", "lots")
    with pytest.raises(ValidationError, match="concurrency"):
        Settings()


def test_invalid_value_in_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path / "fc.toml", "shard_size = 0\n")
    monkeypatch.setenv("FACECAPTION_CONFIG", str(config))
    with pytest.raises(ValidationError, match="shard_size"):
        Settings()
