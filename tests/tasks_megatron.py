"""Megatron-core's DeepEP token dispatcher, unchanged, on portep through the ``deep_ep`` alias.

Each rank drives ``MoEFlexTokenDispatcher`` (backend ``deepep``) the way Megatron's ``MoELayer``
does: ``dispatch_preprocess`` -> ``token_dispatch`` -> ``dispatch_postprocess`` -> experts ->
``combine_preprocess`` -> ``token_combine`` -> ``combine_postprocess``, then backpropagates. The
dispatcher calls Megatron's ``fused_a2a.fused_dispatch``/``fused_combine`` (autograd functions
over ``deep_ep.Buffer``), which run on portep. Every rank regenerates every group member's inputs
from ``(seed, rank)`` and checks its outputs and gradients against a plain computation.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist

import portep
from tests.tasks_common import cached, gather, generator, set_topology

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Bound on calc_diff over the EP group's results against the float64 reference computed from the
# same (rounded) inputs: float32 differs by summation order only (about 3e-14); bfloat16 also rounds
# the expert outputs, the combined rows and the gradients (about 5e-6).
MAX_DIFF = {"float32": 1e-10, "bfloat16": 5e-5}


def _ep_group(world_size: int, ep_groups: list[list[int]] | None) -> dist.ProcessGroup:
    """This rank's EP group: WORLD, or its member of ``ep_groups`` (created once per worker; every
    rank creates every group, in the same order, as ``dist.new_group`` requires)."""
    if ep_groups is None:
        return dist.group.WORLD
    rank = dist.get_rank()
    groups = cached(("megatron-ep-groups", world_size, tuple(map(tuple, ep_groups))),
                    lambda: [dist.new_group(ranks) for ranks in ep_groups])
    mine = [group for ranks, group in zip(ep_groups, groups, strict=True) if rank in ranks]
    assert len(mine) == 1, f"rank {rank} must be in exactly one EP group of {ep_groups}"
    return mine[0]


def _exact(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype``, held in float64 (the reference starts from what the ranks use)."""
    return values.to(dtype).double()


