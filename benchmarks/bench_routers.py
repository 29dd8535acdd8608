"""Routing overhead of every registered router, as a share of the MoE layer's forward and forward+backward time.

For each router in :func:`smoe.list_routers` we build the same float32 MoE layer (default: 64 experts, d=512,
expert hidden 1024, top-2, 4096 tokens as 8 sequences of 512, ``group_mode="sequence"``) in training mode and time,
interleaved (router, layer, router, layer, ...), median of ``--repeats``:

* **router**: the router call alone on the layer's routing-order input (the context the layer builds: token ids,
  causal attention probabilities, groups), then the backward pass of a scalar made of its outputs (combine weights,
  losses, the extra engine rows of S2MoE);
* **layer**: the whole ``MoE`` forward (router + engine) and backward of ``sum(y * r) + aux.loss``.

Forward times are read inside the same runs (the clock when forward returns), so each repeat costs one router run
and one layer run. ``share = router / layer``; the project's goal is <= 10%. The baseline is in the table: plain
``token_choice`` (and ``force_balanced``, whose routing is a fixed round-robin).

Run (on a quiet machine; the default takes a few minutes on 2 CPU cores)::

    python benchmarks/bench_routers.py                 # full size
    python benchmarks/bench_routers.py --quick         # small sizes, seconds
    python benchmarks/bench_routers.py --routers token_choice usmoe --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import smoe
from smoe.routing.plan import SparsePlan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (the batch is tokens / seq-len)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="heads of the attention probabilities handed to routers")
    p.add_argument("--group-mode", default="sequence", choices=["batch", "sequence", "position"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--routers", nargs="*", default=None, help="subset of registered routers (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="16 experts, d=128, hidden 256, 1024 tokens of 128")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.dim, args.hidden, args.tokens, args.seq_len = 16, 128, 256, 1024, 128
    if args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
    return args


def causal_attention(B: int, H: int, L: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, H, L, L)`` random causal attention probabilities."""
    scores = torch.randn(B, H, L, L, generator=generator)
    return scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)


def routing_input(x_BLD, ids_BL, attn, group_mode):
    """The routing-order input and context the MoE layer builds for ``x_BLD`` (see ``smoe.layers.moe``)."""
    B, L, D = x_BLD.shape
    if group_mode == "position":
        x_TD, ids_T, S = x_BLD.transpose(0, 1).reshape(B * L, D), ids_BL.t().reshape(-1), B
    else:
        x_TD, ids_T, S = x_BLD.reshape(B * L, D), ids_BL.reshape(-1), (L if group_mode == "sequence" else B * L)
    ctx = smoe.RoutingContext(
        group_size=S, token_ids_T=ids_T, attn_probs=attn, batch_shape=(B, L), group_mode=group_mode
    )
    return x_TD, ctx


def router_scalar(out) -> torch.Tensor:
    """A scalar that depends on every differentiable router output (for the router's backward)."""
    plan = out.plan
    total = out.loss.float()
    if isinstance(plan, SparsePlan):
        total = total + (plan.weight_N.float() * torch.linspace(0.5, 1.5, plan.num_rows)).sum()
    else:
        total = total + plan.dispatch_GSEC.float().sum() * 0.5 + plan.combine_GSEC.float().mean()
    if out.inputs_RD is not None:
        total = total + out.inputs_RD.float().mean()
    return total


def time_router(router, x_TD, ctx) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one router call."""
    x = x_TD.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = router(x, ctx)
    t1 = time.perf_counter()
    scalar = router_scalar(out)
    if scalar.requires_grad:
        scalar.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def time_layer(layer, x_BLD, ids_BL, attn, r_BLD) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one MoE layer call."""
    x = x_BLD.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y, aux = layer(x, token_ids=ids_BL, attn_probs=attn)
    t1 = time.perf_counter()
    ((y * r_BLD).sum() + aux.loss).backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def bench_one(name, args, x_BLD, ids_BL, attn, r_BLD) -> dict:
    torch.manual_seed(0)
    layer = smoe.MoE(args.dim, args.hidden, args.experts, args.top_k, router=name, group_mode=args.group_mode).train()
    x_TD, ctx = routing_input(x_BLD, ids_BL, attn, args.group_mode)
    runs = {"router": [], "layer": []}
    for i in range(args.warmup + args.repeats):
        r = time_router(layer.router, x_TD, ctx)
        lay = time_layer(layer, x_BLD, ids_BL, attn, r_BLD)
        layer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            runs["router"].append(r)
            runs["layer"].append(lay)
    med = {k: [statistics.median(t[j] for t in v) for j in (0, 1)] for k, v in runs.items()}
    return {
        "router_f": med["router"][0],
        "layer_f": med["layer"][0],
        "router_fb": med["router"][1],
        "layer_fb": med["layer"][1],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.routers or smoe.list_routers()
    unknown = sorted(set(names) - set(smoe.list_routers()))
    if unknown:
        raise SystemExit(f"unknown routers {unknown}; registered: {smoe.list_routers()}")
    B, L = args.tokens // args.seq_len, args.seq_len
    g = torch.Generator().manual_seed(0)
    x_BLD = torch.randn(B, L, args.dim, generator=g)
    ids_BL = torch.randint(0, 32000, (B, L), generator=g)
    attn = causal_attention(B, args.heads, L, g)
    r_BLD = torch.randn(B, L, args.dim, generator=g)
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, training mode; "
        f"E={args.experts}, d={args.dim}, hidden={args.hidden}, k={args.top_k}, tokens={args.tokens} "
        f"(B={B} x L={L}), group_mode={args.group_mode}, median of {args.repeats} after {args.warmup} warm-up"
    )
    print()
    print(
        "| router | router fwd ms | layer fwd ms | fwd share | router fwd+bwd ms | layer fwd+bwd ms | fwd+bwd share |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        try:
            m = bench_one(name, args, x_BLD, ids_BL, attn, r_BLD)
        except (ValueError, RuntimeError) as e:  # report a router that cannot run this configuration, go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | |")
            continue
        print(
            f"| {name} | {1e3 * m['router_f']:.1f} | {1e3 * m['layer_f']:.1f} | {m['router_f'] / m['layer_f']:.1%} "
            f"| {1e3 * m['router_fb']:.1f} | {1e3 * m['layer_fb']:.1f} | {m['router_fb'] / m['layer_fb']:.1%} |",
            flush=True,
        )
    print("\ngoal: routing overhead <= 10% of the layer (fwd+bwd share)")


if __name__ == "__main__":
    main()
