"""Checks of engines that span machines, against what vLLM's multi-node runtime requires.

vLLM runs one model across nodes in two ways. With its multiprocessing backend ("mp"), every
node runs vLLM: the head (`node_rank` 0) serves the API and the others run `headless`, all with
the same `nnodes`, `master_addr` and `master_port` (the head's torch.distributed rendezvous).
Data-parallel nodes are headless too, holding `data_parallel_size_local` ranks from
`data_parallel_start_rank` on and reaching the head at `data_parallel_address`. With "ray", the
head alone runs vLLM and the Ray cluster places its workers: no nnodes, ranks or headless nodes.

vLLM finds most mistakes only after minutes of loading, on one node, or not at all (a headless
head waits forever for a front end that never comes); these are found in the file. Engines of
one file that share a rendezvous (`master_addr:master_port`) are checked as one group.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.core.binder import Binder
from proxy.core.config.engines import EngineConfig

# Keys on which every node of one group must agree (vLLM builds the same model everywhere).
GROUP_KEYS = (
    "model",
    "preset",
    "dtype",
    "quantization",
    "max_model_len",
    "nnodes",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "distributed_executor_backend",
)
_DP_KEYS = (
    "data_parallel_size_local",
    "data_parallel_start_rank",
    "data_parallel_address",
    "data_parallel_rpc_port",
)


def world_size(e: EngineConfig) -> int:
    """Engine processes of the whole model: data x pipeline x tensor parallel."""
    return (
        (e.data_parallel_size or 1)
        * (e.pipeline_parallel_size or 1)
        * (e.tensor_parallel_size or 1)
    )


def head_address(e: EngineConfig) -> str | None:
    """The address a worker node reaches its head at (None: not a worker node)."""
    if not e.headless:
        return None
    if (e.nnodes or 1) > 1:
        return e.master_addr
    return e.data_parallel_address or e.master_addr


def check_engines(engines: Mapping[str, EngineConfig], binder: Binder) -> None:
    for name, engine in engines.items():
        for key, message in engine_problems(engine):
            binder.problem(f"engines.{name}.{key}", message)
    _check_groups(engines, binder)


def engine_problems(e: EngineConfig) -> list[tuple[str, str]]:
    """(key, problem) pairs of one engine's parallel and multi-node keys."""
    out: list[tuple[str, str]] = []
    nnodes, dp = e.nnodes or 1, e.data_parallel_size or 1
    ray = e.distributed_executor_backend == "ray"
    if e.node_rank is not None and e.node_rank >= nnodes:
        out.append(("node_rank", f"{e.node_rank} must be less than nnodes ({nnodes})"))
    if nnodes > 1:
        if world_size(e) % nnodes:
            out.append(
                (
                    "nnodes",
                    f"{nnodes} nodes must evenly divide the world size {world_size(e)} "
                    "(data_parallel_size x pipeline_parallel_size x tensor_parallel_size)",
                )
            )
        if e.master_addr is None:
            out.append(
                (
                    "master_addr",
                    "is required with nnodes > 1: the head node's address, reachable from "
                    "every node (vLLM's default 127.0.0.1 reaches no other machine)",
                )
            )
        if ray:
            out.append(
                (
                    "distributed_executor_backend",
                    '"ray" places workers across the Ray cluster itself; nnodes, node_rank '
                    'and headless are for "mp" (run the engine on the Ray head only)',
                )
            )
        if (e.node_rank or 0) > 0 and not e.headless:
            out.append(
                (
                    "headless",
                    f"must be true on node_rank {e.node_rank}: only the head (node_rank 0) "
                    "runs the API server",
                )
            )
    elif (e.master_addr is not None or e.master_port is not None) and dp == 1:
        key = "master_addr" if e.master_addr is not None else "master_port"
        out.append((key, "is only used with nnodes > 1 (or data_parallel_size > 1)"))
    if e.headless:
        out += _headless_problems(e, nnodes, ray)
    out += _data_parallel_problems(e, dp)
    return out


def _headless_problems(e: EngineConfig, nnodes: int, ray: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if ray and nnodes == 1:
        out.append(
            (
                "headless",
                'a "ray" engine has no headless nodes: its workers join with `ray start`',
            )
        )
    worker = (nnodes > 1 and (e.node_rank or 0) > 0) or (e.data_parallel_start_rank or 0) > 0
    if not worker and not ray:
        out.append(
            (
                "headless",
                "is a worker node of a head elsewhere: it needs node_rank >= 1 (with "
                "nnodes > 1) or data_parallel_start_rank >= 1 (data parallel); "
                "node_rank 0 is the head and serves the API",
            )
        )
    if worker and head_address(e) is None:
        key = "master_addr" if nnodes > 1 else "data_parallel_address"
        out.append((key, "is required on a headless node: where it reaches its head"))
    return out


def _data_parallel_problems(e: EngineConfig, dp: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if dp == 1:
        return [
            (key, "applies to data-parallel engines only (data_parallel_size > 1)")
            for key in _DP_KEYS
            if getattr(e, key) is not None
        ]
    local, start = e.data_parallel_size_local, e.data_parallel_start_rank
    if local is not None and local > dp:
        out.append(("data_parallel_size_local", f"{local} is more than data_parallel_size ({dp})"))
    if start is not None and start + (local or 1) > dp:
        out.append(
            (
                "data_parallel_start_rank",
                f"ranks {start}..{start + (local or 1) - 1} do not fit in data_parallel_size "
                f"({dp})",
            )
        )
    return out


def _check_groups(engines: Mapping[str, EngineConfig], binder: Binder) -> None:
    """Nodes of one model in the same file: the same model and sizes, each rank once."""
    groups: dict[tuple[str, int | None], list[str]] = {}
    for name, e in engines.items():
        if (e.nnodes or 1) > 1 and e.master_addr is not None:
            groups.setdefault((e.master_addr, e.master_port), []).append(name)
    for (addr, port), names in groups.items():
        where = f"{addr}:{port or 29501}"
        first = engines[names[0]]
        ranks: dict[int, str] = {}
        for name in names:
            e = engines[name]
            for key in GROUP_KEYS:
                if getattr(e, key) != getattr(first, key):
                    binder.problem(
                        f"engines.{name}.{key}",
                        f"{getattr(e, key)!r} differs from engines.{names[0]}.{key} "
                        f"({getattr(first, key)!r}): the nodes of {where} must agree",
                    )
            rank = e.node_rank or 0
            if rank in ranks:
                binder.problem(
                    f"engines.{name}.node_rank",
                    f"{rank} is also engines.{ranks[rank]}'s node rank in {where}",
                )
            ranks.setdefault(rank, name)
