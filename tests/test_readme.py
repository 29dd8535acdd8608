"""The README's examples run as written (keeps the README true): its Python blocks, each in a fresh interpreter,
and the commands of its ``bash everyday`` block, in order, in a temporary folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands_first():
    first_block = re.search(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "smoe study" in commands[0] and "pytest" in commands[1]


def test_readme_python_examples_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 4, "the README should show the public API"
    for i, code in enumerate(blocks):  # a fresh process each: an example's registrations stay its own
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README python block {i} failed:\n{code}\n{done.stderr[-3000:]}"


def test_readme_everyday_commands_run(tmp_path):
    block = re.search(r"```bash everyday\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) >= 7 and all(c.startswith("smoe ") for c in commands)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in commands:
        args = [sys.executable, "-m", "smoe", *_split(command[len("smoe ") :]), *(
            ["--no-progress"] if command.split()[1] in ("train", "study") else [])]  # fmt: skip
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, f"{command!r} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if command.startswith("smoe generate"):
            assert done.stdout.startswith("ROMEO:")


def _split(text: str) -> list[str]:
    import shlex

    return shlex.split(text)
