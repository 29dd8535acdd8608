"""The README's Python examples run as written (keeps the README true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands_first():
    first_block = re.search(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "smoe study" in commands[0] and "pytest" in commands[1]


def test_readme_python_examples_run():
    blocks = python_blocks()
    assert blocks, "the README should show the public API"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
