"""``smoe ls``: list the registries: routers, expert types, dispatchers, model presets and datasets (with whether
each dataset is installed)."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  smoe ls                 # everything
  smoe ls routers         # registered routing methods
  smoe ls experts         # expert types (MoE(experts=...)) and dispatchers (MoE(dispatcher=...))
  smoe ls presets         # model presets (task, width, depth, experts)
  smoe ls datasets        # datasets, whether installed, and how to install the missing ones
"""

WHAT = ("routers", "experts", "presets", "datasets")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ls",
        help="list routers, expert types, presets and datasets",
        description="List the registries: routers, expert types and dispatchers, model presets, datasets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("what", nargs="?", choices=WHAT, help="one registry (default: all)")
    p.set_defaults(func=run)
    return p


def routers_table() -> list[str]:
    from smoe.routing import list_routers  # noqa: PLC0415
    from smoe.routing.registry import router_summary  # noqa: PLC0415

    names = list_routers()
    w = max(len(n) for n in names)
    return [f"  {n:<{w}}  {router_summary(n)}" for n in names]


def experts_table() -> list[str]:
    from smoe.engine import get_dispatcher, list_dispatchers  # noqa: PLC0415
    from smoe.experts import get_experts, list_experts  # noqa: PLC0415

    def first_line(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")

    rows = [f"  {n:<10}  {first_line(get_experts(n))}" for n in list_experts()]
    rows += [f"  dispatcher {n}: {first_line(get_dispatcher(n))}" for n in list_dispatchers()]
    return rows


def presets_table() -> list[str]:
    from smoe.models import presets  # noqa: PLC0415

    rows = []
    names = presets.list_presets()
    w = max(len(n) for n in names)
    for name in names:
        c = presets.get_preset(name)
        moe = getattr(c, "moe", None)
        shape = f"dim={c.dim} depth={c.depth} " if hasattr(c, "dim") else ""
        routing = f"E={moe.num_experts} k={moe.top_k} router={moe.router}" if moe is not None else ""
        rows.append(f"  {name:<{w}}  task={c.task:<6} {shape}{routing}")
    return rows


def datasets_table() -> list[str]:
    from smoe.data import get_dataset, list_datasets  # noqa: PLC0415

    names = list_datasets()
    w = max(len(n) for n in names)
    rows = []
    for n in names:
        spec = get_dataset(n)
        ok = spec.available()
        rows.append(f"  {n:<{w}}  {'installed' if ok else 'MISSING  '}  {','.join(spec.tasks):<10} {spec.description}")
        if not ok:
            rows.append(f"  {'':<{w}}  install: {spec.install}")
    return rows


def run(args: argparse.Namespace) -> int:
    tables = {"routers": routers_table, "experts": experts_table, "presets": presets_table, "datasets": datasets_table}
    for what in [args.what] if args.what else WHAT:
        print(f"{what}:")
        print("\n".join(tables[what]()))
    return 0
