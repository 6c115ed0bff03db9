"""The appliance under a real systemd: install, start, ready, reload, watchdog, restart, drain.

One guest systemd is booted for the module (tests/systemd/sandbox.py); `vgate systemd install`
runs in it as an operator would (offline, from a wheelhouse cached under build/), then the
installed units run: the proxy, and `vgate-engine@tiny` through its real ExecStart
(`vgate engine run tiny` -> `taskset -c 0 <engine python> -m vllm.entrypoints.openai.api_server`)
and its /health ExecStartPost. The engine python is, by default, a venv whose
`vllm.entrypoints.openai.api_server` runs the fake vLLM (tests/fakes/vllm.py): the real vLLM CPU
engine imports for ~3 minutes per start in the sandbox on a loaded 2-core machine (pinned to
core 0, ~20 s when idle), too slow for a start plus a restart in CI. VGATE_SYSTEMD_VLLM=1 runs
the real vLLM instead (the dev model). Tests run in file order and leave the appliance running
for the next one; the last one stops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.systemd.sandbox import Sandbox, unavailable

REPO = Path(__file__).resolve().parents[2]
ENGINE_SITE = REPO / ".venv-engine/lib/python3.11/site-packages"
MODEL = REPO / "build/models/tiny"
# Where the appliance's engine reads it: a checkout under /tmp, /root or /home is hidden from the
# engine unit (PrivateTmp, ProtectHome), and `vgate engine run` refuses a model it cannot see.
GUEST_MODEL = "/srv/vgate/models/tiny"
PROXY, ENGINE = "vgate-proxy.service", "vgate-engine@tiny.service"

REAL_VLLM = os.environ.get("VGATE_SYSTEMD_VLLM") == "1"

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"sandbox: {unavailable()}"),
    pytest.mark.skipif(
        REAL_VLLM and not ENGINE_SITE.is_dir(), reason="no vLLM engine venv (make engine-venv)"
    ),
]
if REAL_VLLM:
    pytestmark.append(pytest.mark.vllm)
# Seconds an engine may take to become healthy (the real one imports for minutes under load).
ENGINE_START = 480.0 if REAL_VLLM else 60.0
# The proxy's drain timeout in most tests: the real engine streams far slower on a loaded core.
DRAIN = 30.0 if REAL_VLLM else 8.0

# The fake engine behind vLLM's module name: the unit's command line stays the real one. The
# whole package (its tests aside): the fake is split in modules that import one another.
FAKE_MODULES = (
    "tests/__init__.py",
    *(
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests/fakes").glob("*.py"))
        if not path.name.startswith("test_")
    ),
)
FAKE_SERVER = """\
import argparse
import time

from tests.fakes.vllm import main

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", default="8000")
p.add_argument("--served-model-name", default="tiny")
p.add_argument("--max-model-len", default="2048")
args, _ = p.parse_known_args()
# Like vLLM, listen only after "loading the model" for a few seconds: the engine unit must
# not turn active (nor the proxy start) before /health answers.
time.sleep(3)
# ~500 tokens/s, like the real CPU engine with the dev model.
main(["--host", args.host, "--port", args.port, "--model", args.served_model_name,
      "--max-model-len", args.max_model_len, "--token-delay", "0.002"])
"""

CONFIG = """
[server]
host = "127.0.0.1"
port = 8080
drain_timeout = {drain}

[upstream]
health_interval = 0.5
metrics_interval = 5.0

[models.tiny]
upstreams = ["engine:tiny"]
{extra}
[engines.tiny]
build = "cpu"
python = "/opt/vgate-engine/bin/python"
model = "{model}"
served_name = "tiny"
port = 8000
max_model_len = 2048
dtype = "float32"
enforce_eager = true
kv_cache_bytes = 268435456
cpu_cores = "0"
"""
ALIAS = '\n[models.alias]\nupstreams = ["engine:tiny"]\nserved_name = "tiny"\n'
# Short watchdog and restart delays so the test does not wait out production values.
PROXY_DROPIN = "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=3s\nRestartSec=1s\n"
ENGINE_DROPIN = "[Service]\nRestartSec=1s\n"


def config(drain: float = DRAIN, extra: str = "") -> str:
    return CONFIG.format(drain=drain, extra=extra, model=GUEST_MODEL)


def install(box: Sandbox, wheels: Path) -> str:
    """The appliance installed in a booted guest, and an empty engine venv; its site-packages."""
    # The installer as an operator runs it, as root inside the guest's mount namespace (it
    # keeps the host's network namespace only so that pip could reach an index).
    box.run(
        [
            str(REPO / ".venv/bin/vgate"),
            "systemd",
            "install",
            "--pip-arg=--no-index",
            f"--pip-arg=--find-links={wheels}",
        ],
        namespaces=("-m", "-u", "-i", "-p"),
        timeout=300,
    )
    # The engine's venv, of the system Python (readable by vgate-engine): over the
    # repository's vLLM packages (instead of a 2.5 GB install per run), or the fake's shim.
    box.run(["/usr/bin/python3", "-m", "venv", "--without-pip", "/opt/vgate-engine"])
    return "/opt/vgate-engine/lib/python3.11/site-packages"


def wheelhouse() -> Path:
    """vgate's dependencies as wheels (built once per dependency set): installs run offline."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*sorted(project["dependencies"]), "setuptools>=68"]
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    path = REPO / "build" / "systemd-wheelhouse" / key
    if not (path / ".complete").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(path), *reqs],
            check=True,
            timeout=600,
        )
        (path / ".complete").touch()
    return path


