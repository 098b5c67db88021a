"""``relayd check-config`` and ``relayd serve`` on good and bad config files, as real subprocesses."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from tests.helpers import REPO, relayd

EXAMPLE = REPO / "config" / "relayd.example.yaml"


def _pub() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _good(tmp_path: Path) -> dict[str, Any]:
    return {
        "node": {"id": "gw-test", "state_dir": str(tmp_path / "state"), "spool_dir": str(tmp_path / "spool")},
        "gateway": {"listen": ["127.0.0.1:2222"]},
        "tenants": {"acme": {"users": [{"name": "acme-erp", "authorized_keys": [_pub()]}],
                             "routes": [{"match": "**", "to": ["arch"]}]}},
        "destinations": {"arch": {"type": "local", "path": str(tmp_path / "archive")}},
    }


def _write(tmp_path: Path, data: Any, name: str = "relayd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _assert_clean_failure(proc: Any, n_lines: int | None = None) -> list[str]:
    """Exit 2, nothing on stdout, one problem per stderr line, never a traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines and all(line.strip() for line in lines), proc.stderr
    if n_lines is not None:
        assert len(lines) == n_lines, lines
    return lines


def test_good_config_prints_config_ok(tmp_path: Path) -> None:
    proc = relayd("check-config", "-c", str(_write(tmp_path, _good(tmp_path))))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "config OK\n", "")


def test_bad_config_one_line_per_error_starting_with_key_path(tmp_path: Path) -> None:
    data = _good(tmp_path)
    data["gateway"]["max_auth_tries"] = 0
    data["gateway"]["lsten"] = []
    data["tenants"]["acme"]["users"][0]["authorized_keys"] = ["ssh-ed25519 AAAAnope"]
    data["tenants"]["acme"]["users"][0]["password"] = "hunter2"
    data["tenants"]["acme"]["quota"] = {"bytes": "lots"}
    data["tenants"]["acme"]["routes"][0]["to"] = ["nowhere"]
    proc = relayd("check-config", "-c", str(_write(tmp_path, data)))
    lines = _assert_clean_failure(proc, 6)
    assert sorted(line.split(": ", 1)[0] for line in lines) == sorted([
        "gateway.lsten", "gateway.max_auth_tries", "tenants.acme.quota.bytes",
        "tenants.acme.users[0].password", "tenants.acme.users[0].authorized_keys[0]",
        "tenants.acme.routes[0].to[0]",
    ])
    assert "gateway.lsten: unknown key (did you mean 'listen'?)" in lines
    assert "hunter2" not in proc.stderr


def test_missing_file(tmp_path: Path) -> None:
    proc = relayd("check-config", "-c", str(tmp_path / "nope.yaml"))
    [line] = _assert_clean_failure(proc, 1)
    assert line.startswith(f"{tmp_path / 'nope.yaml'}: ") and "No such file" in line


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    p = _write(tmp_path, "node:\n  id: gw1\n  state_dir: [unclosed\ngateway: {}\n")
    [line] = _assert_clean_failure(relayd("check-config", "-c", str(p)), 1)
    assert line.startswith(f"{p}: line 4, column 8: invalid YAML: "), line


@pytest.mark.parametrize("text", ["- node\n- gateway\n", "just a string\n", "", "\xff\xfe"])
def test_top_level_not_a_mapping_or_empty(tmp_path: Path, text: str) -> None:
    p = tmp_path / "relayd.yaml"
    p.write_bytes(text.encode("latin-1"))
    [line] = _assert_clean_failure(relayd("check-config", "-c", str(p)), 1)
    assert line.startswith(str(p))


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    _assert_clean_failure(relayd("check-config", "-c", str(tmp_path)), 1)


def test_authorized_keys_file_problems(tmp_path: Path) -> None:
    data = _good(tmp_path)
    users = data["tenants"]["acme"]["users"]
    users[0] = {"name": "u0", "authorized_keys_file": "missing.pub"}
    users.append({"name": "u1", "authorized_keys_file": str(tmp_path)})
    proc = relayd("check-config", "-c", str(_write(tmp_path, data)))
    lines = _assert_clean_failure(proc, 2)
    assert lines[0] == f"tenants.acme.users[0].authorized_keys_file: file not found: {tmp_path / 'missing.pub'}"
    assert lines[1].startswith("tenants.acme.users[1].authorized_keys_file: ") and "directory" in lines[1]


