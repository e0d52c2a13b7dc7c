"""The code guard: a policy check on the syntax tree, at compile time, before anything runs.

It finds forbidden names (`open`), attribute paths (`os.system`, also through `import os as o`) and
imports (`import subprocess`, `from os import system`). It reads what the code says, not what it
computes at run time (`getattr(os, "sys" + "tem")` passes): a guard rail for honest code, not a sandbox."""
from __future__ import annotations

import ast
from dataclasses import dataclass

from .. import errors
from ..errors import QueryError


@dataclass(frozen=True, slots=True)
class Violation:
    line: int
    use: str        # the forbidden thing as written, resolved through import aliases
    kind: str       # "name", "attribute" or "import"


class CodeGuard:
    def __init__(self, forbid: tuple[str, ...] | list[str]):
        self.forbid = frozenset(f.strip() for f in forbid if f and f.strip())

    def __bool__(self) -> bool:
        return bool(self.forbid)

    def forbidden(self, dotted: str) -> bool:
        """`os.system` is forbidden by "os.system" and by "os"; `os.path` is not forbidden by "os.system"."""
        parts = dotted.split(".")
        return any(".".join(parts[:n]) in self.forbid for n in range(1, len(parts) + 1))

    def violations(self, tree: ast.AST) -> list[Violation]:
        finder = _Finder(self)
        finder.visit(tree)
        return sorted(finder.found, key=lambda v: (v.line, v.use))

    def check(self, tree: ast.AST, filename: str) -> None:
        """Raise the codeguard QueryError listing every forbidden use, with its line."""
        found = self.violations(tree)
        if found:
            listing = "; ".join(f"line {v.line}: {v.use}" for v in found)
            raise QueryError(errors.GUARD_VIOLATION,
                             "The code in {0} uses what the source's codeGuard forbids: {1}",
                             [filename, listing, [{"line": v.line, "use": v.use, "kind": v.kind} for v in found]])


class _Finder(ast.NodeVisitor):
    def __init__(self, guard: CodeGuard):
        self.guard = guard
        self.aliases: dict[str, str] = {}     # local name -> the module path it stands for
        self.found: list[Violation] = []

    def _flag(self, node: ast.AST, use: str, kind: str) -> None:
        self.found.append(Violation(getattr(node, "lineno", 0), use, kind))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self.guard.forbidden(alias.name):
                self._flag(node, f"import {alias.name}", "import")
            local = alias.asname or alias.name.split(".")[0]
            self.aliases[local] = alias.name if alias.asname else local

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module and self.guard.forbidden(module):
            self._flag(node, f"import {module}", "import")
            return
        for alias in node.names:
            full = f"{module}.{alias.name}" if module else alias.name
            if node.level == 0 and self.guard.forbidden(full):
                self._flag(node, f"from {module} import {alias.name}", "import")
            self.aliases[alias.asname or alias.name] = full

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = self._dotted(node)
        if dotted is not None:
            if self.guard.forbidden(dotted):
                self._flag(node, dotted, "attribute")
            else:
                self._check_root(node)
            return                     # the chain is checked whole: one report per use
        self.generic_visit(node)

    def _check_root(self, node: ast.Attribute) -> None:
        root: ast.expr = node
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name):
            self.visit_Name(root)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.guard.forbid:
            self._flag(node, node.id, "name")

    def _dotted(self, node: ast.Attribute) -> str | None:
        parts = []
        current: ast.AST = node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            return None
        root = self.aliases.get(current.id, current.id)
        return ".".join([root, *reversed(parts)])