def until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def chat(max_tokens: int, stream: bool, model: str = "tiny") -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


class Stream:
    """An SSE response read on a thread: events as they come, then how it ended."""

    def __init__(self, sb: Sandbox, max_tokens: int) -> None:
        self.conn, self.resp = sb.connect(
            "POST", 8080, "/v1/chat/completions", chat(max_tokens, True), 60
        )
        assert self.resp.status == 200, self.resp.read()
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    self.events.append(line[6:].strip().decode())
                    self.first.set()
        except Exception as exc:
            self.error = exc
        self.conn.close()
        self.first.set()

    def wait(self, timeout: float = 60.0) -> Stream:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return self


def main_pid(sb: Sandbox, unit: str) -> int:
    return int(sb.show(unit, "MainPID")["MainPID"])


def ready(sb: Sandbox) -> bool:
    return sb.get_json(8080, "/ready")[0] == 200


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    if not MODEL.joinpath("config.json").exists():
        vgate = str(REPO / ".venv/bin/vgate")
        subprocess.run([vgate, "dev", "build-model", str(MODEL)], check=True, timeout=120)
    wheels = wheelhouse()
    box = Sandbox(tmp_path_factory.mktemp("systemd"))
    try:
        box.boot()
        site = install(box, wheels)
        if REAL_VLLM:
            box.write(f"{site}/vllm.pth", f"{ENGINE_SITE}\n")
        else:
            # The fake is copied in, not imported from the checkout: the service user cannot
            # read a checkout under /root or /home (and ProtectHome hides them anyway).
            box.write(f"{site}/fake.pth", "/opt/vgate/lib/python3.11/site-packages\n")
            for module in FAKE_MODULES:
                box.write(f"{site}/{module}", (REPO / module).read_text())
            for pkg in ("vllm", "vllm/entrypoints", "vllm/entrypoints/openai"):
                box.write(f"{site}/{pkg}/__init__.py", "")
            box.write(f"{site}/vllm/entrypoints/openai/api_server.py", FAKE_SERVER)
        box.run(["mkdir", "-p", str(Path(GUEST_MODEL).parent)])
        box.run(["cp", "-r", str(MODEL), GUEST_MODEL])
        box.run(["chmod", "-R", "a+rX", "/srv/vgate"])
        box.write("/etc/systemd/system/vgate-proxy.service.d/test.conf", PROXY_DROPIN)
        box.write("/etc/systemd/system/vgate-engine@.service.d/test.conf", ENGINE_DROPIN)
        yield box
    finally:
        box.close()


def test_install_layout(sb: Sandbox) -> None:
    # Written by the installer: the default config (root:vgate 0640), users, units, a venv of
    # the system Python that the service user can run.
    assert sb.run(["stat", "-c", "%U:%G %a", "/etc/vgate/vgate.toml"]).stdout.split() == [
        "root:vgate",
        "640",
    ]
    groups = sb.run(["id", "-nG", "vgate-engine"]).stdout.split()
    assert {"vgate", "video", "render"} <= set(groups)
    assert "vgate" in sb.run(["id", "-nG", "vgate-proxy"]).stdout.split()
    as_proxy = ["setpriv", "--reuid=vgate-proxy", "--regid=vgate", "--init-groups"]
    check = sb.run([*as_proxy, "/opt/vgate/bin/vgate", "check-config", "/etc/vgate/vgate.toml"])
    assert "OK" in check.stdout
    assert "home = /usr" in sb.run(["cat", "/opt/vgate/pyvenv.cfg"]).stdout
    # The installed units, verified where their binaries really are: silent.
    verify = sb.run(["systemd-analyze", "verify", "vgate.target", PROXY, ENGINE], check=False)
    assert (verify.returncode, verify.stderr) == (0, "")


