"""Fixtures for the multi-host tests: the network and Redis once per module, fresh proxies per
test (fresh breakers and pools), the fake engines' records reset per test.

Without root or iproute2 the tests are skipped; `VGATE_REQUIRE_NETNS=1` (`make test`) turns
that into a failure, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from policies.auth import new_key
from tests.fakes.vllm import FakeVLLM
from tests.net import netns
from tests.net.cluster import (
    ENGINE_PORT,
    PROXY_PORT,
    REDIS_PORT,
    Cluster,
    Keys,
    Proxy,
)


def _unavailable(reason: str) -> None:
    if os.environ.get("VGATE_REQUIRE_NETNS") == "1":
        pytest.fail(f"VGATE_REQUIRE_NETNS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def netns_usable() -> None:
    """Skip (or fail) unless namespaces can be made; first removes what a dead run left."""
    reason = netns.unavailable()
    if reason is not None:
        _unavailable(reason)
    try:
        netns.remove_stale()
    except (netns.NetnsError, OSError) as exc:
        _unavailable(f"cannot list network namespaces here: {exc}")


@pytest.fixture(scope="module")
def network(netns_usable: None) -> Iterator[netns.Network]:
    try:
        net = netns.Network()
    except (netns.NetnsError, OSError) as exc:
        _unavailable(f"cannot make network namespaces here: {exc}")
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def cluster(network: netns.Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Hosts: redis .2, proxy1 .11, proxy2 .12, engine1 .21, engine2 .22, client .100.

    proxy1 balances by least outstanding requests only; proxy2 adds prefix affinity.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make system-packages)")
    hosts = {name: network.add(name, octet) for name, octet in _HOSTS}
    cluster = Cluster(
        network,
        redis=hosts["redis"],
        proxies=[Proxy(hosts["proxy1"], "none"), Proxy(hosts["proxy2"], "prefix")],
        engines=[hosts["engine1"], hosts["engine2"]],
        client=hosts["client"],
    )
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    args = [binary, "--bind", cluster.redis.address, "--port", str(REDIS_PORT)]
    args += ["--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = cluster.redis.spawn(args, log)
    # Asked from a proxy host: Redis must answer across the switch, not only on its own host.
    cluster.proxies[0].host.wait_listening(cluster.redis.address, REDIS_PORT, proc=proc, log=log)
    for engine in cluster.engines:
        # Started on a thread inside the engine's namespace: its listening socket lives there.
        fake = engine.call(lambda e=engine: FakeVLLM(e.address, ENGINE_PORT).start())
        cluster.fakes.append(fake)
    try:
        yield cluster
    finally:
        for fake in cluster.fakes:
            fake.stop()


_HOSTS = [
    ("redis", 2),
    ("proxy1", 11),
    ("proxy2", 12),
    ("engine1", 21),
    ("engine2", 22),
    ("client", 100),
]


@pytest.fixture
def keys() -> Keys:
    load, load_sha = new_key()
    metered, metered_sha = new_key()
    return Keys(load, load_sha, metered, metered_sha)


@pytest.fixture
def running(cluster: Cluster, keys: Keys, tmp_path: Path) -> Iterator[Cluster]:
    """The cluster with both proxies started for this test, engines idle and records empty;
    every link healed afterwards, whatever the test did."""
    for fake in cluster.fakes:
        # Streams cut by an earlier test finish on the engine's side once their tokens are out.
        assert fake.wait(lambda r: r.inflight == 0, 10.0), "an engine is still busy"
        fake.reset()
    prefix = f"test:{uuid.uuid4().hex}"  # budgets of this test only, in the shared Redis
    procs = []
    try:
        for proxy in cluster.proxies:
            path = tmp_path / f"{proxy.host.name}.toml"
            path.write_text(cluster.config(proxy, keys, prefix))
            proxy.log = tmp_path / f"{proxy.host.name}.log"
            proxy.base_url = f"http://{proxy.host.address}:{PROXY_PORT}"
            args = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)]
            procs.append((proxy, proxy.host.spawn(args, proxy.log)))
        for proxy, proc in procs:
            address = proxy.host.address
            cluster.client.wait_listening(address, PROXY_PORT, proc=proc, log=proxy.log)
        for proxy in cluster.proxies:
            cluster.wait_states(proxy, healthy=True, breaker="closed")
        yield cluster
    finally:
        cluster.network.heal()
        for proxy, proc in procs:
            proxy.host.stop(proc)
