"""Reading a YAML config file: duplicate keys refused, every failure a :class:`ConfigError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from relayd.config.model import Config
from relayd.config.validate import parse_config
from relayd.config.values import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent overwrite hides mistakes)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: SafeLoader reports it below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: invalid YAML: problem`` on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and getattr(exc, "problem", None):
        problem = f"{problem} ({context})"
    return f"{where}invalid YAML: " + " ".join(str(problem).split())


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Relative paths in it are relative to its folder.

    Every failure (unreadable file, bad YAML, invalid values) raises :class:`ConfigError`.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise ConfigError([f"{p}: cannot read config: is a directory"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: config is not UTF-8 text (byte {exc.start})"]) from None
    except ValueError as exc:
        raise ConfigError([f"{p}: cannot read config: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: {_yaml_problem(exc)}"]) from None
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
        raise ConfigError([f"{p}: cannot parse YAML ({type(exc).__name__})"]) from None
    if data is None:
        raise ConfigError([f"{p}: config is empty"])
    resolved = p.resolve()
    return parse_config(data, base_dir=resolved.parent, source=resolved)
