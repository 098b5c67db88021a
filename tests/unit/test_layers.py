"""Import direction of DESIGN.md: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "relayd"

# Layer of each module (prefix match, most specific first); a module may import only its own
# layer or lower ones.
LAYERS = [
    ("relayd.cli", 9), ("relayd.admin", 9), ("relayd.demo", 8), ("relayd.daemon", 8),
    ("relayd.gateway", 6), ("relayd.ingest", 6), ("relayd.relay", 6),
    ("relayd.spool", 5), ("relayd.journal", 4), ("relayd.integrity", 3),
    ("relayd.policy", 2), ("relayd.audit", 2), ("relayd.metrics", 2),
    ("relayd.config", 1), ("relayd", 0),
]


def layer(module: str) -> int:
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"no layer for {module}")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("relayd")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relayd"):
            out.add(node.module)
    return out


def relative_imports(path: Path) -> list[str]:
    """``from .x import y`` and the like, which :func:`imports` does not see."""
    tree = ast.parse(path.read_text())
    return ["." * node.level + (node.module or "") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level]


def test_imports_point_down() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        module = "relayd." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for target in imports(path):
            if target == "relayd":
                continue
            if layer(target) > layer(module):
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_config_imports_nothing_of_relayd() -> None:
    files = sorted((PKG / "config").rglob("*.py"))
    assert PKG / "config" / "__init__.py" in files
    for path in files:
        others = {t for t in imports(path) if t != "relayd.config" and not t.startswith("relayd.config.")}
        assert others == set(), path
        assert not relative_imports(path), f"{path}: use absolute relayd.config.* imports"


def test_destinations_know_nothing_of_the_gateway() -> None:
    for path in (PKG / "relay").rglob("*.py"):
        assert not any(t.startswith("relayd.gateway") for t in imports(path)), path
