"""Speed of the ``smoe.MoE`` layer against the dense-equivalent MLP, the reference engine and Hugging Face Mixtral.

For each configuration (experts ``E``, top-k ``K``, dtype) the same input of ``T`` tokens (``B x L``, width ``d``)
runs through these candidates, interleaved in one process (every repeat runs each candidate once, in an order that
rotates from repeat to repeat and is reversed every other repeat), in training mode, forward then backward of a
scalar loss:

* **dense**: the *dense-equivalent*, one expert-sized SwiGLU MLP (``smoe.layers.MLP``) on ``T*K`` rows, i.e. the
  three expert GEMMs of the MoE with no routing, gather or scatter; loss ``y.sum()``;
* **smoe**: ``smoe.MoE`` with its defaults (dropless token choice, fast engine, backend ``auto``); loss
  ``y.sum() + aux.loss``;
* **reference**: the same layer with ``backend="reference"`` (the per-expert loop that is the specification);
* **hf eager** / **hf grouped_mm**: ``transformers``' ``MixtralSparseMoeBlock`` with the same weights copied in
  (``gate_up_proj = cat(w1, w3)``, ``down_proj = w2``, router weight), with the experts implementation
  ``"eager"`` (the per-expert loop, what a standalone block runs) and ``"grouped_mm"`` (transformers v5's default
  inside a model). Before timing, the float32 HF output is checked against an ``smoe.MoE`` with Mixtral's routing
  order, so that the work is the same.

Every candidate computes the input gradient and all weight gradients; gradients are reset with
``zero_grad(set_to_none=True)`` between runs, as a training loop does. Times are read in the same runs: the clock
when the forward returns (forward with autograd on) and when the backward returns (forward+backward). Reported: the
median over repeats of the ratio to the dense candidate of the same repeat (1.00 = as fast as the dense MLP), and
the dense time itself. ``bfloat16`` means parameters and inputs stored in bfloat16 (no autocast); the smoe router
computes its logits in float32 either way.

Run (the default grid takes about ten minutes on 2 CPU cores)::

    python benchmarks/bench_layer.py --threads 2
    python benchmarks/bench_layer.py --quick
    python benchmarks/bench_layer.py --experts 8 64 --top-k 2 --dtype float32 --repeats 9 --no-reference
    python benchmarks/bench_layer.py --experts 8 64 --top-k 2 --dtype float32 --no-reference --no-hf --gemm-floor

``--previous DIR`` adds the layer as another commit of smoe builds it (**previous**: ``smoe_prev.MoE`` from
``DIR/smoe_prev``, written by ``benchmarks/previous_engine.py COMMIT DIR``), with the same weights, and a column
``smoe / previous``: the median over repeats of the two times of the same repeat. This is how a change to the
engine shows its before/after.

``--gemm-floor`` adds two float32 candidates that time the nine GEMMs of a training step and nothing else: per
expert with this configuration's routed row counts ("experts' GEMMs": what any engine built on per-expert
``torch.mm`` pays) and on the dense MLP's ``T*k`` rows ("dense GEMMs").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import smoe
import smoe.experts.buffers
from smoe.experts import MLP


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (the batch is tokens / seq-len)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of dense and smoe")
    p.add_argument("--slow-repeats", type=int, default=3, help="timed repeats of the reference and HF baselines")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--slow-limit",
        type=float,
        default=2.0,
        help="a slow baseline whose warm-up run takes longer (seconds) is timed by that run alone",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the reference engine")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Mixtral block")
    p.add_argument(
        "--loop-max-experts",
        type=int,
        default=64,
        help="skip the per-expert-loop baselines (reference, hf eager) above this E: their training step "
        "grows as E^2 (one full-size weight-gradient tensor per expert)",
    )
    p.add_argument("--hf-impls", nargs="+", default=["eager", "grouped_mm"], help="HF experts implementations")
    p.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="folder holding smoe_prev/ (benchmarks/previous_engine.py COMMIT DIR): time that commit's layer too",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where every candidate runs (cpu, cuda, cuda:1, ...); on a GPU the clock is read after a synchronize",
    )
    p.add_argument(
        "--no-page-faults",
        action="store_true",
        help="tune glibc malloc first (mallopt: no mmap, no trimming) so that freed memory is reused without\n"
        "page faults, for every candidate alike: a compute-only comparison (see benchmarks/README.md)",
    )
    p.add_argument(
        "--gemm-floor",
        action="store_true",
        help="also time the nine GEMMs of a training step alone (float32): once per expert, with the routed row\n"
        "counts of this configuration, and once on the dense MLP's T*k rows (see benchmarks/README.md)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="d=128, hidden 256, 1024 tokens, E in {8, 16}, k in {1, 2}, 3 repeats (a smoke test)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.hidden, args.tokens, args.seq_len = 128, 256, 1024, 128
        args.experts, args.top_k = [8, 16], [1, 2]
        args.repeats, args.slow_repeats = min(args.repeats, 3), min(args.slow_repeats, 2)
    if args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (expected cpu, cuda, cuda:N, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: this torch sees no CUDA device")
    if args.previous is not None and not (args.previous / "smoe_prev" / "__init__.py").is_file():
        p.error(f"--previous {str(args.previous)!r} holds no smoe_prev/ (write it with benchmarks/previous_engine.py)")
    return args


def previous_smoe(folder: Path):
    """The ``smoe_prev`` package in ``folder`` (another commit of smoe, imported under another name)."""
    sys.path.insert(0, str(folder))
    import smoe_prev  # noqa: PLC0415

    return smoe_prev


def tune_malloc() -> bool:
    """Make glibc malloc keep and reuse freed memory (no ``mmap`` blocks, no trimming); ``False`` if not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that the host clock measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_name(device: str) -> str:
    dev = torch.device(device)
    return f"; device {dev}: {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""


