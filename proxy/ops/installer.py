"""`vgate systemd install|uninstall`: the appliance's files on a systemd machine.

Install builds a venv at the prefix from the system Python (service users cannot read a Python
under /root), pip-installs this source tree into it, renders the units with the prefix paths,
writes the default config if there is none, creates the service users (systemd-sysusers) and
reloads systemd. `--root DIR` only renders files into a tree (for packaging): no venv, no users,
no systemctl. Uninstall reverses it and leaves config and state alone unless asked to purge.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

UNITS = (
    "vgate.target",
    "vgate-proxy.service",
    "vgate-engine@.service",
    # Worker nodes of an engine that spans machines (headless, no proxy on their machine).
    "vgate-engine-worker@.service",
)
USERS = ("vgate-proxy", "vgate-engine")
GROUP = "vgate"
# The state each service owns (StateDirectory= / CacheDirectory= of the units).
STATE_DIRS = ("/var/lib/vgate-proxy", "/var/lib/vgate-engine", "/var/cache/vgate-engine")
SYSUSERS = """\
# vgate's service users (systemd-sysusers). The engine's GPU groups are created if missing.
g vgate -
u vgate-proxy - "vgate proxy" /var/lib/vgate-proxy
u vgate-engine - "vgate vLLM engine" /var/lib/vgate-engine
g video -
g render -
m vgate-proxy vgate
m vgate-engine vgate
m vgate-engine video
m vgate-engine render
"""
# Not copied into the temporary build tree: venvs, models and build output.
_SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__")

Runner = Callable[[Sequence[str]], None]


class InstallError(Exception):
    """The installation cannot proceed; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Where things go; `root` is "/" on a machine or a staging tree for packaging."""

    root: Path = Path("/")
    prefix: str = "/opt/vgate"
    config: str = "/etc/vgate/vgate.toml"
    unit_dir: str = "/etc/systemd/system"
    sysusers: str = "/etc/sysusers.d/vgate.conf"

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def staging(self) -> bool:
        return self.root != Path("/")


def source_tree() -> Path:
    """The source tree this vgate runs from (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[2]


def render(template: str, layout: Layout) -> str:
    """A unit template with the install paths filled in."""
    text = template.replace("@PREFIX@", layout.prefix).replace("@CONFIG@", layout.config)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise InstallError(f"unknown placeholders in a unit template: {sorted(set(left))}")
    return text


def render_units(source: Path, layout: Layout) -> dict[str, str]:
    return {name: render((source / "systemd" / name).read_text(), layout) for name in UNITS}


def _run(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True)


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def systemd_running(root: Path = Path("/")) -> bool:
    # The documented test (sd_booted): this directory exists only under a running systemd.
    return (root / "run/systemd/system").is_dir()


class Installer:
    def __init__(
        self,
        layout: Layout,
        source: Path | None = None,
        python: str = "/usr/bin/python3",
        pip_args: Sequence[str] = (),
        run: Runner = _run,
        say: Callable[[str], None] = print,
    ) -> None:
        self.layout = layout
        self.source = source or source_tree()
        self.python = python
        self.pip_args = list(pip_args)
        self.run = run
        self.say = say

    def install(self) -> None:
        lay = self.layout
        if not (self.source / "pyproject.toml").is_file() or not (self.source / "systemd").is_dir():
            raise InstallError(f"{self.source} is not a vgate source tree (use --source DIR)")
        if not lay.staging and os.geteuid() != 0:
            raise InstallError("installing needs root (or --root DIR to render a staging tree)")
        old_umask = os.umask(0o022)  # service users must read the venv and the units
        try:
            if not lay.staging:
                self._venv()
            self._write(lay.sysusers, SYSUSERS, 0o644)
            if not lay.staging:
                self.run(["systemd-sysusers", lay.sysusers])
            for name, text in render_units(self.source, lay).items():
                self._write(f"{lay.unit_dir}/{name}", text, 0o644)
            self._config()
            if not lay.staging and systemd_running():
                self.run(["systemctl", "daemon-reload"])
        finally:
            os.umask(old_umask)
        self._next_steps()

    def _venv(self) -> None:
        prefix = self.layout.prefix
        python = f"{prefix}/bin/python"
        if not Path(python).exists():
            self.say(f"creating the venv {prefix} from {self.python}")
            # No pip in the appliance's venv: the installer's own pip installs into it.
            self.run([self.python, "-m", "venv", "--without-pip", prefix])
        if importlib.util.find_spec("pip") is not None:
            pip = [sys.executable, "-m", "pip", "--python", python]
        else:
            self.run([python, "-m", "ensurepip", "--default-pip"])
            pip = [python, "-m", "pip"]
        # Build from a clean copy: an in-tree build would leave build/ and *.egg-info behind.
        with tempfile.TemporaryDirectory(prefix="vgate-src-") as tmp:
            copy = Path(tmp) / "vgate"
            shutil.copytree(self.source, copy, ignore=_SKIP)
            self.say(f"installing vgate from {self.source} into {prefix}")
            args = ["install", "--quiet", "--disable-pip-version-check", *self.pip_args]
            self.run([*pip, *args, str(copy)])

    def _write(self, path: str, text: str, mode: int) -> None:
        target = self.layout.at(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(target)
        self.say(f"wrote {target}")

    def _config(self) -> None:
        lay = self.layout
        target = lay.at(lay.config)
        if target.exists():
            self.say(f"kept {target} (existing config)")
            return
        self._write(lay.config, (self.source / "systemd" / "vgate.toml").read_text(), 0o640)
        if not lay.staging:
            # root:vgate 0640: the services read it, other users do not (it may hold keys).
            os.chown(target, 0, grp.getgrnam(GROUP).gr_gid)

    def _next_steps(self) -> None:
        lay = self.layout
        if lay.staging:
            self.say(
                f"\nrendered into {lay.root}. The package must build the venv at {lay.prefix} "
                f"(python3 -m venv {lay.prefix} && {lay.prefix}/bin/pip install vgate), run "
                f"`systemd-sysusers`, `chgrp {GROUP} {lay.config}` and `systemctl daemon-reload` "
                "on the target."
            )
            return
        self.say(
            "\nnext:\n"
            f"  sudoedit {lay.config}             # the engine's model and python, the port\n"
            f"  {lay.prefix}/bin/vgate check-config {lay.config}\n"
            "  systemctl enable --now vgate.target vgate-proxy.service vgate-engine@main.service\n"
            "  systemctl status 'vgate*'          # journalctl -u vgate-proxy -f for the logs\n"
            "  # a worker machine of an engine that spans machines runs only its node:\n"
            "  # systemctl enable --now vgate-engine-worker@NAME.service"
        )

    def uninstall(self, purge: bool = False) -> None:
        lay = self.layout
        if not lay.staging and os.geteuid() != 0:
            raise InstallError("uninstalling needs root (or --root DIR for a staging tree)")
        unit_dir = lay.at(lay.unit_dir)
        instances = sorted(p.name for p in unit_dir.glob("*.wants/vgate-engine*@*.service"))
        live = not lay.staging and systemd_running()
        if live and lay.at(f"{lay.unit_dir}/vgate-proxy.service").exists():
            names = [
                "vgate.target",
                "vgate-proxy.service",
                "vgate-engine@*.service",
                "vgate-engine-worker@*.service",
            ]
            self.run(["systemctl", "stop", *names])
            enabled = ["vgate.target", "vgate-proxy.service", *sorted(set(instances))]
            self.run(["systemctl", "disable", "--quiet", *enabled])
        for link in unit_dir.glob("*.wants/vgate*"):
            link.unlink()
        for name in UNITS:
            self._remove(lay.at(f"{lay.unit_dir}/{name}"))
        for wants in unit_dir.glob("vgate*.wants"):
            wants.rmdir()
        self._remove_venv()
        if purge:
            self._remove(lay.at(lay.config).parent)
            for path in STATE_DIRS:
                self._remove(lay.at(path))
            if not lay.staging:
                for user in USERS:
                    if _exists(pwd.getpwnam, user):
                        self.run(["userdel", user])
                if _exists(grp.getgrnam, GROUP):
                    self.run(["groupdel", GROUP])
            self._remove(lay.at(lay.sysusers))
        else:
            self.say(f"kept {lay.at(lay.config)}, the state directories and the service users")
        if live:
            self.run(["systemctl", "daemon-reload"])

    def _remove_venv(self) -> None:
        prefix = self.layout.at(self.layout.prefix)
        if not prefix.exists():
            return
        if not (prefix / "pyvenv.cfg").is_file() or not (prefix / "bin" / "vgate").exists():
            raise InstallError(f"{prefix} does not look like vgate's venv; not removing it")
        self._remove(prefix)

    def _remove(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            return
        self.say(f"removed {path}")
