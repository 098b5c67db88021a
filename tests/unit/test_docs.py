"""The key registry (relayd.config.SCHEMA), docs/configuration.md and the example config agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from relayd.config import KEYS, SCHEMA

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "configuration.md"
EXAMPLE = REPO / "config" / "relayd.example.yaml"


def _schema_paths(data: Any, prefix: str = "") -> Iterator[str]:
    """The schema-style key paths present in a raw config tree.

    Tenant and destination names become ``<name>``, list items ``[]``; the values of free-form
    lists (listen addresses, keys, ...) are not descended into.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if prefix in ("tenants", "destinations"):
                path = f"{prefix}.<name>"
            yield path
            yield from _schema_paths(value, path)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                yield from _schema_paths(item, f"{prefix}[]")


@pytest.fixture(scope="module")
def example_paths() -> set[str]:
    return set(_schema_paths(yaml.safe_load(EXAMPLE.read_text())))


@pytest.fixture(scope="module")
def docs_text() -> str:
    return DOCS.read_text()


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_every_key_is_documented(key: str, docs_text: str) -> None:
    assert f"`{key}`" in docs_text, f"{key} is missing from docs/configuration.md"


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_every_key_is_in_the_example(key: str, example_paths: set[str]) -> None:
    assert key in example_paths, f"{key} is missing from config/relayd.example.yaml"


def test_example_uses_no_key_outside_the_registry(example_paths: set[str]) -> None:
    assert example_paths <= set(KEYS)


def test_docs_mention_no_unknown_key(docs_text: str) -> None:
    """Every dotted key path written in backticks in the docs is a real key."""
    roots = ("node.", "gateway.", "tenants.", "destinations.")
    mentioned = {m.removesuffix("[]") for m in re.findall(r"`([a-z_]+(?:\.[a-z_<>\[\]]+)+)`", docs_text)
                 if m.startswith(roots)}
    assert mentioned, "docs mention no key paths?"
    assert mentioned <= set(KEYS), sorted(mentioned - set(KEYS))


def test_docs_cover_commit_modes_and_temp_files(docs_text: str) -> None:
    lower = docs_text.lower()
    assert "## commit modes" in lower
    for word in ("commit: close", "commit: rename", "temp_patterns", "fsync", "journal", "rename"):
        assert word in lower, word


def test_docs_show_every_default(docs_text: str) -> None:
    """The documented default of each key is the registry's (rendered the same way)."""
    for key, spec in KEYS.items():
        if spec.required or spec.default is None or spec.default in ({}, []):
            continue
        line = next((ln for ln in docs_text.splitlines() if ln.startswith(f"| `{key}`")), None)
        assert line is not None, f"no table row for {key}"
        default = SCHEMA[key].split("; ", 1)[1].split(". ", 1)[0].removeprefix("default: ")
        assert default in line, (key, default, line)