def _inputs(seed: int, world_rank: int, num_tokens: int, hidden: int, num_experts: int, topk: int,
            iteration: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One rank's tokens, routing (distinct experts per token), routing weights and output gradient."""
    gen = generator(seed, world_rank, salt=iteration)
    x = _exact(torch.randn(num_tokens, hidden, generator=gen), dtype)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    weights = _exact(torch.rand(num_tokens, topk, generator=gen) + 0.1, torch.float32)
    grad_out = _exact(torch.randn(num_tokens, hidden, generator=gen), dtype)
    return {"x": x, "idx": idx, "weights": weights, "grad_out": grad_out}


def _expert_weights(seed: int, num_experts: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """``[num_experts, hidden, hidden]`` expert matrices, the same on every rank."""
    gen = generator(seed, 10_000)
    return _exact(torch.randn(num_experts, hidden, hidden, generator=gen) / hidden**0.5, dtype)


def _reference(inputs: list[dict[str, torch.Tensor]], expert_weights: torch.Tensor) -> dict[str, Any]:
    """Forward and backward of ``out[t] = sum_k weights[t, k] * x[t] @ W[idx[t, k]]`` over every
    group member's tokens, in float64: outputs, input gradients, expert-weight gradients and the
    number of (token, expert) rows per expert."""
    w = expert_weights.clone().requires_grad_(True)
    xs = [item["x"].clone().requires_grad_(True) for item in inputs]
    ps = [item["weights"].clone().requires_grad_(True) for item in inputs]
    outs = []
    loss = torch.zeros((), dtype=torch.float64)
    for item, x, p in zip(inputs, xs, ps, strict=True):
        per_k = torch.einsum("th,tkhg->tkg", x, w[item["idx"]])
        out = (per_k * p.unsqueeze(-1)).sum(1)
        outs.append(out.detach())
        loss = loss + (out * item["grad_out"]).sum()
    loss.backward()
    counts = torch.zeros(expert_weights.size(0), dtype=torch.int64)
    for item in inputs:
        counts += torch.bincount(item["idx"].flatten(), minlength=expert_weights.size(0))
    return {"out": outs, "x_grad": [x.grad for x in xs], "weights_grad": [p.grad for p in ps],
            "w_grad": w.grad, "counts": counts}


def _dispatcher(group: dist.ProcessGroup, num_local_experts: int, topk: int, hidden: int) -> Any:
    """Megatron's flex token dispatcher with the DeepEP backend over ``group``."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    ep_size, ep_rank = group.size(), group.rank()
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=1, use_cpu_initialization=True,
        num_moe_experts=ep_size * num_local_experts, moe_router_topk=topk, moe_router_dtype="fp32",
        moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep", moe_permute_fusion=False,
        expert_model_parallel_size=ep_size)
    local_expert_indices = [ep_rank * num_local_experts + i for i in range(num_local_experts)]
    pg_collection = ProcessGroupCollection(ep=group, tp_ep=group, expt_tp=None)
    return MoEFlexTokenDispatcher(num_local_experts, local_expert_indices, config, pg_collection=pg_collection)


def _import_megatron_with_portep() -> Any:
    """Megatron-core's ``fused_a2a`` module, imported after the ``deep_ep`` alias so it uses portep."""
    portep.install_deep_ep_alias()
    from megatron.core.transformer.moe import fused_a2a

    assert fused_a2a.HAVE_DEEP_EP, "megatron.core.transformer.moe.fused_a2a was imported without deep_ep"
    assert fused_a2a.Buffer is portep.Buffer, f"Megatron's deep_ep.Buffer is {fused_a2a.Buffer!r}, not portep's"
    return fused_a2a


def _problems(rank: int, group: dist.ProcessGroup, results: dict[str, tuple[torch.Tensor, torch.Tensor]],
              dtype: str, worst: dict[str, float]) -> list[str]:
    """What is wrong with this rank's ``{name: (got, want)}`` (collective over ``group``).

    float32: element-wise within rounding of a float32 summation order, on every rank. Both dtypes:
    ``calc_diff`` over the concatenation of the group's results (per rank it is unstable for a rank
    with one token) below ``MAX_DIFF``; ``worst`` keeps the largest per quantity."""
    from portep.reference import calc_diff

    problems = []
    for name, (got, want) in results.items():
        if got.shape != want.shape:
            problems.append(f"rank {rank}: {name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.isfinite(got).all():
            problems.append(f"rank {rank}: {name}: contains NaN/inf")
        elif dtype == "float32" and not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            error = (got - want).abs().max().item()
            problems.append(f"rank {rank}: {name}: off by up to {error:.3g} from the reference")
    everyone = gather(results, group)
    for name in results:
        got = torch.cat([item[name][0].flatten() for item in everyone])
        want = torch.cat([item[name][1].flatten() for item in everyone])
        if got.shape != want.shape:
            continue
        diff = calc_diff(got, want)
        worst[name] = max(worst.get(name, 0.0), diff)
        if not diff < MAX_DIFF[dtype]:
            problems.append(f"rank {rank}: {name}: calc_diff over the group = {diff:.3g} >= {MAX_DIFF[dtype]:g}")
    return problems


def _raise_together(problems: list[str]) -> None:
    """Raise on every rank if any rank found a problem (a rank that raised alone would leave the
    others waiting in the next collective call)."""
    everyone = [p for rank_problems in gather(problems) for p in rank_problems]
    if everyone:
        raise AssertionError("\n".join(everyone))


def flex_dispatcher(rank: int, world_size: int, *, seed: int, num_nodes: int, ep_groups: list[list[int]] | None,
                    num_tokens: list[int], hidden: int, num_local_experts: int, topk: int, async_comm: bool,
                    dtype: str = "float32", iterations: int = 2) -> dict[str, float]:
    """Forward and backward through Megatron's DeepEP dispatch/combine, ``iterations`` times on the
    Buffer Megatron caches, on this rank's EP group; returns the worst calc_diff per quantity."""
    set_topology(world_size, num_nodes)
    fused_a2a = _import_megatron_with_portep()
    group = _ep_group(world_size, ep_groups)
    members = dist.get_process_group_ranks(group)
    ep_rank = group.rank()
    num_experts = group.size() * num_local_experts
    local = slice(ep_rank * num_local_experts, (ep_rank + 1) * num_local_experts)
    torch_dtype = DTYPES[dtype]
    expert_weights = _expert_weights(seed, num_experts, hidden, torch_dtype)
    dispatcher = _dispatcher(group, num_local_experts, topk, hidden)
    worst: dict[str, float] = {}
    buffers = []
    try:
        # dispatch_preprocess is wrapped by Megatron's jit_fuser (torch.compile); run it eagerly so
        # that four ranks do not compile it with inductor on a shared CPU.
        with torch.compiler.set_stance("force_eager"):
            for iteration in range(iterations):
                inputs = [_inputs(seed, r, num_tokens[r], hidden, num_experts, topk, iteration, torch_dtype)
                          for r in members]
                want = _reference(inputs, expert_weights)
                mine = inputs[ep_rank]

                x = mine["x"].to(torch_dtype).requires_grad_(True)
                weights = mine["weights"].float().requires_grad_(True)
                w_local = expert_weights[local].to(torch_dtype).requires_grad_(True)
                # Router output as Megatron's TopKRouter gives it: a boolean routing map and the
                # probabilities of the selected experts (zero elsewhere), both [tokens, experts].
                routing_map = torch.zeros(x.size(0), num_experts, dtype=torch.bool)
                routing_map.scatter_(1, mine["idx"], True)
                probs = torch.zeros(x.size(0), num_experts).scatter(1, mine["idx"], weights)

                hidden_states, probs_pre = dispatcher.dispatch_preprocess(x, routing_map, probs)
                hidden_states, probs_d = dispatcher.token_dispatch(
                    hidden_states, probs_pre, async_finish=async_comm, allocate_on_comm_stream=async_comm)
                tokens, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(hidden_states, probs_d)
                counts = [int(c) for c in tokens_per_expert.tolist()]
                problems = [] if counts == want["counts"][local].tolist() else [
                    f"rank {rank}: tokens per local expert {counts}, expected {want['counts'][local].tolist()}"]
                chunks = torch.split(tokens, counts)
                prob_chunks = torch.split(permuted_probs, counts)
                expert_out = torch.cat([
                    (chunk @ w_local[i]) * prob.unsqueeze(-1).to(torch_dtype)
                    for i, (chunk, prob) in enumerate(zip(chunks, prob_chunks, strict=True))])
                out = dispatcher.combine_preprocess(expert_out)
                out = dispatcher.token_combine(out, async_finish=async_comm, allocate_on_comm_stream=async_comm)
                out = dispatcher.combine_postprocess(out)
                buffers.append(fused_a2a._buffer)

                out.backward(mine["grad_out"].to(torch_dtype))
                results = {"output": (out.detach(), want["out"][ep_rank]),
                           "grad of x": (x.grad, want["x_grad"][ep_rank]),
                           "grad of routing weights": (weights.grad, want["weights_grad"][ep_rank]),
                           "grad of expert weights": (w_local.grad, want["w_grad"][local])}
                problems += _problems(rank, group, {name: (got.double(), ref) for name, (got, ref) in results.items()},
                                      dtype, worst)
                _raise_together(problems)
        assert all(b is buffers[0] for b in buffers), f"rank {rank}: Megatron did not reuse its Buffer"
        assert buffers[0].group is group, f"rank {rank}: Megatron's Buffer is on another group"
        # The group spans the (virtual) nodes its members are on: one entry per node, None for one.
        ranks_per_node = world_size // num_nodes
        nodes = len({r // ranks_per_node for r in members})
        per_node = buffers[0].get_dispatch_layout(mine["idx"], num_experts)[1]
        found = 1 if per_node is None else per_node.numel()
        assert found == nodes, f"rank {rank}: EP group {members} spans {nodes} node(s), the Buffer found {found}"
        return worst
    finally:
        # Megatron keeps its Buffer in a module global; release it (collectively) before the next
        # task, which may use another group.
        dist.barrier()
        buffers.clear()
        fused_a2a._buffer = None
        gc.collect()
