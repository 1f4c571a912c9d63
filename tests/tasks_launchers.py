"""Ranks as launchers start them. Launchers other than torchrun (Ray, a custom spawner) set no
``LOCAL_RANK`` or ``LOCAL_WORLD_SIZE`` (nor ``PORTEP_RANKS_PER_NODE``), so portep finds the nodes
from host identity; torchrun sets ``LOCAL_WORLD_SIZE``, which counts consecutive world ranks.

Machines are emulated by the host name each rank reports (``socket.gethostname``), which is the
identity portep's node discovery uses. The emulated machines share this host, so the control plane
is pinned to loopback (the emulated names do not resolve) and the transport between nodes to the
same-host one (``PORTEP_TRANSPORT=shm``), as portep picks by itself for virtual nodes.

The tasks build several EP groups one after the other, keep their Buffers alive together, and
check every HT round trip against :mod:`portep.reference`, and the discovered nodes through the
public API: ``num_tokens_per_rdma_rank`` (None on one node, one entry per node otherwise) and the
``ht_internode_rows`` counter (one row per token and other node).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

import portep
from portep import reference
from tests.tasks_common import assert_equal, cached, gather, generator, make_routing, set_topology

# What torchrun sets and other launchers do not, plus portep's own override.
LAUNCHER_VARS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "PORTEP_RANKS_PER_NODE")
CONTROL_HOST_ENV = "PORTEP_CONTROL_HOST"
TRANSPORT_ENV = "PORTEP_TRANSPORT"


@contextmanager
def launched(host_of_rank: list[str] | None, local_world_size: int | None = None) -> Iterator[None]:
    """Run the block as a rank of a launcher that sets no local-rank variables, or (with
    ``local_world_size``) as torchrun sets them; with ``host_of_rank``, on the machine named
    ``host_of_rank[rank]``."""
    rank = dist.get_rank()
    saved = {name: os.environ.get(name) for name in (*LAUNCHER_VARS, CONTROL_HOST_ENV, TRANSPORT_ENV)}
    real_gethostname = socket.gethostname
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    if local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
        os.environ["LOCAL_RANK"] = str(rank % local_world_size)
    if host_of_rank is not None:
        os.environ[CONTROL_HOST_ENV] = "127.0.0.1"
        os.environ[TRANSPORT_ENV] = "shm"
        socket.gethostname = lambda: host_of_rank[rank]  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.gethostname = real_gethostname  # type: ignore[assignment]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _my_group(world_size: int, layout: list[list[int]] | None) -> tuple[tuple[int, ...], dist.ProcessGroup]:
    """This rank's group of ``layout`` (None: WORLD) and its members. Every rank creates every group
    of a layout, in order, as ``dist.new_group`` requires; once per worker."""
    if layout is None:
        return tuple(range(world_size)), dist.group.WORLD
    groups = cached(("launcher-groups", world_size, tuple(map(tuple, layout))),
                    lambda: {tuple(ranks): dist.new_group(ranks) for ranks in layout})
    rank = dist.get_rank()
    return next((ranks, group) for ranks, group in groups.items() if rank in ranks)


def _expected_nodes(members: tuple[int, ...], host_of_rank: list[str] | None, local_world_size: int | None) -> int:
    """Number of nodes the group's members are on: by emulated host, by torchrun's consecutive
    ranks, else all on this host."""
    if host_of_rank is not None:
        return len({host_of_rank[r] for r in members})
    if local_world_size is not None:
        return len({r // local_world_size for r in members})
    return 1


def _new_buffer(group: dist.ProcessGroup, hidden: int) -> portep.Buffer:
    """An HT Buffer sized as DeepEP callers size it, destroyed explicitly at the end of the task."""
    size = group.size()
    nvl = rdma = 0
    for config in (portep.Buffer.get_dispatch_config(size), portep.Buffer.get_combine_config(size)):
        nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden * 4, size))
        rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden * 4, size))
    return portep.Buffer(group, nvl, rdma, explicitly_destroy=True)


def _ht_round(buffer: portep.Buffer, members: tuple[int, ...], num_nodes: int, *, seed: int, salt: int,
              hidden: int) -> int:
    """HT dispatch + combine on ``buffer``'s group against the reference, and the node layout the
    Buffer discovered (``num_nodes`` nodes, members node-major); returns the number of nodes found."""
    group = buffer.group
    rank, size, world_rank = group.rank(), group.size(), dist.get_rank()
    num_experts, topk = 2 * size, min(3, 2 * size)
    gen = generator(seed, world_rank, salt)
    num_tokens = 6 + 5 * world_rank
    topk_idx, topk_weights = make_routing(gen, num_tokens, num_experts, topk)
    x = torch.randn(num_tokens, hidden, generator=gen)

    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    ranks_per_node = size // num_nodes
    want_layout = reference.layout(topk_idx, num_experts, size, ranks_per_node)
    where = f"group {list(members)}"
    if num_nodes == 1:
        assert per_node is None, f"rank {world_rank}: {where}: one node, but num_tokens_per_rdma_rank={per_node}"
    else:
        assert per_node is not None, f"rank {world_rank}: {where}: {num_nodes} nodes were not discovered"
        assert_equal(world_rank, f"{where}: num_tokens_per_rdma_rank", per_node, want_layout[1])
    assert_equal(world_rank, f"{where}: is_token_in_rank", in_rank, want_layout[3])

    before = buffer.get_stats()["ht_internode_rows"]
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    sent = buffer.get_stats()["ht_internode_rows"] - before
    my_node = rank // ranks_per_node
    other_nodes = in_rank.view(num_tokens, num_nodes, ranks_per_node).any(2)
    other_nodes[:, my_node] = False
    assert sent == int(other_nodes.sum()), (
        f"rank {world_rank}: {where}: {sent} rows crossed nodes, expected {int(other_nodes.sum())}")

    all_x, all_idx, all_w = gather(x, group), gather(topk_idx, group), gather(topk_weights, group)
    refs = [reference.ht_dispatch(all_x, all_idx, all_w, num_experts, r) for r in range(size)]
    assert_equal(world_rank, f"{where}: recv_x", recv_x, refs[rank].recv_x)
    assert_equal(world_rank, f"{where}: recv_topk_idx", recv_idx, refs[rank].recv_topk_idx)
    assert_equal(world_rank, f"{where}: recv_topk_weights", recv_w, refs[rank].recv_topk_weights)
    assert_equal(world_rank, f"{where}: counts", list(counts), refs[rank].num_recv_tokens_per_expert_list)

    ys = [ref.recv_x * (1 + r) for r, ref in enumerate(refs)]
    combined, _, _ = buffer.combine(recv_x * (1 + rank), handle)
    want, _ = reference.ht_combine(ys, [ref.recv_src for ref in refs], [t.size(0) for t in all_x], rank)
    torch.testing.assert_close(combined, want, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"rank {world_rank}: {where}: combine: {m}")
    return 1 if per_node is None else per_node.numel()


def several_groups(rank: int, world_size: int, *, seed: int, host_of_rank: list[str] | None,
                   layouts: list[list[list[int]] | None], local_world_size: int | None = None,
                   hidden: int = 32) -> list[int]:
    """Build one Buffer per layout of EP groups, one after the other (``None`` stands for WORLD),
    keep them all, run an HT round on each and then again on the first; returns, per layout, the
    number of nodes the Buffer found this rank's group on."""
    set_topology(world_size, 1)  # the session's backend; the node size is dropped below
    found = []
    with launched(host_of_rank, local_world_size):
        buffers: list[tuple[portep.Buffer, tuple[int, ...], int]] = []
        try:
            for layout in layouts:
                members, group = _my_group(world_size, layout)
                nodes = _expected_nodes(members, host_of_rank, local_world_size)
                buffers.append((_new_buffer(group, hidden), members, nodes))
            for salt, (buffer, members, num_nodes) in enumerate(buffers + buffers[:1]):
                found.append(_ht_round(buffer, members, num_nodes, seed=seed, salt=salt, hidden=hidden))
        finally:
            for buffer, _, _ in buffers:
                buffer.destroy()
    return found[: len(layouts)]


def interleaved_hosts(rank: int, world_size: int, *, seed: int, host_of_rank: list[str],
                      node_local: list[list[int]], hidden: int = 32) -> str:
    """Machines that do not hold consecutive ranks: a Buffer over all ranks is refused on every
    rank, before it sets anything up, with an error that says what to do; groups whose members
    share a machine still work. Returns the error message."""
    set_topology(world_size, 1)
    with launched(host_of_rank):
        try:
            portep.Buffer(dist.group.WORLD, 1 << 20, 0, explicitly_destroy=True)
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"rank {rank}: a Buffer over interleaved machines {host_of_rank} was accepted")
        assert "node-major" in message and "PORTEP_RANKS_PER_NODE" in message, f"rank {rank}: {message}"
        members, group = _my_group(world_size, node_local)
        buffer = _new_buffer(group, hidden)
        try:
            _ht_round(buffer, members, _expected_nodes(members, host_of_rank, None), seed=seed, salt=0, hidden=hidden)
        finally:
            buffer.destroy()
    return message
