"""The rendered units pass `systemd-analyze verify` silently and the proxy scores <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.ops.installer import UNITS, Installer, Layout

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze"),
]


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """Units rendered by the installer (`--root`), with a prefix whose bin/vgate exists."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    exe = prefix / "bin" / "vgate"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    layout = Layout(tmp_path / "root", prefix=str(prefix))
    Installer(layout, say=lambda _: None).install()
    return layout.at(layout.unit_dir)


def test_render_fills_every_placeholder(rendered: Path) -> None:
    for name in UNITS:
        text = (rendered / name).read_text()
        assert not re.search(r"@[A-Z_]+@", text), name
        assert "/bin/vgate" in text or name.endswith(".target")


def test_verify_prints_nothing(rendered: Path) -> None:
    # verify exits 0 on unknown keys and bad values: any output at all is the failure signal.
    units = [
        "vgate.target",
        "vgate-proxy.service",
        "vgate-engine@tiny.service",
        "vgate-engine-worker@big-1.service",
    ]
    result = subprocess.run(
        ["systemd-analyze", "verify", *units],
        cwd=rendered,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> values, comments and sections aside (enough to read what a unit asks for)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_a_worker_node_is_ready_when_joined_and_restarts_when_its_head_goes(
    rendered: Path,
) -> None:
    worker = unit_settings(rendered / "vgate-engine-worker@.service")
    # No HTTP port to probe: vgate (the main process) reports READY=1 once joined to the head.
    assert worker["Type"] == ["notify"] and worker["NotifyAccess"] == ["main"]
    assert "ExecStartPost" not in worker
    assert worker["ExecStart"][0].endswith(
        "/bin/vgate engine run %i --config /etc/vgate/vgate.toml"
    )
    assert worker["TimeoutStartSec"] == ["infinity"]  # waiting for a head that starts later
    assert worker["Restart"] == ["always"] and worker["RestartPreventExitStatus"] == ["2"]
    assert worker["StartLimitIntervalSec"] == ["0"]
    assert worker["Wants"] == worker["After"] == ["network-online.target"]
    assert worker["WantedBy"] == ["multi-user.target"]  # no proxy on a worker machine
    assert "PartOf" not in worker and "Before" not in worker
    head = unit_settings(rendered / "vgate-engine@.service")
    assert head["Wants"] == head["After"] == ["network-online.target"]
    # Same user, directories and hardening as the head: one engine split across machines.
    for key in ("User", "SupplementaryGroups", "StateDirectory", "ProtectSystem", "DeviceAllow"):
        assert worker[key] == head[key], key


def test_verify_catches_a_bad_key(rendered: Path) -> None:
    # The check above can fail: a misspelt key shows up on stderr.
    unit = rendered / "vgate-proxy.service"
    unit.write_text(unit.read_text().replace("UMask=0077", "UMask=0077\nProtectSystm=strict"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "vgate-proxy.service"],
        cwd=rendered,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ProtectSystm" in result.stderr


def test_proxy_exposure_at_most_2(rendered: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(rendered / "vgate-proxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 2.0
    assert result.returncode == 0, result.stderr


def test_staging_install_keeps_an_edited_config_and_uninstall_reverses(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    Installer(layout, say=lambda _: None).install()
    config = layout.at(layout.config)
    assert config.stat().st_mode & 0o777 == 0o640
    config.write_text("# edited\n")
    Installer(layout, say=lambda _: None).install()  # an upgrade
    assert config.read_text() == "# edited\n"
    assert layout.at(f"{layout.unit_dir}/vgate-engine-worker@.service").is_file()
    wants = layout.at(layout.unit_dir) / "vgate.target.wants"
    wants.mkdir()
    (wants / "vgate-engine@tiny.service").symlink_to("../vgate-engine@.service")
    # A worker machine enables its node for multi-user.target (not ours: the directory stays).
    multi_user = layout.at(layout.unit_dir) / "multi-user.target.wants"
    multi_user.mkdir()
    (multi_user / "vgate-engine-worker@big-1.service").symlink_to("../vgate-engine-worker@.service")

    Installer(layout, say=lambda _: None).uninstall()
    assert [p.name for p in layout.at(layout.unit_dir).iterdir()] == ["multi-user.target.wants"]
    assert not any(multi_user.iterdir())
    assert config.exists()
    Installer(layout, say=lambda _: None).uninstall(purge=True)
    assert not config.parent.exists()
    assert not layout.at(layout.sysusers).exists()
