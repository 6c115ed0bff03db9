"""vgate beside a compiled proxy and beside itself, in one run: the columns of `make bench`.

    .venv/bin/python bench/compare.py            # ~3 minutes
    .venv/bin/python bench/compare.py --quick    # a smoke run

Columns, each measured in every round right after the direct path (bench/README.md, method):
- `direct`: the load straight to the fake engine (the CPU column is the fake's own);
- `nginx`: nginx as a pass-through (one worker, keep-alive upstream, no buffering), when
  nginx is installed: what a compiled proxy costs on this machine;
- `core` / `full`: vgate without and with everything (`proxy_bench.py --profile`);
- `full w=2`: `full` with `[server] workers = 2`, CPU summed over the supervisor and its
  workers. On this 2-core machine the proxy side has one core (the fake and the load generator
  have the other), so both workers share core 1: the column shows what a second worker costs
  and that the box keeps working, not the throughput a second core would add.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_bench as pb

NGINX = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream fake {{ server 127.0.0.1:{fake}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def commands(tmp: Path, fake_port: int) -> dict[str, tuple[list[str], int]]:
    """Column -> (the server's command, its port)."""
    out: dict[str, tuple[list[str], int]] = {}
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if nginx:
        port = pb.free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX.format(dir=tmp, fake=fake_port, port=port))
        out["nginx"] = ([nginx, "-p", str(tmp), "-c", str(conf)], port)
    for name, profile, workers in (
        ("core", "core", 1),
        ("full", "full", 1),
        ("full w=2", "full", 2),
    ):
        port = pb.free_port()
        cfg = pb.write_config(str(tmp), port, fake_port, profile, True, workers)
        out[name] = ([str(pb.VGATE), "serve", "--config", str(cfg)], port)
    return out


async def main_async(args: argparse.Namespace) -> None:
    work = pb.WORKLOADS["chat"]
    fake_port = pb.free_port()
    fake_cmd = [sys.executable, "-m", "tests.fakes.vllm", "--port", str(fake_port)]
    with tempfile.TemporaryDirectory() as name, ExitStack() as stack:
        tmp = Path(name)
        wrk: Path | None = None
        if shutil.which("wrk"):
            wrk = tmp / "bench.lua"
            wrk.write_text(pb.WRK_SCRIPT)
        fake = stack.enter_context(
            pb.service(["taskset", "-c", "0", *fake_cmd], fake_port, tmp / "fake.log")
        )
        servers = {}
        for column, (cmd, port) in commands(tmp, fake_port).items():
            log = tmp / f"{column.replace(' ', '_')}.log"
            proc = stack.enter_context(pb.service(["taskset", "-c", "1", *cmd], port, log))
            servers[column] = (proc.pid, f"http://127.0.0.1:{port}")
        print(f"columns: direct, {', '.join(servers)}; load from {'wrk' if wrk else 'python'}")
        results: dict[str, list[pb.PathResult]] = {"direct": [], **{c: [] for c in servers}}
        for i in range(args.repeat):
            for column in results:
                print(f"round {i + 1}/{args.repeat}: {column} ...", flush=True)
                pid, base = (
                    (fake.pid, f"http://127.0.0.1:{fake_port}")
                    if column == "direct"
                    else servers[column]
                )
                results[column].append(
                    await pb.measure(base, pid, work, args.seconds, args.latency_requests, wrk)
                )
    report({column: pb.best(runs) for column, runs in results.items()})


def report(best: dict[str, pb.PathResult]) -> None:
    def rps(r: pb.PathResult) -> str:
        return pb.fmt(r.c16.count / r.c16.seconds)

    def eps(r: pb.PathResult) -> str:
        return pb.fmt(None if r.streams is None else r.streams.events / r.streams.seconds)

    direct = best["direct"].c1.pct(best["direct"].c1.latencies, 0.5)
    rows = [
        ("non-streaming req/s, c=16", rps),
        ("CPU ms / request", lambda r: pb.fmt(r.cpu_ms, ".3f")),
        ("added p50 ms, c=1", lambda r: pb.fmt(r.c1.pct(r.c1.latencies, 0.5) - direct, ".3f")),
        ("SSE events/s, 16 x 64 tokens", eps),
        ("CPU us / SSE event", lambda r: pb.fmt(pb.us(r.cpu_ms_stream_event), ".2f")),
        (
            "CPU ms / 64-token stream",
            lambda r: pb.fmt(
                None if r.cpu_ms_stream_event is None else r.cpu_ms_stream_event * 66, ".3f"
            ),
        ),
        ("RSS MB", lambda r: pb.fmt(r.rss, ".1f")),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"{'':{width}}" + "".join(f"  {c:>10}" for c in best))
    for name, cell in rows:
        print(f"{name:{width}}" + "".join(f"  {cell(r):>10}" for r in best.values()))
    core, full = best.get("core"), best.get("full")
    if core and full and core.cpu_ms and full.cpu_ms:
        print(f"\nfull / core CPU per request: {full.cpu_ms / core.cpu_ms:.2f} (target <= 1.25)")
    print("(direct: the CPU columns are the fake engine's own)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="per throughput phase")
    p.add_argument("--repeat", type=int, default=2, help="rounds; the best of each is shown")
    p.add_argument("--latency-requests", type=int, default=1000, help="sequential, c=1")
    p.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.latency_requests, args.repeat = 1.0, 100, 1
    os.sched_setaffinity(0, {0})  # the load generator shares core 0 with the fake upstream
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
