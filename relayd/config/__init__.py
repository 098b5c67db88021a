"""Configuration: schema, loading and validation.

YAML is read once and turned into frozen dataclasses. Every problem is reported with the
dotted key path it concerns (``tenants.acme.users[0].authorized_keys``); all problems are
collected, not just the first. Unknown keys are errors so typos never pass silently.

The schema lives in one place, :data:`KEYS` (and its one-line rendering :data:`SCHEMA`): the
validator takes every allowed and required key set from it, so the documentation, the example
config and the code cannot drift apart (``tests/unit/test_docs.py`` checks the first two).

This package imports nothing else of relayd (see DESIGN.md). Its modules, each importing only
the ones listed before it:

- :mod:`relayd.config.schema`: the key registry (:data:`KEYS`, :data:`SCHEMA`, :class:`KeySpec`)
  and shared constants (permissions, default algorithms, destination types);
- :mod:`relayd.config.values`: :class:`ConfigError`, :func:`parse_size`, :func:`parse_duration`
  and :func:`glob_to_regex`;
- :mod:`relayd.config.model`: the frozen config dataclasses;
- :mod:`relayd.config.checker`: the error-collecting walker of the raw YAML tree;
- :mod:`relayd.config.validate`: the section parsers and :func:`parse_config`;
- :mod:`relayd.config.load`: YAML file reading, :func:`load_config`.

Import from ``relayd.config`` itself; the split into modules is an implementation detail.
"""

from __future__ import annotations

from relayd.config.load import load_config
from relayd.config.model import (
    AlgorithmsConfig, Config, DestinationConfig, DropFolderConfig, GatewayConfig, NodeConfig, QuotaConfig,
    RouteConfig, TenantConfig, UserConfig,
)
from relayd.config.schema import (
    DEFAULT_ALGORITHMS, DEFAULT_PERMISSIONS, DEFAULT_TEMP_PATTERNS, DESTINATION_TYPES, KEYS, PERMISSIONS,
    REQUIRED, SCHEMA, KeySpec,
)
from relayd.config.schema import COMMIT_MODES as COMMIT_MODES  # public before the split, not in __all__
from relayd.config.validate import _DEST_CONVERTERS as _DEST_CONVERTERS  # used by tests
from relayd.config.validate import parse_config
from relayd.config.values import ConfigError, glob_to_regex, parse_duration, parse_size

__all__ = [
    "ConfigError", "Config", "NodeConfig", "GatewayConfig", "AlgorithmsConfig",
    "TenantConfig", "UserConfig", "QuotaConfig", "RouteConfig", "DestinationConfig", "DropFolderConfig",
    "load_config", "parse_config", "parse_size", "parse_duration", "PERMISSIONS",
    "DEFAULT_PERMISSIONS", "DEFAULT_ALGORITHMS", "DEFAULT_TEMP_PATTERNS", "DESTINATION_TYPES",
    "KeySpec", "KEYS", "SCHEMA", "REQUIRED", "glob_to_regex",
]
