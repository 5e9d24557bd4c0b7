"""Load balancing a deliberately skewed mixture-of-experts layer: tokens per ep rank (max / mean) and step time
before and after re-placing the hot experts (FlexMoE / SmartMoE), the bytes the move cost; DeepSeek-V3's
auxiliary-loss-free bias over steps; token-moving against expert-moving bytes (Janus) beside the formulas.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/moe_balance.py

``MoE(D, F, E, k)`` (dropless) on a 1-D mesh, ep = the data-parallel dim, ``--tokens`` tokens per rank. The
router is skewed: experts 0 and 1 (both on ep rank 0) get a logit bonus of ``--skew`` on inputs of mean 1,
so rank 0's experts process most assignments. Rank 0 prints:

- imbalance (max / mean assignments per ep rank) and step time (forward + backward + AdamW, median of
  ``--repeats``, slowest rank) with the experts where ``expert_parallel`` put them, then after one
  ``place_experts(balanced_slots(load))``; the bytes that move sent (weights + two AdamW moments of each
  expert that changed rank) against the formula moved x 3 x 2 D F x 4;
- FasterMoE's shadows on top: ``experts_to_shadow`` of one step's load, the imbalance with their rows computed
  where they come from, and step time re-placed against re-placed + shadows (alternating rounds);
- the balancing bias: imbalance per ep rank after 0, 10, 20... steps of ``update_balance_bias`` with the
  placement left alone (the bias alone evening the load, as DeepSeek-V3 does without any auxiliary loss);
- Janus: the forward+backward token all-to-all bytes measured (all ranks) beside ``token_moving_bytes``
  (which assumes an even spread), and ``expert_moving_bytes`` for the same layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_balance import (
    balanced_slots,
    expert_moving_bytes,
    experts_to_shadow,
    imbalance,
    moved_experts,
    rank_load,
    token_moving_bytes,
)
from dtensor_plus.layouts.moe_placement import place_experts


def skewed_moe(args) -> MoE:
    torch.manual_seed(0)
    moe = MoE(args.dim, args.hidden, args.experts, args.top_k, aux_loss_coef=0.0, balance_rate=args.balance_rate)
    with torch.no_grad():
        moe.router.gate.weight[[0, 1]] += args.skew / args.dim
    return moe


def timed_steps(moe, opt, x, repeats: int, balance: bool = False) -> tuple[float, list[torch.Tensor]]:
    """Median seconds per training step on the slowest rank, and each step's global load per expert."""
    times, loads = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        start = time.perf_counter()
        y = moe(x)
        (y * y).mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        loads.append(moe.routing.chosen_E.clone())
        if balance:
            moe.update_balance_bias()
    slowest = torch.tensor([statistics.median(times[1:])])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item(), loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--skew", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--balance-rate", type=float, default=0.02)
    parser.add_argument("--bias-steps", type=int, default=40)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    mesh = dtp.init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    D, F, E, k = args.dim, args.hidden, args.experts, args.top_k
    x_whole = torch.randn(ep, args.tokens, D, generator=torch.Generator().manual_seed(1)) + 1.0
    x = dtp.distribute_tensor(x_whole, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
    say = print if rank == 0 else (lambda *a, **kw: None)
    say(f"MoE D={D} F={F} E={E} top-{k}, ep={ep}, {args.tokens} tokens/rank, skew +{args.skew} on experts 0 and 1 "
        f"(CPU, gloo)")

    # 1. re-placing the hot experts; timed in alternating rounds (old, new, old, ...) on the same warm ranks, as
    # the machine's load drifts: the ratio is the median of the rounds' ratios
    moe = expert_parallel(replicate(skewed_moe(args), mesh, "ep"), mesh, ep_mesh_dim="ep")
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-4, foreach=False)
    old = moe.expert_slot.full_tensor().cpu().clone()
    _, loads = timed_steps(moe, opt, x, args.repeats)
    load = torch.stack(loads).sum(0)
    new = balanced_slots(load, old, ep)
    moved = moved_experts(old, new, ep)
    rounds, loads_after = [], []
    for _ in range(args.rounds):
        before_s, _ = timed_steps(moe, opt, x, args.repeats)
        with dtp.comm_mode() as comm:
            place_experts(moe, new, opt)
        sent = torch.tensor([float(comm.bytes("all_to_all"))])
        after_s, loads_after = timed_steps(moe, opt, x, args.repeats)
        place_experts(moe, old, opt)
        rounds.append((before_s, after_s))
    dist.all_reduce(sent)
    load_after = torch.stack(loads_after).sum(0)
    before_s, after_s = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    ratio = statistics.median(b / a for b, a in rounds)
    say(f"load per expert {[int(v) for v in load.tolist()]}; placement {old.tolist()} -> {new.tolist()} "
        f"({moved} experts change rank)")
    say(f"imbalance per ep rank (max/mean): before {imbalance(load, old, ep):.2f}, after "
        f"{imbalance(load_after, new, ep):.2f}")
    say(f"step time (fwd+bwd+AdamW, slowest rank, median of {args.rounds} alternating rounds): before "
        f"{before_s * 1e3:.1f} ms, after {after_s * 1e3:.1f} ms, speedup {ratio:.2f}x")
    say(f"bytes sent moving experts (all ranks, one move): {sent.item():,.0f}; formula moved x 3 x 2 D F x 4 = "
        f"{moved * 3 * 2 * D * F * 4:,}")

    # 1b. FasterMoE's shadows on top of the new placement: the experts whose tokens move more bytes than they do
    place_experts(moe, new, opt)
    shadows = experts_to_shadow(load / (args.repeats + 1), D, 2 * D * F, ep)  # the load of one step
    kept = load.clone().double()
    kept[list(shadows)] = 0
    per_rank = rank_load(kept, new, ep) + kept.new_tensor(float(load[list(shadows)].sum()) / ep)  # own tokens
    rounds = []
    for _ in range(args.rounds):
        moe.shadowed = ()
        placed_s, _ = timed_steps(moe, opt, x, args.repeats)
        moe.shadowed = shadows
        shadowed_s, _ = timed_steps(moe, opt, x, args.repeats)
        rounds.append((placed_s, shadowed_s))
    moe.shadowed = ()
    say(f"shadowing experts {list(shadows)} (tokens would move more bytes than the expert): imbalance per ep rank "
        f"{(per_rank.max() / per_rank.mean()).item():.2f} (their rows computed where they come from); step time "
        f"re-placed {statistics.median(r[0] for r in rounds) * 1e3:.1f} ms, re-placed + shadows "
        f"{statistics.median(r[1] for r in rounds) * 1e3:.1f} ms, speedup "
        f"{statistics.median(a / b for a, b in rounds):.2f}x")

    # 2. DeepSeek-V3's bias alone (identity placement), imbalance over steps
    moe = expert_parallel(replicate(skewed_moe(args), mesh, "ep"), mesh, ep_mesh_dim="ep")
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-4, foreach=False)
    slots = torch.arange(E)
    trace = []
    for step in range(args.bias_steps + 1):
        y = moe(x)
        (y * y).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            trace.append(f"step {step}: {imbalance(moe.routing.chosen_E, slots, ep):.2f}")
        moe.update_balance_bias()
    say(f"balancing bias (rate {args.balance_rate}), imbalance per ep rank: " + ", ".join(trace))

    # 3. Janus: token bytes measured against the formulas
    with dtp.comm_mode() as comm:
        y = moe(x)
        (y * y).mean().backward()
    rows = torch.tensor([float(comm.bytes("all_to_all") - (ep - 1) * (E // ep) * 8)])  # less the counts exchange
    dist.all_reduce(rows)
    tokens_formula = ep * token_moving_bytes(args.tokens, k, D, ep)
    experts_formula = ep * expert_moving_bytes(E // ep, 2 * D * F, ep)
    say(f"token all-to-all bytes fwd+bwd (all ranks): measured {rows.item():,.0f}, formula (even spread) "
        f"{tokens_formula:,.0f}; moving experts instead (Janus): {experts_formula:,.0f} "
        f"({experts_formula / tokens_formula:.2f}x the tokens' bytes)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
