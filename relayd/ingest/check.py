"""What only the running host can tell about the drop folders of a config (run at start and reload)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from relayd.config import Config, ConfigError

__all__ = ["check_dropfolders"]


def check_dropfolders(config: Config, known: Iterable[Path] = ()) -> None:
    """What only the running host can tell: every drop folder (and move target) exists and no two
    folders overlap once symlinks are resolved. Raises :class:`ConfigError` (exit code 2).

    Folders in ``known`` (already watched; on reload) may be missing: that is an alert, not a
    config error.
    """
    errors: list[str] = []
    skip = set(known)
    reals: list[tuple[str, str]] = []
    for i, d in enumerate(config.dropfolders):
        key = f"dropfolders[{i}]"
        checks = [(f"{key}.path", d.path, "folder")]
        if d.move_to is not None:
            checks.append((f"{key}.after", d.move_to, "move target"))
        for where, path, what in checks:
            if path in skip and what == "folder":
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                errors.append(f"{where}: {what} does not exist: {path}")
                continue
            except OSError as exc:
                errors.append(f"{where}: cannot access {what} {path}: {exc.strerror or exc}")
                continue
            if not stat.S_ISDIR(st.st_mode):
                errors.append(f"{where}: {what} {path} is not a folder")
            elif what == "folder":
                reals.append((f"{key}.path", os.path.realpath(path)))
    for i, (key, real) in enumerate(reals):
        for other_key, other in reals[:i]:
            if real == other or real.startswith(other + "/") or other.startswith(real + "/"):
                errors.append(f"{key}: resolves to {real}, which overlaps {other_key} ({other})")
    if errors:
        raise ConfigError(errors)
