"""``smoe bench``: a quick timing of one ``smoe.MoE`` layer against dense MLP baselines, in this process.

Baselines in the same run (house rule: a benchmark always times its baseline): a dense MLP of hidden width
``top_k * hidden`` (the same expert FLOPs per token as the MoE) and one of width ``hidden`` (a single expert). Each
is warmed up, then timed with ``time.perf_counter`` over ``--repeats`` calls (CUDA events and ``synchronize`` when
``--device cuda``). For the full benchmark suite see ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from smoe.cli.common import non_negative_int, positive_int

EPILOG = """examples:
  smoe bench                                       # 4096 tokens, D=256, 8 experts of F=512, top-2, forward+backward
  smoe bench --router expert_choice --forward-only
  smoe bench --tokens 16384 --experts 64 --top-k 8 --backend loop
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time an MoE layer against dense MLP baselines",
        description="Time one smoe.MoE layer (router + engine + experts) against dense MLPs of the same active "
        "FLOPs and of one expert's size, forward+backward by default.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=positive_int, default=4096, help="tokens per call (default 4096)")
    p.add_argument("--dim", type=positive_int, default=256, help="model width D (default 256)")
    p.add_argument("--hidden", type=positive_int, default=512, help="expert hidden width F (default 512)")
    p.add_argument("--experts", type=positive_int, default=8, help="number of experts E (default 8)")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token K (default 2)")
    p.add_argument("--router", default="token_choice", help="registered router (see `smoe ls routers`)")
    p.add_argument("--backend", default=None, help="engine backend: auto, fast, reference, grouped_mm or loop")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed calls (default 10)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed warm-up calls (default 2)")
    p.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of weights and inputs")
    p.add_argument("--threads", type=positive_int, help="CPU threads for PyTorch (default: the idle cores)")
    p.set_defaults(func=run)
    return p


def time_module(module, x, *, repeats: int, warmup: int, backward: bool) -> list[float]:
    """Seconds per call of ``module(x)`` (plus backward of the output's sum), ``repeats`` samples after warm-up."""
    import torch  # noqa: PLC0415

    cuda = x.device.type == "cuda"

    def call():
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        if backward:
            y.float().sum().backward()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    import smoe  # noqa: PLC0415

    if args.top_k > args.experts:
        raise ValueError(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    from smoe.train.device import set_threads  # noqa: PLC0415

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    moe = smoe.MoE(
        args.dim, args.hidden, args.experts, args.top_k, router=args.router, backend=args.backend, device=dev
    )
    baselines = {
        f"dense MLP F={args.top_k * args.hidden} (same active FLOPs)": smoe.MLP(
            args.dim, args.top_k * args.hidden, device=dev
        ),
        f"dense MLP F={args.hidden} (one expert)": smoe.MLP(args.dim, args.hidden, device=dev),
    }
    x = torch.randn(args.tokens, args.dim, device=dev, requires_grad=not args.forward_only)
    backward = not args.forward_only
    rows = [(f"smoe.MoE {args.router} E={args.experts} k={args.top_k}", moe), *baselines.items()]
    results = []
    for name, module in rows:
        t = time_module(module, x, repeats=args.repeats, warmup=args.warmup, backward=backward)
        results.append((name, statistics.median(t), min(t)))
    what = "forward" if args.forward_only else "forward+backward"
    print(
        f"{what}, {args.tokens} tokens, D={args.dim}, {args.device}, torch {torch.__version__}, "
        f"backend={args.backend or smoe.get_backend()}, median of {args.repeats}"
    )
    width = max(len(r[0]) for r in results)
    base = results[1][1]
    print(f"{'module':<{width}}  {'median ms':>10}  {'min ms':>8}  {'tokens/s':>12}  {'vs same-FLOPs MLP':>17}")
    for name, med, best in results:
        ms, best_ms, rate, ratio = 1e3 * med, 1e3 * best, args.tokens / med, med / base
        print(f"{name:<{width}}  {ms:>10.2f}  {best_ms:>8.2f}  {rate:>12,.0f}  {ratio:>16.2f}x")
    return 0
