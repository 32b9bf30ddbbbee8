"""The README's commands against the real parser: a renamed subcommand or flag cannot leave the documentation behind.

Every `vfm-align ...` command in a fenced code block must parse with `vfm_align.cli.build_parser()` exactly as the
console script would parse it (unknown flags and missing required arguments fail); every `vfm-align` command in
inline code likewise, once its left-out required arguments get placeholders; every script or config file the
README names must exist. The parser is read at run time, so new subcommands and flags need no change here.
"""

import argparse
import contextlib
import io
import pathlib
import re
import shlex

import pytest

from vfm_align.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
_SEPARATORS = {"&&", "||", ";", "|"}


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def _commands(text: str) -> list[list[str]]:
    """The `vfm-align` invocations in shell text: continuations joined, comments dropped, `a && b` split."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if "vfm-align" not in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (a Python or CSV line that mentions the name)
            continue
        segment = []
        for tok in tokens + [";"]:
            if tok in _SEPARATORS:
                if segment[:1] == ["vfm-align"]:
                    found.append(segment[1:])
                segment = []
            else:
                segment.append(tok)
    return found


FENCED = [cmd for block in _fenced_blocks(README) for cmd in _commands(block)]
INLINE = [cmd for span in re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", README, flags=re.M | re.S))
          for cmd in _commands(span)]


def _parse(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return build_parser().parse_args(argv), ""
        except SystemExit:
            return None, err.getvalue().strip()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_readme_has_commands_to_check():
    assert len(FENCED) >= 10 and INLINE  # the walk found the README's examples: this test checks something
    assert len({cmd[0] for cmd in FENCED}) >= 5


@pytest.mark.parametrize("argv", FENCED, ids=[" ".join(c)[:60] for c in FENCED])
def test_fenced_command_parses(argv):
    args, err = _parse(argv)
    assert args is not None, f"README: `vfm-align {' '.join(argv)}` does not parse: {err}"
    assert args.command == argv[0]


def _with_stubs(argv: list[str]) -> list[str]:
    """Inline code shows fragments: add a placeholder for each required argument the fragment leaves out."""
    argv = [a for a in argv if a not in ("...", "\u2026")]  # an ellipsis stands for arguments left out
    sub = _subparsers()[argv[0]]
    given = {a.split("=", 1)[0] for a in argv[1:]}
    options, positionals = [], []
    for action in sub._actions:
        if action.required and action.option_strings and not given & set(action.option_strings):
            options += [action.option_strings[0], "PLACEHOLDER"]
        elif action.required and not action.option_strings and (len(argv) == 1 or argv[1].startswith("-")):
            positionals.append("PLACEHOLDER")
    return [argv[0], *positionals, *argv[1:], *options]


@pytest.mark.parametrize("argv", INLINE, ids=[" ".join(c)[:60] for c in INLINE])
def test_inline_command_parses(argv):
    assert argv[0] in _subparsers(), f"README: `vfm-align {' '.join(argv)}`: no subcommand {argv[0]!r}"
    args, err = _parse(_with_stubs(argv))
    assert args is not None, f"README: `vfm-align {' '.join(argv)}` does not parse: {err}"


def test_a_wrong_flag_is_caught():
    """The check above is not vacuous: a misspelt flag and a missing required argument both fail to parse."""
    assert _parse(["convert", "x.pth", "--out", "d", "--no-such-flag"])[0] is None
    assert _parse(["convert", "x.pth"])[0] is None
    assert _parse(["finetune", "--config", "c.py", "--configg.optim.lr=1"])[0] is None
    assert _parse(_with_stubs(["score", "--frequency", "structured"]))[0] is None
    assert _parse(_with_stubs(["convert", "--arch", "provicnet"]))[0] is not None  # the placeholders do complete


def test_named_scripts_and_configs_exist():
    paths = set(re.findall(r"\b((?:scripts|configs)/[\w./-]+\.(?:py|sh|png))", README))
    assert paths, "the README names no scripts or configs"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"the README names files that do not exist: {missing}"