def test_weird_types_everywhere_never_traceback(tmp_path: Path) -> None:
    text = """\
node: [1, 2]
gateway: {listen: {a: b}, host_keys: 5, algorithms: [x], login_timeout: [1]}
tenants:
  acme: {users: {name: x}, quota: [1], routes: "r", cert_authorities: {a: 1}, temp_patterns: 7}
  7: {}
  ok: {users: [[1], {name: [a], permissions: 5, authorized_keys: {k: v}}]}
destinations: {d: [1], e: {type: {x: 1}}}
"""
    lines = _assert_clean_failure(relayd("check-config", "-c", str(_write(tmp_path, text))))
    assert len(lines) >= 15
    assert all(line.split(": ", 1)[0].split(".")[0].split("[")[0] in ("node", "gateway", "tenants", "destinations")
               for line in lines), lines


def test_serve_with_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    data = _good(tmp_path)
    data["tenants"]["acme"]["commit"] = "sometimes"
    proc = relayd("serve", "-c", str(_write(tmp_path, data)), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "tenants.acme.commit: must be 'close' or 'rename'" in proc.stderr
    assert not (tmp_path / "state").exists(), "serve must not touch state before the config is valid"


def test_serve_with_missing_config_exits_2(tmp_path: Path) -> None:
    proc = relayd("serve", "-c", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nope.yaml" in proc.stderr


# --------------------------------------------------------------------------------------------
# The shipped example


def _file_keys(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, relative path) of every file the example refers to."""
    out = [("host_key", p) for p in data["gateway"].get("host_keys", [])]
    for tenant in data["tenants"].values():
        for user in tenant.get("users", []):
            if "authorized_keys_file" in user:
                out.append(("authorized_keys", user["authorized_keys_file"]))
    for dest in data["destinations"].values():
        for key in ("identity", "known_hosts", "hmac_key_file"):
            if key in dest:
                out.append((key, dest[key]))
    return out


def _materialize_example(tmp_path: Path) -> Path:
    """Copy the example next to real files for everything it references."""
    cfg = tmp_path / "relayd.yaml"
    # The example's drop folders live under /srv/drop; check-config requires them to exist.
    text = EXAMPLE.read_text().replace("/srv/drop/", f"{tmp_path}/srv/drop/")
    cfg.write_text(text)
    data = yaml.safe_load(text)
    for folder in data.get("dropfolders", []):
        Path(folder["path"]).mkdir(parents=True, exist_ok=True)
        after = str(folder.get("after", ""))
        if after.startswith("move:"):
            Path(after[5:]).mkdir(parents=True, exist_ok=True)
    for kind, rel in _file_keys(data):
        assert not Path(rel).is_absolute(), f"example file paths should be relative to the config: {rel}"
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "host_key":
            alg = "ecdsa-sha2-nistp256" if "ecdsa" in rel else "ssh-ed25519"
            p.write_bytes(asyncssh.generate_private_key(alg).export_private_key())
        elif kind == "identity":
            p.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        elif kind == "authorized_keys":
            p.write_text(f"# managed by config management\n{_pub()}\n")
        else:
            p.write_text("placeholder\n")
    return cfg


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    cfg = _materialize_example(tmp_path)
    proc = relayd("check-config", "-c", str(cfg))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "config OK\n", "")


def test_example_config_without_its_files_names_each_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.yaml"
    shutil.copy(EXAMPLE, cfg)
    lines = _assert_clean_failure(relayd("check-config", "-c", str(cfg)))
    data = yaml.safe_load(EXAMPLE.read_text())
    assert len(lines) == len(_file_keys(data))
    assert all(": file not found: " in line for line in lines), lines


def test_example_config_breaks_loudly_when_a_key_is_misspelled(tmp_path: Path) -> None:
    cfg = _materialize_example(tmp_path)
    cfg.write_text(cfg.read_text().replace("  max_file_size:", "  max_filesize:", 1))
    [line] = _assert_clean_failure(relayd("check-config", "-c", str(cfg)), 1)
    assert line == "tenants.acme.max_filesize: unknown key (did you mean 'max_file_size'?)"


def test_check_config_names_a_missing_drop_folder(tmp_path: Path) -> None:
    cfg = _materialize_example(tmp_path)
    shutil.rmtree(tmp_path / "srv" / "drop" / "acme")
    proc = relayd("check-config", "-c", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dropfolders[0].path: folder does not exist" in proc.stderr, proc.stderr
