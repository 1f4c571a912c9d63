"""A multi-node portep job, started by torchrun on every host (see tests/test_multihost.py).

Each rank initialises gloo from torchrun's environment, checks who it is (host name, address,
local ranks), creates an HT and an LL ``portep.Buffer`` the way a DeepEP user does (no
``PORTEP_RANKS_PER_NODE``: nodes come from torchrun and the host names), runs HT dispatch/combine
(BF16 and FP8) and LL dispatch/combine (BF16 and FP8) on random data, compares every result with
:mod:`portep.reference`, and writes ``rank<N>.json`` to ``--out`` (on a file system every host
shares), with ``"ok": false`` and the traceback when something fails.

Run by hand on two hosts::

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank {0,1} --master-addr HOST_A --master-port 29400 \\
        tests/multihost_job.py --out /shared/dir
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import portep
from portep import reference

REPO_ROOT = Path(__file__).resolve().parent.parent
GLOO_TIMEOUT_S = 120.0
HIDDEN = 256  # a multiple of 128: FP8 needs it
NUM_EXPERTS = 16
TOPK = 4
HT_TOKENS = [48, 37, 29, 16]  # per rank (cycled for other world sizes)
LL_MAX_TOKENS = 48
LL_TOKENS = [48, 30, 17, 41]


def _tokens(per_rank: list[int], rank: int) -> int:
    return per_rank[rank % len(per_rank)]


def _all_tokens(per_rank: list[int], world_size: int) -> list[int]:
    return [per_rank[r % len(per_rank)] for r in range(world_size)]


@contextmanager
def _env_without(name: str) -> Iterator[None]:
    """``os.environ`` without ``name`` inside the block."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def _topology(buffer: Any) -> dict[str, int]:
    topo = buffer.topology
    return {"ranks_per_node": topo.ranks_per_node, "num_nodes": topo.num_nodes, "node": topo.node,
            "local_rank": topo.local_rank}


def _internode_rows(is_token_in_rank: Any, rank: int, ranks_per_node: int) -> int:
    """Rows a hierarchical dispatch sends over the network: one per (token, other node it needs)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    nodes = is_token_in_rank.view(num_tokens, num_ranks // ranks_per_node, ranks_per_node).any(2)
    nodes[:, rank // ranks_per_node] = False
    return int(nodes.sum())


# ------------------------------------------------------------------------------------------ identity


def identity() -> dict[str, Any]:
    """Who this rank is and where; node discovery from host names alone (collective)."""
    from portep.topology import discover
    from tests.tasks_common import gather

    hostname = socket.gethostname()
    out: dict[str, Any] = {
        "hostname": hostname,
        "host_address": socket.gethostbyname(hostname),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
        "group_rank": int(os.environ.get("GROUP_RANK", "-1")),
        "hosts": gather(hostname),
    }
    # Without torchrun's LOCAL_WORLD_SIZE, portep groups ranks by host name.
    with _env_without("LOCAL_WORLD_SIZE"):
        try:
            out["hostname_ranks_per_node"] = discover(dist.group.WORLD).ranks_per_node
        except Exception as exc:  # noqa: BLE001 - recorded, the test reports it
            out["hostname_ranks_per_node"] = f"{type(exc).__name__}: {exc}"
    return out


def control_plane_jobs() -> list[dict[str, Any]]:
    """The job files running control-plane servers left in ``$PORTEP_RUN_DIR`` (what ``portep
    status`` reads): where rank 0's server listens. Empty without that variable or a server."""
    directory = os.environ.get("PORTEP_RUN_DIR")
    if not directory:
        return []
    jobs = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        jobs.append({"host": info.get("host"), "address": info.get("address")})
    return jobs


# ------------------------------------------------------------------------------------------ HT


