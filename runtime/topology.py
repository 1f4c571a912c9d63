"""Which ranks share a node.

HT mode is hierarchical: a token crosses the network once per destination node and is forwarded
inside the node. portep therefore needs to know the node of every rank. Ranks must be laid out
node-major (ranks ``n*L .. n*L+L-1`` on node ``n``), as torchrun and DeepEP do.

The number of ranks per node ``L`` comes from, in order:

1. ``PORTEP_RANKS_PER_NODE`` — an override, e.g. to run 2 *virtual* nodes of 2 ranks on one
   machine so that the hierarchical path is exercised without a second host;
2. ``LOCAL_WORLD_SIZE`` — set by torchrun;
3. the host names of the ranks, gathered from the group (launchers that set neither, e.g. Ray).

The first two count consecutive ranks of the *world*; a group that is not the whole world (an EP
group of a larger job) is placed by the world ranks of its members, so that e.g. ranks 0 and 2 of
a job with two ranks per node are two nodes of one rank.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

RANKS_PER_NODE_ENV = "PORTEP_RANKS_PER_NODE"


@dataclass(frozen=True)
class Topology:
    """Placement of ``num_ranks`` ranks on ``num_nodes`` nodes of ``ranks_per_node`` ranks each."""

    rank: int
    num_ranks: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.num_ranks % self.ranks_per_node != 0:
            raise ValueError(
                f"ranks_per_node={self.ranks_per_node} must divide the group size {self.num_ranks} "
                f"(set {RANKS_PER_NODE_ENV} to a divisor)"
            )

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        """Group ranks on ``node``."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def peer_ranks(self, local_rank: int) -> list[int]:
        """Group ranks with local index ``local_rank``, one per node (the inter-node peers)."""
        return [n * self.ranks_per_node + local_rank for n in range(self.num_nodes)]


def ranks_per_node_from_env(num_ranks: int) -> int | None:
    """Ranks per node from the environment, or None if it does not say."""
    for name in (RANKS_PER_NODE_ENV, "LOCAL_WORLD_SIZE"):
        value = os.environ.get(name)
        if value:
            try:
                per_node = int(value)
            except ValueError as exc:
                raise ValueError(f"{name}={value!r} is not an integer") from exc
            return min(per_node, num_ranks)
    return None


def _node_major_ranks_per_node(nodes: list) -> int | None:
    """Ranks per node when ``nodes`` (the node of each rank, by rank) is node-major with the same
    number of ranks on every node; None otherwise."""
    per_node = nodes.count(nodes[0])
    expected = [nodes[(r // per_node) * per_node] for r in range(len(nodes))]
    if len(nodes) % per_node != 0 or expected != nodes or len(set(nodes)) != len(nodes) // per_node:
        return None
    return per_node


def _ranks_per_node_from_hostnames(group: dist.ProcessGroup, num_ranks: int) -> int:
    names: list[str | None] = [None] * num_ranks
    dist.all_gather_object(names, socket.gethostname(), group=group)
    per_node = _node_major_ranks_per_node(names)
    if per_node is None:
        raise ValueError(
            f"ranks are not laid out node-major with equal ranks per node (hosts: {names}); give each "
            f"host consecutive ranks, or set {RANKS_PER_NODE_ENV} if host names do not identify machines"
        )
    return per_node


def _group_ranks_per_node(group: dist.ProcessGroup, world_per_node: int) -> int:
    """Ranks per node of ``group`` when every node holds ``world_per_node`` consecutive world ranks."""
    nodes = [r // world_per_node for r in dist.get_process_group_ranks(group)]
    per_node = _node_major_ranks_per_node(nodes)
    if per_node is None:
        raise ValueError(
            f"the group's ranks are not spread over nodes of {world_per_node} world ranks node-major with "
            f"equal ranks per node (node of each group rank: {nodes})"
        )
    return per_node


def discover(group: dist.ProcessGroup) -> Topology:
    """Build the :class:`Topology` of ``group`` (collective when host names must be gathered)."""
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    world_size = dist.get_world_size()
    per_node = ranks_per_node_from_env(world_size)
    if per_node is None:
        per_node = _ranks_per_node_from_hostnames(group, num_ranks)
    elif num_ranks < world_size:
        per_node = _group_ranks_per_node(group, per_node)
    return Topology(rank=rank, num_ranks=num_ranks, ranks_per_node=per_node)