def test_start_target_readiness_order(sb: Sandbox) -> None:
    sb.write("/etc/vgate/vgate.toml", config())
    sb.systemctl("daemon-reload")
    sb.systemctl("enable", "--quiet", "vgate.target", PROXY, ENGINE)
    started = time.monotonic()
    # Returns once every job is done: the engine healthy (ExecStartPost), the proxy READY=1.
    sb.systemctl("start", "vgate.target", timeout=ENGINE_START + 30)
    took = time.monotonic() - started
    props = ("ActiveState", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    engine, proxy = sb.show(ENGINE, *props), sb.show(PROXY, *props, "StatusText")
    assert engine["ActiveState"] == proxy["ActiveState"] == "active", sb.journal(ENGINE)[-3000:]
    e_start, e_active = (int(engine[p]) for p in props[1:])
    p_start, p_active = (int(proxy[p]) for p in props[1:])
    # The engine turned active only after /health answered (vLLM takes seconds to load) and
    # its warm-up generation was answered...
    assert e_active - e_start > 2_000_000
    assert "engine tiny: warmed up in" in sb.journal(ENGINE)
    # ...and the proxy was started after that (Before=), and was ready after its own start.
    assert p_start >= e_active
    assert p_active > p_start
    assert proxy["StatusText"].startswith("serving 1 models")
    # READY=1 means listening with the engine known: no retry needed, at once.
    status, body = sb.get_json(8080, "/ready")
    assert status == 200, body
    status, body = sb.fetch("POST", 8080, "/v1/chat/completions", chat(8, False))
    answer = json.loads(body)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 8
    print(f"vgate.target start took {took:.1f} s")


def test_status_reads_the_running_appliance(sb: Sandbox) -> None:
    # An operator's look, with the appliance's default config path (readable by root only).
    status = sb.run(["/opt/vgate/bin/vgate", "status"], check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    lines = [line.split() for line in status.stdout.splitlines()]
    assert lines[0][:3] == ["vgate", "http://127.0.0.1:8080", "ready"]
    assert ["tiny", "engine:tiny", "healthy", "closed", "0", "warmed", "up"] in lines
    engine = next(line for line in lines if line[:2] == ["tiny", "http://127.0.0.1:8000"])
    assert engine[2] == "tiny" and engine[3].endswith("%")
    assert "no metrics: the admin listener is off" in status.stdout
    data = json.loads(sb.run(["/opt/vgate/bin/vgate", "status", "--json"]).stdout)
    assert data["state"] == "ready" and data["engines"][0]["url"] == "http://127.0.0.1:8000"
    # A user who may not read the config is told so, not shown a wrong screen.
    denied = sb.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     "/opt/vgate/bin/vgate", "status"], check=False)  # fmt: skip
    assert denied.returncode == 2
    assert "/etc/vgate/vgate.toml" in denied.stderr and "Permission denied" in denied.stderr


def test_restart_is_ready_when_started(sb: Sandbox) -> None:
    before = main_pid(sb, PROXY)
    sb.systemctl("restart", PROXY)
    assert main_pid(sb, PROXY) != before
    # `systemctl restart` returned after READY=1: the listener must already answer.
    assert sb.get_json(8080, "/health")[0] == 200


def test_reload_good_and_bad_config(sb: Sandbox) -> None:
    pid = main_pid(sb, PROXY)
    stream = Stream(sb, 400)  # in flight across the reload
    assert stream.first.wait(30)
    sb.write("/etc/vgate/vgate.toml", config(extra=ALIAS))
    sb.systemctl("reload", PROXY)

    def models() -> list[str]:
        status, body = sb.get_json(8080, "/v1/models")
        return [m["id"] for m in body["data"]] if status == 200 else []

    until(lambda: "alias" in models(), 10, "the reloaded model list")
    assert main_pid(sb, PROXY) == pid
    stream.wait()
    assert stream.error is None and stream.events[-1] == "[DONE]"

    # A bad file: `systemctl reload` fails (ExecReload checks it first), nothing changes.
    sb.write("/etc/vgate/vgate.toml", config(extra=ALIAS) + "\n[server]\nport = 'x'\n")
    failed = sb.run(["systemctl", "reload", PROXY], check=False)
    assert failed.returncode != 0
    # And sent straight to the proxy (SIGHUP bypasses ExecReload): refused, logged, kept.
    since = sb.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    sb.run(["kill", "-HUP", str(pid)])
    until(lambda: "reload refused" in sb.journal(PROXY, since), 10, "the refusal in the journal")
    assert sb.show(PROXY, "ActiveState")["ActiveState"] == "active"
    assert main_pid(sb, PROXY) == pid
    assert "alias" in models()
    status, body = sb.fetch("POST", 8080, "/v1/chat/completions", chat(4, False, model="alias"))
    assert status == 200, body
    sb.write("/etc/vgate/vgate.toml", config())
    sb.systemctl("reload", PROXY)
    until(lambda: "alias" not in models(), 10, "the model list without alias")