def ht_round(buffer: Any, rank: int, world_size: int, seed: int, fp8: bool) -> dict[str, Any]:
    """One HT dispatch and combine against the reference; returns diffs and cross-node rows."""
    from tests.tasks_common import assert_equal, gather, generator, make_routing, make_x
    from tests.tasks_ht import check_ht_combine

    tag = "HT FP8" if fp8 else "HT BF16"
    gen = generator(seed, rank)
    n = _tokens(HT_TOKENS, rank)
    topk_idx, topk_weights = make_routing(gen, n, NUM_EXPERTS, TOPK)
    x_bf16 = make_x(gen, n, HIDDEN)
    x: Any = reference.per_token_cast_to_fp8(x_bf16) if fp8 else x_bf16
    ranks_per_node = buffer.topology.ranks_per_node

    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    want = reference.layout(topk_idx, NUM_EXPERTS, world_size, ranks_per_node)
    for name, got, expected in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                                    "is_token_in_rank"), (per_rank, per_rdma, per_expert, in_rank), want,
                                   strict=True):
        assert_equal(rank, f"{tag}: {name}", got, expected)

    before = buffer.get_stats()["ht_internode_rows"]
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        config=portep.Buffer.get_dispatch_config(world_size))
    dispatch_rows = buffer.get_stats()["ht_internode_rows"] - before
    want_rows = _internode_rows(in_rank, rank, ranks_per_node)
    assert dispatch_rows == want_rows, (
        f"rank {rank}: {tag}: dispatch sent {dispatch_rows} rows to other nodes, expected {want_rows}")

    all_x, all_idx, all_w = gather(x), gather(topk_idx), gather(topk_weights)
    refs = [reference.ht_dispatch(all_x, all_idx, all_w, NUM_EXPERTS, r) for r in range(world_size)]
    ref = refs[rank]
    if fp8:
        assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"rank {rank}: {tag}: recv_x must be (x, scales)"
        assert_equal(rank, f"{tag}: recv_x[0] (fp8)", recv_x[0], ref.recv_x[0])
        assert_equal(rank, f"{tag}: recv_x[1] (scales)", recv_x[1].contiguous(), ref.recv_x[1].contiguous())
        rows = reference.per_token_cast_back(recv_x[0], recv_x[1])
    else:
        assert_equal(rank, f"{tag}: recv_x", recv_x, ref.recv_x)
        rows = recv_x
    assert_equal(rank, f"{tag}: recv_topk_idx", recv_idx, ref.recv_topk_idx)
    assert_equal(rank, f"{tag}: recv_topk_weights", recv_w, ref.recv_topk_weights)
    assert_equal(rank, f"{tag}: num_recv_tokens_per_expert_list", list(counts), ref.num_recv_tokens_per_expert_list)

    # Expert output: the received rows scaled per rank, so copies from different ranks differ.
    y = (rows.float() * (1 + 0.5 * rank)).to(torch.bfloat16)
    all_y = gather(y)
    recv_srcs = [r.recv_src for r in refs]
    num_tokens = [t.size(0) for t in all_idx]
    combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w,
                                             config=portep.Buffer.get_combine_config(world_size))
    _, want_w = reference.ht_combine(all_y, recv_srcs, num_tokens, rank,
                                     recv_topk_weights=[r.recv_topk_weights for r in refs])
    diff = check_ht_combine(rank, f"{tag}: combine", combined, all_y, recv_srcs, num_tokens)
    assert_equal(rank, f"{tag}: combined_topk_weights", combined_w, want_w)
    return {"recv_rows": int(ref.recv_topk_idx.size(0)), "dispatch_internode_rows": dispatch_rows,
            "combine_diff": diff}


def run_ht(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """An HT Buffer sized as DeepEP callers size it; BF16 then FP8 rounds; its stats."""
    from tests.tasks_common import ht_buffer_bytes

    nvl, rdma = ht_buffer_bytes(HIDDEN, world_size)
    buffer = portep.Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=False)
    out: dict[str, Any] = {"backend": buffer.backend_name, "topology": _topology(buffer),
                           "control_plane_jobs": control_plane_jobs()}
    out["bf16"] = ht_round(buffer, rank, world_size, seed, fp8=False)
    out["fp8"] = ht_round(buffer, rank, world_size, seed + 1, fp8=True)
    out["stats"] = buffer.get_stats()
    dist.barrier()
    return out


# ------------------------------------------------------------------------------------------ LL


def run_ll(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """An LL Buffer; BF16 then FP8 dispatch and combine against the reference; its stats."""
    from tests.tasks_ll import LLCase

    rdma = portep.Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, HIDDEN, world_size, NUM_EXPERTS)
    buffer = portep.Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True,
                           num_qps_per_rank=NUM_EXPERTS // world_size)
    out: dict[str, Any] = {"backend": buffer.backend_name, "topology": _topology(buffer)}
    for offset, use_fp8 in enumerate((False, True)):
        name = "fp8" if use_fp8 else "bf16"
        case = LLCase(rank, world_size, seed + offset, _all_tokens(LL_TOKENS, world_size), LL_MAX_TOKENS, HIDDEN,
                      NUM_EXPERTS, TOPK, use_fp8=use_fp8)
        recv_x, recv_count, handle, _, _ = case.dispatch(buffer)
        case.check_dispatch(recv_x, recv_count, handle, f" ({name}, two hosts)")
        y = case.expert_output(recv_x, recv_count)
        want = case.reference_combine(y)
        combined, _, _ = buffer.low_latency_combine(y, case.topk_idx, case.topk_weights, handle)
        case.check_combine(combined, want, f" ({name}, two hosts)")
        # LL exchanges span the whole group (``rows_world``); count the verified rows whose source
        # rank is on another node.
        node = buffer.topology.node
        from_other = sum(int((src // buffer.topology.ranks_per_node != node).sum()) for src in case.ref.recv_src_rank)
        out[name] = {"recv_count": [int(c) for c in recv_count], "rows_from_other_nodes": from_other}
    out["stats"] = buffer.get_stats()
    dist.barrier()
    return out


# ------------------------------------------------------------------------------------------ main


def _write(out_dir: Path, rank: int, result: dict[str, Any]) -> None:
    path = out_dir / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the checks on this rank and write its result; exit status 0 when they all passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="shared directory for rank<N>.json")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result: dict[str, Any] = {"rank": rank, "world_size": world_size, "ok": False, "stage": "init"}
    start = time.monotonic()
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=timedelta(seconds=GLOO_TIMEOUT_S))
        result["stage"] = "identity"
        result.update(identity())
        result["stage"] = "ht"
        result["ht"] = run_ht(rank, world_size, args.seed)
        result["stage"] = "ll"
        result["ll"] = run_ll(rank, world_size, args.seed + 10)
        result["stage"] = "done"
        result["ok"] = True
    except BaseException:  # noqa: BLE001 - every failure is reported in the rank's result
        result["error"] = traceback.format_exc()
        print(f"rank {rank} failed in stage {result['stage']}:\n{result['error']}", file=sys.stderr, flush=True)
    result["seconds"] = round(time.monotonic() - start, 2)
    _write(args.out, rank, result)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
