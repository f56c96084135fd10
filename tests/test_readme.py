"""The README's commands and snippets stay true: every `mobileone` command parses, every file a command
reads under runs/ is written by a command shown before it, `make` targets exist, Python snippets compile
and name only what the package has. (The main job itself runs end to end in tests/test_cli.py.)"""

import ast
import re
import shlex
from pathlib import Path

import pytest

import mobileone
from mobileone.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INPUTS = ("--checkpoint", "--pretrained", "--teacher", "--resume", "--onnx")


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def commands(path: Path) -> list[list[str]]:
    """Each shell command of the file's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def mobileone_argv(words: list[str]) -> list[str] | None:
    """The arguments after `mobileone` (also `python -m mobileone`, `torchrun ... -m mobileone`)."""
    for i, w in enumerate(words):
        if w.endswith("mobileone") and (i == 0 or words[i - 1] == "-m" or w.endswith("/mobileone")):
            return words[i + 1 :]
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_parses_and_reads_what_an_earlier_one_wrote(doc):
    parser, written = build_parser(), {"runs/mobileone"}
    for words in commands(doc):
        argv = mobileone_argv(words)
        if argv is None:
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.name}: `mobileone {' '.join(argv)}` does not parse")
        for flag in INPUTS:
            value = getattr(args, flag[2:].replace("-", "_"), None)
            if isinstance(value, str) and value.startswith("runs/"):
                assert any(value.startswith(w) for w in written), (
                    f"{doc.name}: {flag} {value} is written by no command before it"
                )
        out = getattr(args, "out", None)
        if out:
            written.add(out if out.startswith("runs/") and "." not in Path(out).name else str(Path(out).parent))
            written.add(out)


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for doc in DOCS:
        for words in commands(doc):
            if words[0] == "make":
                for target in words[1:]:
                    assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"{doc.name}: make {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_snippets_compile_and_name_what_exists(doc):
    for code in blocks(doc, "python"):
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mobileone":
                assert hasattr(mobileone, node.attr), f"{doc.name}: mobileone.{node.attr} does not exist"