class Candidate:
    """A module, its input and its loss; :meth:`run` returns (forward seconds, forward+backward seconds)."""

    def __init__(self, name, module, x, loss, backend=None, slow=False):
        self.name, self.module, self.x, self.loss, self.backend, self.slow = name, module, x, loss, backend, slow
        self.device = x.device

    def run(self) -> tuple[float, float, int]:
        """(forward s, forward+backward s, minor page faults during the run)."""
        self.module.zero_grad(set_to_none=True)
        x = self.x.detach().requires_grad_(True)
        ctx = smoe.use_backend(self.backend) if self.backend else _nullcontext()
        with ctx:
            _sync(self.device)
            f0 = _minor_faults()
            t0 = time.perf_counter()
            out = self.module(x)
            _sync(self.device)
            t1 = time.perf_counter()
            self.loss(out).backward()
            _sync(self.device)
            t2 = time.perf_counter()
            f1 = _minor_faults()
        return t1 - t0, t2 - t0, f1 - f0


class GemmFloor:
    """The nine GEMMs of a SwiGLU training step and nothing else: no routing, gather, activation or scatter.

    Forward ``h1 = x W1^T``, ``h3 = x W3^T``, ``out = act W2^T``; backward ``G = g W2``, ``dW2 = g^T act``,
    ``dW1 = dh1^T x``, ``dW3 = dh3^T x``, ``dx = dh1 W1 + dh3 W3``, each a ``torch.mm(out=...)`` into buffers
    allocated once (operand values do not matter for the time). With ``counts`` it runs them once per expert on that
    expert's rows, in the layouts the fused engine uses: the cost any engine built on per-expert ``torch.mm`` pays.
    Without, once on all rows with one weight: the dense MLP's GEMMs.
    """

    slow = False  # a candidate like the others, timed in every repeat

    def __init__(self, name: str, D: int, F: int, counts: list[int], device: torch.device):
        self.name, self.counts, self.device = name, [c for c in counts if c], device
        N, E = sum(self.counts), len(self.counts)
        randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
        self.x, self.g, self.out, self.gx = (randn(N, D) for _ in range(4))
        self.h1, self.h3, self.act, self.G = (randn(N, F) for _ in range(4))
        self.w1, self.w3, self.w2 = randn(E, F, D), randn(E, F, D), randn(E, D, F)
        self.gw1, self.gw3, self.gw2 = (torch.empty_like(w) for w in (self.w1, self.w3, self.w2))

    def run(self) -> tuple[float, float, int]:
        sp = [t.split(self.counts) for t in (self.x, self.g, self.out, self.gx, self.h1, self.h3, self.act, self.G)]
        x, g, out, gx, h1, h3, act, G = sp
        w1, w3, w2, gw1, gw3, gw2 = (w.unbind(0) for w in (self.w1, self.w3, self.w2, self.gw1, self.gw3, self.gw2))
        E = len(self.counts)
        _sync(self.device)
        f0 = _minor_faults()
        t0 = time.perf_counter()
        for e in range(E):
            torch.mm(x[e], w1[e].t(), out=h1[e])
            torch.mm(x[e], w3[e].t(), out=h3[e])
            torch.mm(act[e], w2[e].t(), out=out[e])
        _sync(self.device)
        t1 = time.perf_counter()
        for e in range(E):
            torch.mm(g[e], w2[e], out=G[e])
            torch.mm(g[e].t(), act[e], out=gw2[e])
            torch.mm(h1[e].t(), x[e], out=gw1[e])
            torch.mm(h3[e].t(), x[e], out=gw3[e])
            torch.mm(h1[e], w1[e], out=gx[e]).addmm_(h3[e], w3[e])
        _sync(self.device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, _minor_faults() - f0


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # not on POSIX
        return 0


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _moe_loss(out):
    y, aux = out
    return y.float().sum() + aux.loss


def _sum_loss(y):
    return y.float().sum()


def hf_block(layer: smoe.MoE, impl: str, dtype: torch.dtype):
    """A ``MixtralSparseMoeBlock`` holding ``layer``'s weights (:func:`smoe.interop.to_mixtral_block`), or ``None``
    without transformers."""
    try:
        from smoe.interop import to_mixtral_block
    except ImportError:
        return None
    # the same weights with Mixtral's routing order (the default softmax-then-top-k layer is not exportable)
    mixtral = smoe.MoE(
        layer.dim, layer.hidden_dim, layer.num_experts, layer.top_k, router_kwargs={"order": "topk_softmax"}
    )
    mixtral.load_state_dict(layer.state_dict())
    try:
        block = to_mixtral_block(mixtral)
    except ImportError:
        return None
    config = getattr(block.experts, "config", None)  # transformers 5.x reads it at every forward
    if config is not None:
        config._experts_implementation = impl
    return block.to(dtype).train()


def check_hf_equivalence(layer: smoe.MoE, block, x_BLD) -> float:
    """Max abs difference between the HF block and an smoe layer with Mixtral's routing order (float32)."""
    ref = smoe.MoE(layer.dim, layer.hidden_dim, layer.num_experts, layer.top_k, router_kwargs={"order": "topk_softmax"})
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        y_smoe, _ = ref(x_BLD)
        y_hf = block(x_BLD)
    return float((y_smoe - y_hf).abs().max())


def bench_config(args, E: int, K: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    B, L, D, F = args.tokens // args.seq_len, args.seq_len, args.dim, args.hidden
    x_BLD = torch.randn(B, L, D)  # built on CPU (the HF check runs there), moved with each candidate
    layer = smoe.MoE(D, F, E, K).train()
    cands = []
    dense = MLP(D, F).to(dev, dtype).train()
    cands.append(Candidate("dense", dense, torch.randn(B * L * K, D).to(dev, dtype), _sum_loss))
    notes = []
    if not args.no_hf:
        for impl in args.hf_impls:
            block = hf_block(layer, impl, torch.float32)
            if block is None:
                notes.append("transformers not installed: HF skipped")
                break
            if dtype == torch.float32 and impl == args.hf_impls[0]:
                diff = check_hf_equivalence(layer, block, x_BLD)
                if diff > 1e-3:
                    raise RuntimeError(f"HF Mixtral block disagrees with smoe (max abs diff {diff:.2e})")
                notes.append(f"HF vs smoe (Mixtral order) max abs diff {diff:.1e}")
            if impl == "eager" and E > args.loop_max_experts:
                continue
            block = block.to(dev, dtype)
            cands.append(Candidate(f"hf {impl}", block, x_BLD.to(dev, dtype), _sum_loss, slow=True))
    layer = layer.to(dev, dtype)
    x_BLD = x_BLD.to(dev, dtype)
    cands.insert(1, Candidate("smoe", layer, x_BLD, _moe_loss))
    if args.previous is not None:
        prev = previous_smoe(args.previous)
        prev_layer = prev.MoE(D, F, E, K).train()
        prev_layer.load_state_dict(layer.state_dict())  # the same weights (the checkpoint layout did not change)
        cands.insert(2, Candidate("previous", prev_layer.to(dev, dtype), x_BLD, _moe_loss))
    if not args.no_reference and E <= args.loop_max_experts:
        cands.insert(2, Candidate("reference", layer, x_BLD, _moe_loss, backend="reference", slow=True))
    if args.gemm_floor and dtype == torch.float32:
        with torch.no_grad():
            counts = layer(x_BLD)[1].stats["tokens_per_expert"].tolist()  # this configuration's routing
        cands.append(GemmFloor("experts' GEMMs", D, F, counts, dev))
        cands.append(GemmFloor("dense GEMMs", D, F, [sum(counts)], dev))
    single = {}  # slow baselines timed by their warm-up run alone
    for c in cands:
        for _ in range(max(args.warmup, 1 if c.slow else 0)):
            t = c.run()
        if c.slow and t[1] > args.slow_limit:
            single[c.name] = t
    times = {c.name: [] for c in cands}  # per repeat: (fwd, fwd+bwd) or None when not run
    for r in range(args.repeats):
        # rotate, and reverse every other repeat: each candidate runs in every position and right before and right
        # after every other candidate equally often (with a plain rotation, which candidate follows the dense MLP --
        # and inherits the memory state its page faults leave -- is not balanced)
        shift = (r // 2) % len(cands)
        order = cands[shift:] + cands[:shift]
        if r % 2:
            order = order[::-1]
        for c in order:
            skip = c.name in single or (c.slow and r >= args.slow_repeats)
            times[c.name].append(None if skip else c.run())
    dense_f = statistics.median(t[0] for t in times["dense"])
    dense_fb = statistics.median(t[1] for t in times["dense"])
    page = 4096
    out = {
        "notes": notes,
        "dense_f": dense_f,
        "dense_fb": dense_fb,
        "single": set(single),
        "faults": {n: statistics.median(t[2] for t in times[n]) * page / 2**20 for n in ("dense", "smoe")},
    }
    if args.previous is not None:  # smoe against the previous commit's layer, repeat by repeat
        pairs = list(zip(times["smoe"], times["previous"]))
        out["smoe / previous"] = (
            statistics.median(a[0] / b[0] for a, b in pairs),
            statistics.median(a[1] / b[1] for a, b in pairs),
        )
    for c in cands[1:]:
        if c.name in single:
            out[c.name] = (single[c.name][0] / dense_f, single[c.name][1] / dense_fb)
            continue
        pairs = [(t, d) for t, d in zip(times[c.name], times["dense"]) if t is not None]
        out[c.name] = (
            statistics.median(t[0] / d[0] for t, d in pairs),
            statistics.median(t[1] / d[1] for t, d in pairs),
        )
    del cands, layer, dense
    smoe.experts.buffers.clear()  # the next configuration's sizes differ: do not keep this one's memory
    if args.previous is not None:
        previous_smoe(args.previous).engine.buffers.clear()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    tuned = tune_malloc() if args.no_page_faults else False
    if args.no_page_faults and not tuned:
        raise SystemExit("--no-page-faults needs glibc's mallopt")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs{_gpu_name(args.device)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; d={args.dim}, hidden={args.hidden} (SwiGLU), tokens={args.tokens} "
        f"(B={args.tokens // args.seq_len} x L={args.seq_len}); training mode; ratios = median over repeats of "
        f"time / dense time in the same repeat ({args.repeats} repeats of dense and smoe, {args.slow_repeats} of "
        f"the slow baselines, after {args.warmup} warm-up); allocator: "
        + ("glibc tuned, no page faults after warm-up" if tuned else "default")
    )
    names = ["smoe"]
    if args.previous is not None:
        names += ["previous", "smoe / previous"]
    if not args.no_reference:
        names.append("reference")
    if not args.no_hf:
        names += [f"hf {impl}" for impl in args.hf_impls]
    if args.gemm_floor:
        names += ["experts' GEMMs", "dense GEMMs"]
    print()
    header = " | ".join(names)
    print(
        f"| E | k | dtype | dense fwd+bwd ms | {header} (fwd+bwd) | dense fwd ms | {header} (fwd) "
        "| page faults MiB/step dense, smoe |"
    )
    print("|---:|---:|---|---:|" + "---:|" * len(names) + "---:|" + "---:|" * len(names) + "---:|")
    all_notes = set()
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for E in args.experts:
            for K in args.top_k:
                if K > E:
                    continue
                m = bench_config(args, E, K, dtype)
                all_notes.update(m["notes"])
                star = {n: "*" if n in m["single"] else "" for n in names}
                fb = " | ".join(f"{m[n][1]:.2f}{star[n]}" if n in m else "-" for n in names)
                f = " | ".join(f"{m[n][0]:.2f}{star[n]}" if n in m else "-" for n in names)
                pf = f"{m['faults']['dense']:.0f}, {m['faults']['smoe']:.0f}"
                print(
                    f"| {E} | {K} | {dtype_name} | {1e3 * m['dense_fb']:.0f} | {fb} | {1e3 * m['dense_f']:.0f} | {f} "
                    f"| {pf} |",
                    flush=True,
                )
    print(
        "\n`-`: not run (per-expert-loop baselines above --loop-max-experts); `*`: one run (the warm-up, longer than "
        f"--slow-limit={args.slow_limit:g} s), against the median dense time"
    )
    for note in sorted(all_notes):
        print(f"note: {note}")
    print("\ntarget: smoe fwd+bwd <= 1.25 x dense at 8 and 64 experts (float32, k=2); faster than HF at 64 experts")


if __name__ == "__main__":
    main()
