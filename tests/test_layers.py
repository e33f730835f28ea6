# SPDX-License-Identifier: LGPL-2.1-or-later
"""The package's layers, checked from its imports (issue 13): no import circle anywhere,
and each layer imports only the ones below it.

    cli/, backup_guard       the command line and the backup's guard process
    backup/                  the backup client, on the public API
    __init__, snapshots, exports, checkpoints, calls, watcher, hook   the public layer
    steps/                   internal steps: take a Session, never open one
    session, metadata, ...   the state and the foundations
    qemu/                    the qemu block layer: no records, no sessions
"""

from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "libvirt_fleece")
PUBLIC = {"libvirt_fleece", "libvirt_fleece.snapshots", "libvirt_fleece.exports",
          "libvirt_fleece.checkpoints", "libvirt_fleece.calls", "libvirt_fleece.watcher",
          "libvirt_fleece.hook"}


def _modules() -> dict[str, str]:
    found = {}
    for root, _dirs, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that ``name`` imports (at any depth, TYPE_CHECKING too)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules and m != name}


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _layer(module: str) -> str:
    if module.startswith("libvirt_fleece.qemu"):
        return "qemu"
    if module.startswith("libvirt_fleece.steps"):
        return "steps"
    if module.startswith(("libvirt_fleece.cli", "libvirt_fleece.backup_guard")):
        return "cli"
    if module.startswith("libvirt_fleece.backup"):
        return "backup"
    return "public" if module in PUBLIC else "foundation"


ALLOWED = {     # the layers each layer may import
    "qemu": {"qemu", "foundation"},
    "foundation": {"foundation", "qemu"},
    "steps": {"steps", "foundation", "qemu"},
    "public": {"public", "steps", "foundation", "qemu"},
    "backup": {"backup", "public", "foundation", "qemu"},
    "cli": {"cli", "backup", "public", "foundation", "qemu"},
}


def test_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(GRAPH[m]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join(
                path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = [f"{m} ({_layer(m)}) imports {d} ({_layer(d)})"
             for m, deps in GRAPH.items() for d in deps
             if _layer(d) not in ALLOWED[_layer(m)]
             and not (m == "libvirt_fleece" or d == "libvirt_fleece")]
    assert wrong == []


def test_the_foundation_knows_no_session_and_qemu_no_records():
    for m, deps in GRAPH.items():
        if _layer(m) == "qemu":
            assert not deps & {"libvirt_fleece.session", "libvirt_fleece.metadata"}, m
    assert GRAPH["libvirt_fleece.session"] <= {
        "libvirt_fleece.config", "libvirt_fleece.errors", "libvirt_fleece.lock",
        "libvirt_fleece.metadata", "libvirt_fleece.virt", "libvirt_fleece.qemu.qmp",
        "libvirt_fleece.qemu"}


def test_only_the_public_layer_opens_sessions():
    for m, path in _modules().items():
        if _layer(m) == "steps":
            assert "open_session" not in open(path).read(), m
