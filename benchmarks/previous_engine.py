"""Export the ``smoe`` package of a git commit under the name ``smoe_prev``, for ``bench_layer.py --previous``.

A change to the engine is measured against the code it replaces, in the same process (interleaved, as every
candidate of the layer benchmark): the old package must then import next to the new one, so it is written out under
another name with its own imports rewritten::

    python benchmarks/previous_engine.py 4d444c5 /tmp/prev      # writes /tmp/prev/smoe_prev/
    python benchmarks/bench_layer.py --previous /tmp/prev --experts 8 64 --top-k 2 --no-reference --no-hf

The two packages share nothing at run time (each has its own registries and its own CPU buffer pool).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

NAME = "smoe_prev"


def export(commit: str, out: Path, repo: Path) -> Path:
    """Write ``out/smoe_prev`` from ``git archive commit smoe`` in ``repo``; returns the package folder."""
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "smoe"], capture_output=True, check=True
    ).stdout
    dest = out / NAME
    if dest.exists():
        shutil.rmtree(dest)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    (out / "smoe").rename(dest)
    for f in dest.rglob("*.py"):
        text = f.read_text()
        text = re.sub(r"\bfrom smoe([. ])", rf"from {NAME}\1", text)
        text = re.sub(r"\bimport smoe\b", f"import {NAME}", text)
        f.write_text(text)
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("commit", help="a git commit, tag or branch of this repository")
    p.add_argument("out", type=Path, help="folder that receives smoe_prev/ (pass it to bench_layer.py --previous)")
    args = p.parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    print(f"wrote {export(args.commit, args.out, repo)} from {args.commit}")


if __name__ == "__main__":
    main()