def test_watchdog_restarts_a_stopped_proxy(sb: Sandbox) -> None:
    pid = main_pid(sb, PROXY)
    restarts = int(sb.show(PROXY, "NRestarts")["NRestarts"])
    sb.run(["kill", "-STOP", str(pid)])  # the event loop stops: no more WATCHDOG=1
    until(
        lambda: (
            main_pid(sb, PROXY) not in (0, pid)
            and sb.show(PROXY, "ActiveState")["ActiveState"] == "active"
        ),
        30,
        "a new proxy process",
    )
    assert int(sb.show(PROXY, "NRestarts")["NRestarts"]) == restarts + 1
    assert "Watchdog timeout" in sb.journal(PROXY)
    until(lambda: ready(sb), 10, "the restarted proxy to be ready")


def test_engine_restart_keeps_the_proxy(sb: Sandbox) -> None:
    proxy_pid = main_pid(sb, PROXY)
    restarts = sb.show(PROXY, "NRestarts")["NRestarts"]
    engine_pid = main_pid(sb, ENGINE)
    sb.run(["kill", "-KILL", str(engine_pid)])  # a crash: Restart=on-failure brings it back
    until(lambda: not ready(sb), 10, "the proxy to report the engine not ready")
    assert sb.get_json(8080, "/health")[0] == 200
    until(
        lambda: (
            main_pid(sb, ENGINE) not in (0, engine_pid)
            and sb.show(ENGINE, "ActiveState")["ActiveState"] == "active"
        ),
        ENGINE_START,
        "the engine to come back healthy",
        interval=1.0,
    )
    until(lambda: ready(sb), 10, "the proxy to see the engine again")
    assert main_pid(sb, PROXY) == proxy_pid
    assert sb.show(PROXY, "NRestarts")["NRestarts"] == restarts
    status, body = sb.fetch("POST", 8080, "/v1/chat/completions", chat(4, False))
    assert status == 200, body


def engine_running(sb: Sandbox) -> float:
    """Requests the engine is generating for (its vllm:num_requests_running gauge)."""
    status, text = sb.fetch("GET", 8000, "/metrics", timeout=5)
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith("vllm:num_requests_running{")
    )


def test_stop_drains_open_streams(sb: Sandbox) -> None:
    # Within the drain timeout: the stream finishes whole, new connections are refused.
    stream = Stream(sb, 200 if REAL_VLLM else 600)
    assert stream.first.wait(30)
    stop = threading.Thread(target=sb.systemctl, args=("stop", PROXY), daemon=True)
    stop.start()
    until(lambda: sb.get_json(8080, "/health")[0] == 0, 5, "the listener to close")
    stream.wait()
    assert stream.error is None and stream.events[-1] == "[DONE]", stream.events[-3:]
    stop.join(30)
    state = sb.show(PROXY, "ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}

    # Past the drain timeout (1 s): the stream ends with an error event, the engine aborts it.
    sb.write("/etc/vgate/vgate.toml", config(drain=1.0))
    sb.systemctl("start", PROXY)
    stream = Stream(sb, 2000)  # ~4 s
    assert stream.first.wait(30)
    started = time.monotonic()
    sb.systemctl("stop", PROXY)
    took = time.monotonic() - started
    stream.wait()
    assert stream.error is None, stream.error
    last = json.loads(stream.events[-1])
    assert last["error"]["code"] == "shutting_down"
    assert "[DONE]" not in stream.events
    assert took < 6, took
    # The upstream saw the disconnect: the engine stopped generating long before 2000 tokens.
    until(lambda: engine_running(sb) == 0, 1.5, "the engine to drop the cancelled request")
    assert len(stream.events) < 1000


def test_uninstall_keeps_config_and_state_unless_purged(sb: Sandbox) -> None:
    # From the installed venv, as the operator's docs say (it removes itself).
    sb.run(["/opt/vgate/bin/vgate", "systemd", "uninstall"], timeout=120)
    assert sb.systemctl("is-active", ENGINE, check=False).strip() == "inactive"
    assert sb.run(["systemctl", "cat", PROXY], check=False).returncode != 0
    assert sb.run(["test", "-e", "/opt/vgate"], check=False).returncode == 1
    assert sb.run(["test", "-f", "/etc/vgate/vgate.toml"], check=False).returncode == 0
    assert sb.run(["test", "-d", "/var/lib/vgate-engine"], check=False).returncode == 0
    assert sb.run(["id", "vgate-proxy"], check=False).returncode == 0

    vgate = str(REPO / ".venv/bin/vgate")
    sb.run([vgate, "systemd", "uninstall", "--purge"], timeout=120)
    for path in ("/etc/vgate", "/var/lib/vgate-engine", "/var/lib/vgate-proxy"):
        assert sb.run(["test", "-e", path], check=False).returncode == 1, path
    assert sb.run(["id", "vgate-proxy"], check=False).returncode != 0
    assert sb.run(["getent", "group", "vgate"], check=False).returncode != 0
