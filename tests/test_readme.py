"""The README's user stories run as written.

Every ```python block of README.md is executed, in order, in one namespace (a block may use what
an earlier one defined), in a temporary working directory. Every `fxdecomp ...` command of the
```bash blocks is parsed by the real argparse parser (``fxdecomp.cli.build_parser``); the cheap
ones (``_runs``) are also run in-process. New blocks are picked up automatically.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_OPERATORS = {"&&", "||", ";", "|"}


def _blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in ``lang``."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text)
            if m.group(1) == lang]


def _fxdecomp_commands() -> list[tuple[int, list[str]]]:
    """(line, argv after `fxdecomp`) for every fxdecomp command in the bash blocks."""
    out = []
    for start, code in _blocks("bash"):
        for offset, line in enumerate(code.splitlines(), 1):
            tokens = shlex.split(line, comments=True)
            command: list[str] = []
            for tok in tokens + [";"]:
                if tok in _OPERATORS:
                    if command and command[0] == "fxdecomp":
                        out.append((start + offset, command[1:]))
                    command = []
                else:
                    command.append(tok)
    return out


def _runs(argv: list[str]) -> bool:
    """Cheap enough to run here: `retrieve` on a few synthetic images. The rest is run by its
    own tests (the main job and coverage in test_cli, align/rank/describe in test_interpret)."""
    return bool(argv) and argv[0] == "retrieve" and "--synthetic" in argv


def test_readme_has_python_and_fxdecomp_blocks():
    assert len(_blocks("python")) >= 3
    assert any(argv == [] for _, argv in _fxdecomp_commands())      # the main job


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, code in _blocks("python"):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README.md python block at line {line} failed: "
                                 f"{type(err).__name__}: {err}") from err


@pytest.mark.parametrize("line,argv", _fxdecomp_commands(),
                         ids=lambda v: str(v) if isinstance(v, int) else " ".join(v)[:60])
def test_readme_fxdecomp_commands_parse_and_cheap_ones_run(line, argv, tmp_path, monkeypatch):
    from fxdecomp.cli import build_parser, main
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:
        raise AssertionError(f"README.md line {line}: `fxdecomp {' '.join(argv)}` does not "
                             f"parse (exit {err.code})") from err
    if _runs(argv):
        monkeypatch.chdir(tmp_path)
        assert main(argv) == 0, f"README.md line {line}: `fxdecomp {' '.join(argv)}` failed"
