# SPDX-License-Identifier: LGPL-2.1-or-later
"""The docs' examples work: every ```python block of README.md and docs/*.md compiles,
and runs (those that use ``dom`` on a throwaway domain); every ``virsh-fleece`` command
shown parses with the real CLI; every file path and link between the pages resolves.

A Python block preceded by ``<!-- not run: reason -->`` is only compiled; each shows as a
skip of ``test_opted_out_blocks_are_listed`` with its reason in the summary (-ra)."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import glob
import io
import os
import re
import shlex
from typing import Optional

import pytest

import vm as testvm

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, TOP)
                               for p in glob.glob(os.path.join(TOP, "docs", "*.md")))
MiB = 1 << 20
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")


@dataclasses.dataclass
class Block:
    page: str
    line: int               # 1-based line of the opening fence
    lang: str
    code: str
    not_run: Optional[str]  # the reason of a preceding <!-- not run: ... -->

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _read(page: str) -> str:
    with open(os.path.join(TOP, page), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(page: str) -> list[Block]:
    lines = _read(page).split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang, indent = i, m.group(2), len(m.group(1))
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        opt = NOT_RUN.match(prev)
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n",
                         opt.group(1) if opt else None))
    return out


ALL_BLOCKS = [b for p in PAGES for b in fenced_blocks(p)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]


def _names(code: str) -> set:
    return {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}


def _needs_domain(b: Block) -> bool:
    return "dom" in _names(b.code)


RUN_PURE = [b for b in PYTHON if not b.not_run and not _needs_domain(b)]
RUN_DOMAIN = [b for b in PYTHON if not b.not_run and _needs_domain(b)]


# --- Python blocks ------------------------------------------------------------------------

def test_the_pages_have_python_examples():
    assert os.path.exists(os.path.join(TOP, "docs", "index.md"))
    pages_with_python = {b.page for b in PYTHON}
    assert "README.md" in pages_with_python
    for page in ("docs/api.md", "docs/backups.md", "docs/how-it-works.md", "docs/limits.md"):
        assert page in pages_with_python, page


def test_readme_stays_short_and_every_topic_page_has_examples():
    assert _read("README.md").count("\n") <= 150, "README.md: move detail into docs/"
    for page in PAGES:
        if page not in ("README.md", "docs/index.md"):
            text = _read(page)
            assert "```" in text or re.search(r"^ {4}\S", text, flags=re.M), page


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block_compiles(block):
    compile(block.code, block.id, "exec")


OPTED_OUT = [b for b in PYTHON if b.not_run]


def test_opted_out_blocks_are_few():
    for b in OPTED_OUT:
        print(f"not run: {b.id}: {b.not_run}")
    assert len(OPTED_OUT) <= max(1, len(PYTHON) // 5), "too many opted-out examples"


@pytest.mark.parametrize("block", OPTED_OUT or [None], ids=lambda b: b.id if b else "none")
def test_opted_out_blocks_are_listed(block):
    """Each opted-out block shows in the summary (-ra) as a skip with its reason."""
    if block is not None:
        pytest.skip(f"not run: {block.id}: {block.not_run}")


def test_block_parser_sees_opt_outs_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- not run: needs a tape drive -->\n\n```python\nx = 1\n```\n"
                    "```\nvirsh-fleece demo\n```\n  ```python\n  y = 2\n  ```\n")
    blocks = fenced_blocks(str(page))
    assert [(b.line, b.lang, b.code, b.not_run) for b in blocks] == [
        (5, "python", "x = 1\n", "needs a tape drive"),
        (8, "", "virsh-fleece demo\n", None),
        (11, "python", "y = 2\n", None)]


@pytest.mark.parametrize("block", RUN_PURE or [None], ids=lambda b: b.id if b else "none")
def test_python_block_runs_without_a_domain(block, tmp_path):
    if block is None:
        pytest.skip("every Python example needs a domain")
    exec(compile(block.code, block.id, "exec"), {"__name__": "__doc_example__",
                                                 "tmp": str(tmp_path)})


@pytest.mark.integration
@pytest.mark.parametrize("block", RUN_DOMAIN, ids=lambda b: b.id)
def test_python_block_runs_on_a_domain(block, make_vm, tmp_path):
    """``dom``: a fresh running domain with two 64 MiB qcow2 disks; ``tmp``: a directory;
    ``guest_works()``: guest writes through vda's device. Afterwards no plugin snapshot
    is left, and a copy the example made of vda (``web1-vda.raw``) equals the disk."""
    import libvirt_fleece as lf

    t = make_vm(disks=2)
    writes = []

    def guest_works():
        for pattern, offset, length in ((0xA5, 8 * MiB, 256 * 1024), (0x3C, 40 * MiB, MiB)):
            t.write("vda", pattern, offset, length)
            writes.append((pattern, offset, length))

    ns = {"__name__": "__doc_example__", "dom": t.dom, "tmp": str(tmp_path),
          "guest_works": guest_works}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, block.id, "exec"), ns)
    print(out.getvalue())
    assert lf.blockSnapshotList(t.dom) == [], "the example left a snapshot behind"
    copy = tmp_path / "web1-vda.raw"
    if copy.exists():
        assert writes, "the incremental example ran without guest writes between"
        assert copy.read_bytes() == testvm.expected_image(64 * MiB, writes)


# --- virsh-fleece commands ------------------------------------------------------------------

def _code_texts() -> list[tuple[str, str, bool]]:
    """(where, text, whole_command) for every line of a non-Python code block (lines
    ending in a backslash joined) and every inline code span of the pages."""
    texts = []
    for page in PAGES:
        text = _read(page)
        for b in fenced_blocks(page):
            if b.lang != "python":
                joined = re.sub(r"\\\n\s*", " ", b.code)
                texts += [(f"{b.id}", ln, True) for ln in joined.split("\n")]
        # indented (4-space) code blocks outside fences
        unfenced = re.sub(r"```.*?```", "", text, flags=re.S)
        for chunk in re.findall(r"(?:^(?: {4}|\t).*\n?)+", unfenced, flags=re.M):
            joined = re.sub(r"\\\n\s*", " ", chunk)
            texts += [(page, ln.strip(), True) for ln in joined.split("\n")]
        for span in re.findall(r"`([^`\n]+)`", unfenced):
            texts.append((page, span, False))
    return texts


def _commands() -> list[tuple[str, list[str], bool]]:
    found = []
    for where, text, whole in _code_texts():
        for m in re.finditer(r"(?<![\w-])virsh-fleece(?=\s)", text):
            try:
                lexer = shlex.shlex(text[m.end():], posix=True, punctuation_chars="|;&<>")
                lexer.whitespace_split = True
                lexer.commenters = "#"
                tokens = []
                for tok in lexer:
                    if tok and set(tok) <= set("|;&<>"):
                        break
                    tokens.append(tok)
            except ValueError:          # an unbalanced quote in an inline span
                continue
            found.append((where, tokens, whole))
    return found


COMMANDS = _commands()


def _parser():
    from libvirt_fleece.cli import commands as cli
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return cli, parser, sub.choices


def test_the_docs_show_virsh_fleece_commands():
    subcommands = {c[1][0] for c in COMMANDS if c[1] and not c[1][0].startswith("-")}
    _, _, choices = _parser()
    # every subcommand is shown somewhere
    assert set(choices) - subcommands == set(), set(choices) - subcommands


@pytest.mark.parametrize("where,argv,whole", COMMANDS,
                         ids=[f"{w}:{' '.join(a)[:40]}" for w, a, _ in COMMANDS])
def test_virsh_fleece_command_is_real(where, argv, whole):
    """A command in a code block parses as it stands; one in running text (a fragment)
    names a real subcommand and real options of it."""
    cli, parser, choices = _parser()
    if whole:
        try:
            cli.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, f"{where}: virsh-fleece {' '.join(argv)}: usage error"
        return
    globals_ = set(parser._option_string_actions)
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0).split("=")[0]
        assert opt in globals_, f"{where}: no global option {opt}"
        if opt in ("-c", "--connect") and rest:
            rest.pop(0)
    if not rest:
        return
    assert rest[0] in choices, f"{where}: no subcommand {rest[0]!r}"
    options = set(choices[rest[0]]._option_string_actions) | globals_
    for tok in rest[1:]:
        if tok.startswith("-") and tok != "-":
            assert tok.split("=")[0] in options, f"{where}: {rest[0]} has no option {tok}"


def test_the_two_commands_are_at_the_top_of_the_readme():
    """CI and users rely on them (.ci/run runs tests/run.sh)."""
    readme = _read("README.md")
    top = readme[:readme.index("## Why")]
    assert "    sudo ./tests/demo.sh     # the main job, on a throwaway demo domain\n" in top
    assert "    sudo ./tests/run.sh      # the whole test suite\n" in top
    ci = _read(".ci/run")
    assert "exec ./tests/run.sh" in ci


# --- paths and links ---------------------------------------------------------------------------

REPO_PATH = re.compile(r"^\.?/?((?:tests|libvirt_fleece|xml-metadata|hooks|bench|docs|\.ci)"
                       r"/[\w./-]*)$")


def test_repository_paths_named_in_the_docs_exist():
    missing = []
    for where, text, _ in _code_texts():
        for tok in text.split():
            m = REPO_PATH.match(tok.rstrip(".,:;)"))
            if m and "*" not in tok and "<" not in tok:
                if not os.path.exists(os.path.join(TOP, m.group(1))):
                    missing.append(f"{where}: {tok}")
    assert missing == []


def _slug(heading: str) -> str:
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: str) -> set:
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def test_links_between_the_pages_resolve():
    bad = []
    for page in PAGES + ["NEWS.md", "RELIABILITY.md"]:
        text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(TOP, os.path.dirname(page), path)) if path \
                else os.path.join(TOP, page)
            if not os.path.exists(full):
                bad.append(f"{page}: {target}: no such file")
            elif anchor and full.endswith(".md") and anchor not in _anchors(full):
                bad.append(f"{page}: {target}: no such section")
    assert bad == []
