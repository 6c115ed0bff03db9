"""Config validation, `vgate check-config`, and the refusal to bind publicly without auth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main as cli
from proxy.core.binder import ConfigError
from proxy.runtime.load import from_dict, load

MINIMAL = """\
[server]
host = "127.0.0.1"
port = 8080

[models.tiny]                            # the name clients send as "model"
upstreams = ["http://127.0.0.1:8000"]    # vLLM OpenAI servers: base URL, no /v1
"""


def write(tmp_path: Path, text: str, name: str = "vgate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_minimal_file_from_the_readme_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL))
    assert cfg.server.port == 8080
    assert cfg.models["tiny"].upstreams == ["http://127.0.0.1:8000"]
    assert cfg.server.max_body_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (MINIMAL + "[server.extra]\n", "server.extra", "unknown key"),
        (MINIMAL.replace("port = 8080", "prot = 8080"), "server.prot", "unknown key"),
        (MINIMAL.replace("port = 8080", 'port = "x"'), "server.port", "integer"),
        (MINIMAL.replace("port = 8080", "port = 70000"), "server.port", "port number"),
        (MINIMAL + "[upstream]\nfirst_byte_timeout = -1\n", "upstream.first_byte_timeout", "0"),
        (MINIMAL + "[upstream]\nconnect_timeout = true\n", "upstream.connect_timeout", "number"),
        (MINIMAL.replace("http://127.0.0.1:8000", "ftp://x"), "models.tiny.upstreams[0]", "http"),
        (
            MINIMAL.replace("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
            "models.tiny.upstreams[0]",
            "/v1",
        ),
        (
            MINIMAL.replace('upstreams = ["http://127.0.0.1:8000"]', "upstreams = []"),
            "models.tiny.upstreams",
            "empty",
        ),
        ("[server]\nport = 1\n", "models", "required"),
        ("[server\n", "", "TOML"),
    ],
)
def test_problems_name_file_key_and_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.source == str(path)
    assert any(key in p and words in p for p in info.value.problems), info.value.problems

    assert cli.main(["check-config", str(path)]) != 0
    err = capsys.readouterr().err
    assert str(path) in err
    assert key in err
    assert words in err


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(
            {"server": {"port": "x", "bogus": 1}, "models": {"m": {"upstreams": "nope"}}},
            "f.toml",
        )
    text = str(info.value)
    for key in ("server.port", "server.bogus", "models.m.upstreams"):
        assert key in text
    assert text.count("f.toml") == 3


def test_check_config_accepts_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL)
    assert cli.main(["check-config", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_console_script_exits_non_zero(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("port = 8080", "port = 0"))
    vgate = Path(sys.executable).parent / "vgate"
    done = subprocess.run(
        [str(vgate), "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert str(path) in done.stderr
    assert "server.port" in done.stderr


PUBLIC = MINIMAL.replace('host = "127.0.0.1"', 'host = "0.0.0.0"')


def test_public_bind_without_auth_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, PUBLIC)
    # A subprocess with a timeout: were the check missing, `serve` would bind and never return.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "vgate"), "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "server.host" in done.stderr
    assert "allow_unauthenticated" in done.stderr
    assert cli.main(["check-config", str(path)]) != 0
    assert "server.host" in capsys.readouterr().err


def test_public_bind_allowed_when_explicit(tmp_path: Path) -> None:
    path = write(
        tmp_path, PUBLIC.replace("port = 8080", "port = 8080\nallow_unauthenticated = true")
    )
    assert cli.main(["check-config", str(path)]) == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_binds_need_no_auth(tmp_path: Path, host: str) -> None:
    path = write(tmp_path, MINIMAL.replace("127.0.0.1", host, 1))
    assert cli.main(["check-config", str(path)]) == 0
