"""The schema registry: every config key with its type, default and meaning.

:data:`KEYS` (and its one-line rendering :data:`SCHEMA`) is the single source of the allowed
and required key sets; also the constants the rest of the package shares (permissions,
default algorithms, destination types).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Mapping

PERMISSIONS = frozenset({"list", "download", "upload", "overwrite", "delete", "rename", "mkdir", "peer"})
DEFAULT_PERMISSIONS = frozenset({"upload", "list", "mkdir"})
DEFAULT_TEMP_PATTERNS = ("*.tmp", "*.part", "*.filepart")
COMMIT_MODES = ("close", "rename")
DEFAULT_DROP_TEMP_PATTERNS = (".*", "*.tmp", "*.part", "*.filepart")
"""Names a drop folder ignores until they are renamed (``dropfolders[].temp_patterns``)."""
DESTINATION_TYPES = ("local", "sftp", "relayd")

# Modern algorithms only, in the spirit of OpenSSH's current defaults: no SHA-1, no CBC,
# no ssh-rsa (SHA-1) signatures, no umac. aes-ctr + hmac-sha2 stay for legacy clients
# (libssh2 in Debian 12 has no AEAD ciphers). Strict kex (Terrapin) is negotiated by asyncssh.
DEFAULT_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "kex": (
        "mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
        "diffie-hellman-group-exchange-sha256", "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256",
    ),
    "ciphers": (
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
        "aes128-ctr", "aes192-ctr", "aes256-ctr",
    ),
    "macs": (
        "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
        "hmac-sha2-256", "hmac-sha2-512",
    ),
    "signatures": (
        "ssh-ed25519", "sk-ssh-ed25519@openssh.com",
        "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ecdsa-sha2-nistp256@openssh.com", "rsa-sha2-512", "rsa-sha2-256",
    ),
    "compression": ("none",),
}


class _Required:
    """Marker for a key without a default (it must be given)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class KeySpec:
    """One config key: its type (as written in YAML), default and meaning.

    ``default`` is the YAML-level value used when the key is left out (``None``: no limit /
    not set; :data:`REQUIRED`: must be given). ``types`` restricts a ``destinations.<name>.*``
    key to some destination types; ``required_for`` makes it required for some of them.
    """

    type: str
    default: Any
    description: str
    types: tuple[str, ...] = ()
    required_for: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """True if the key must always be present."""
        return self.default is REQUIRED

    def summary(self) -> str:
        """One line: ``type; default ...; description``."""
        if self.required:
            default = "required"
        elif self.required_for:
            default = f"required for type {', '.join(self.required_for)}"
        elif self.default is None:
            default = "default: not set"
        else:
            default = f"default: {_yaml_inline(self.default)}"
        where = f" (type {', '.join(self.types)} only)" if self.types else ""
        return f"{self.type}; {default}. {self.description}{where}"


def _yaml_inline(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_K = KeySpec
EXTRA_DIGEST_NAMES = ("sha3-256", "blake2b")
"""``integrity.digests`` values (relayd.integrity.manifest.EXTRA_DIGESTS implements them)."""
_REMOTE = ("sftp", "relayd")

#: Every key, by dotted path. ``<name>`` stands for a tenant or destination name, ``[]`` for
#: any list item. The validator's allowed/required key sets come from here.
KEYS: Mapping[str, KeySpec] = MappingProxyType({
    "node": _K("mapping", REQUIRED, "This gateway: its id and where it keeps state and spooled data."),
    "node.id": _K("name", REQUIRED, "Gateway id (letters, digits, '.', '_', '-'; max 64); written into "
                  "every manifest."),
    "node.state_dir": _K("path", "/var/lib/relayd", "Journal (journal.db) and the generated host key."),
    "node.spool_dir": _K("path", "/var/spool/relayd", "Tenant inboxes, staging files and spool objects."),

    "integrity": _K("mapping", {}, "Signed manifests: what the gateway vouches for per committed file."),
    "integrity.manifests": _K("boolean", True, "Sign a manifest (Ed25519, key in node.state_dir/signing) "
                              "for every committed file; false only to measure its cost."),
    "integrity.digests": _K("list of strings", [], "Digests added to sha256 in every manifest: sha3-256, "
                            "blake2b (computed while receiving)."),

    "metrics": _K("mapping", {}, "The Prometheus endpoint (text format over HTTP, no auth: keep it on "
                  "loopback or a management network)."),
    "metrics.enabled": _K("boolean", True, "Serve metrics; false: no HTTP listener at all."),
    "metrics.listen": _K("HOST:PORT", "127.0.0.1:9464", "Address of the metrics endpoint; a change needs a "
                         "restart."),

    "gateway": _K("mapping", {}, "The SSH/SFTP front door."),
    "gateway.listen": _K("list of HOST:PORT", ["0.0.0.0:2222"], "Addresses to listen on: IPv4, [IPv6] "
                         "or a host name; '*' or an empty host means all IPv4 addresses."),
    "gateway.host_keys": _K("list of paths", [], "Private host key files (unencrypted OpenSSH/PEM). Empty: an "
                            "Ed25519 key is generated once in node.state_dir."),
    "gateway.login_timeout": _K("duration", "30s", "Time a client has to authenticate."),
    "gateway.max_auth_tries": _K("integer >= 1", 6, "Failed authentication attempts before the connection "
                                 "is closed."),
    "gateway.max_sessions_per_user": _K("integer >= 1", 16, "Concurrent SFTP sessions per login name."),
    "gateway.max_handles_per_session": _K("integer >= 1", 64, "Open file/directory handles per SFTP session."),
    "gateway.idle_timeout": _K("duration", "15m", "Close sessions idle this long (0: never)."),
    "gateway.max_startups": _K("integer >= 1", 128, "Concurrent connections not yet authenticated; further "
                               "ones are dropped at once (like sshd MaxStartups)."),
    "gateway.max_connections_per_ip": _K("integer >= 1", 64, "Concurrent connections from one source "
                                         "address; further ones are dropped at once."),
    "gateway.keepalive_interval": _K("duration", "30s", "SSH keepalive interval (0: off); 3 missed answers "
                                     "close the connection."),
    "gateway.drain_timeout": _K("duration", "60s", "On stop (SIGTERM), how long uploads in progress may "
                                "finish; delivery attempts still running get what is left, then resume at "
                                "the next start. Keep it 15s or more below systemd's TimeoutStopSec."),
    "gateway.algorithms": _K("mapping", {}, "SSH algorithm lists in preference order; a list replaces the "
                             "default for its kind."),
    "gateway.algorithms.kex": _K("list of strings", list(DEFAULT_ALGORITHMS["kex"]), "Key exchange."),
    "gateway.algorithms.ciphers": _K("list of strings", list(DEFAULT_ALGORITHMS["ciphers"]), "Ciphers."),
    "gateway.algorithms.macs": _K("list of strings", list(DEFAULT_ALGORITHMS["macs"]),
                                  "MACs (unused with AEAD ciphers)."),
    "gateway.algorithms.signatures": _K("list of strings", list(DEFAULT_ALGORITHMS["signatures"]),
                                        "Host key and user key signature algorithms."),
    "gateway.algorithms.compression": _K("list of strings", list(DEFAULT_ALGORITHMS["compression"]),
                                         "Compression (none, zlib@openssh.com, zlib)."),

    "tenants": _K("mapping", {}, "Tenants by name; each has its own chrooted inbox and spool."),
    "tenants.<name>": _K("mapping", {}, "One tenant (name: letters, digits, '.', '_', '-'; max 64)."),
    "tenants.<name>.quota": _K("mapping", {}, "Tenant-wide limits over all its stored files."),
    "tenants.<name>.quota.bytes": _K("size > 0", None, "Total bytes the tenant may store; not set: unlimited."),
    "tenants.<name>.quota.files": _K("integer >= 1", None, "Number of files the tenant may store; not set: "
                                     "unlimited."),
    "tenants.<name>.max_file_size": _K("size > 0", None, "Largest single upload; not set: unlimited."),
    "tenants.<name>.commit": _K("close | rename", "close", "When an upload is committed: on close, or on the "
                                "rename of a temp-named upload to its final name."),
    "tenants.<name>.temp_patterns": _K("list of globs", list(DEFAULT_TEMP_PATTERNS), "File names (last path "
                                       "component) treated as temporary with commit: rename."),
    "tenants.<name>.cert_authorities": _K("list of public keys", [], "Bare CA public keys; a user may log "
                                          "in with an OpenSSH certificate from one of them whose principals "
                                          "name the login."),
    "tenants.<name>.retention": _K("duration", "7d", "How long a spool object is kept after all its "
                                   "deliveries are final."),
    "tenants.<name>.users": _K("list of mappings", [], "Logins of this tenant; login names are unique across "
                               "all tenants."),
    "tenants.<name>.users[].name": _K("name", REQUIRED, "Login name."),
    "tenants.<name>.users[].authorized_keys": _K("list of public keys", [], "OpenSSH authorized_keys lines "
                                                 "(options allowed), one per item."),
    "tenants.<name>.users[].authorized_keys_file": _K("path", None, "An authorized_keys file, read when the "
                                                      "config is loaded (and on reload)."),
    "tenants.<name>.users[].password_hash": _K("string", None, "argon2id ($argon2id$...) or bcrypt ($2b$...) "
                                               "hash; make one with `relayd hash-password`. Plaintext is "
                                               "refused."),
    "tenants.<name>.users[].permissions": _K("list", sorted(DEFAULT_PERMISSIONS), "Any of list, download, "
                                             "upload, overwrite, delete, rename, mkdir; peer: another relayd "
                                             "may deliver through the relayd-peer@relayd subsystem."),
    "tenants.<name>.users[].trusted_signers": _K("list of public keys", [], "For a peer user: the Ed25519 "
                                                 "manifest keys (ssh-ed25519 lines, from `relayd keys show` on "
                                                 "the sending gateway) whose signed offers are accepted."),
    "tenants.<name>.routes": _K("list of mappings", [], "Where committed files go; every matching route "
                                "applies."),
    "tenants.<name>.routes[].match": _K("glob", REQUIRED, "Path inside the tenant root: * and ? stay within "
                                        "a directory, ** matches any number of directories, [abc] a class."),
    "tenants.<name>.routes[].to": _K("list of destination names", REQUIRED, "Destinations that receive the "
                                     "matching files."),

    # Drop folders: the keys of a list item have no registry default (not set → the value named in
    # the description) because an item is never valid without its required path and tenant.
    "dropfolders": _K("list of mappings", [], "Local or mounted folders whose settled files are committed into a "
                      "tenant's inbox like uploads (docs/dropfolders.md)."),
    "dropfolders[].path": _K("path", REQUIRED, "The folder to watch; relayd serve refuses to start and "
                             "check-config fails (exit 2) when it does not exist."),
    "dropfolders[].tenant": _K("tenant name", REQUIRED, "Tenant whose inbox, quota and routes the files get."),
    "dropfolders[].pattern": _K("glob", None, "Files to take, matched against the path inside the folder with "
                                "the route glob syntax; not set: ** (every file)."),
    "dropfolders[].recursive": _K("boolean", None, "Also watch subfolders (files keep their relative path); "
                                  "not set: false."),
    "dropfolders[].settle": _K("duration", None, "A file is taken once its size and mtime stayed unchanged "
                               "this long, or 0.5s (at most settle) after a close-after-write with no change "
                               "since; not set: 5s."),
    "dropfolders[].after": _K("delete | keep | move:DIR", None, "What happens to the original once its commit "
                              "is durable: deleted, kept (taken again only when changed) or moved under DIR "
                              "(outside the folder, or in a folder temp_patterns exclude); not set: delete."),
    "dropfolders[].temp_patterns": _K("list of globs", None, "File and folder names ignored (until renamed); "
                                      "not set: [.*, *.tmp, *.part, *.filepart]."),
    "dropfolders[].into": _K("string", None, "Folder of the tenant's inbox the files land in, under their "
                             "path inside the drop folder; not set: /."),
    "dropfolders[].rescan": _K("duration", None, "Interval of the full rescan that catches what events miss "
                               "(overload, network mounts); not set: 60s."),

    "destinations": _K("mapping", {}, "Delivery targets by name, used by routes."),
    "destinations.<name>": _K("mapping", {}, "One delivery target (name: letters, digits, '.', '_', '-')."),
    "destinations.<name>.type": _K("local | sftp | relayd", REQUIRED, "Kind of destination."),
    "destinations.<name>.path": _K("string", REQUIRED, "Target directory (local: on this host, relative to "
                                   "the config file; sftp/relayd: on the remote host); {tenant} is replaced "
                                   "by the tenant name."),
    "destinations.<name>.host": _K("string", None, "Remote host name or address.", _REMOTE, _REMOTE),
    "destinations.<name>.port": _K("integer 1-65535", None, "Remote SSH port; not set: 22 for sftp, 2222 "
                                   "for relayd.", _REMOTE),
    "destinations.<name>.user": _K("string", None, "Remote login name.", _REMOTE, _REMOTE),
    "destinations.<name>.identity": _K("path", None, "Private key file for the remote login.", _REMOTE,
                                       _REMOTE),
    "destinations.<name>.known_hosts": _K("path", None, "known_hosts file pinning the remote host key.",
                                          _REMOTE, _REMOTE),
    "destinations.<name>.concurrency": _K("integer >= 1", 4, "Deliveries run in parallel to this destination "
                                          "(sftp: connections, each shared by `streams` deliveries; large files "
                                          "written by the OpenSSH client: at most this many clients, each its own "
                                          "connection, at once)."),
    "destinations.<name>.verify": _K("sha256 | size", "sha256", "What the far end confirms before the final "
                                     "rename: size and SHA-256 (remote sha256sum over exec where the server "
                                     "allows it, else size, noted on the delivery), or size only.",
                                     ("local", "sftp")),
    "destinations.<name>.on_conflict": _K("overwrite | rename | fail", "overwrite", "When the final name "
                                          "already exists: replace it, keep both (new name), or fail the "
                                          "delivery.", ("local", "sftp")),
    "destinations.<name>.fsync": _K("boolean", True, "Have the server flush each file to its disk "
                                    "(fsync@openssh.com, alongside the verification) before the rename, so a delivery "
                                    "counts as done only once the data is durable at the far end; servers "
                                    "without the extension: skipped, noted on the delivery.", ("sftp",)),
    "destinations.<name>.sidecar": _K("boolean", False, "Also publish <name>.relayd.json (signed "
                                      "manifest) after each file, atomically.",
                                      ("local", "sftp")),
    "destinations.<name>.hmac_key_file": _K("path", None, "Shared key for an HMAC-SHA256 over the manifest "
                                            "in each sidecar (file content, whitespace trimmed).",
                                            ("local", "sftp")),
    "destinations.<name>.max_attempts": _K("integer >= 1", None, "Give up (failed) after this many attempts; "
                                           "not set: no limit."),
    "destinations.<name>.max_age": _K("duration", None, "Give up (failed) when a delivery is older than "
                                      "this; not set: no limit."),
    "destinations.<name>.retry_initial": _K("duration", "2s", "Wait after the first failed attempt; doubles "
                                            "with each further failure (±20% jitter)."),
    "destinations.<name>.retry_max": _K("duration", "5m", "Longest wait between two attempts."),
    "destinations.<name>.connect_timeout": _K("duration", "30s", "TCP connect + SSH handshake timeout.",
                                              _REMOTE),
    "destinations.<name>.idle_timeout": _K("duration", "5m", "Close an unused connection after this long.",
                                           _REMOTE),
    "destinations.<name>.block_size": _K("size > 0", "255KiB", "SFTP write block size (OpenSSH's sftp-server "
                                         "accepts at most 255 KiB).", ("sftp",)),
    "destinations.<name>.requests": _K("integer >= 1", 64, "SFTP write requests in flight per connection "
                                       "(memory: about block_size x requests per connection).", ("sftp",)),
    "destinations.<name>.streams": _K("integer >= 1", 32, "Deliveries that share one connection at a time, so "
                                      "small files go out many at once (in flight: concurrency x streams).",
                                      ("sftp",)),
    "destinations.<name>.bulk_client": _K("auto | openssh | asyncssh", "auto", "Who writes large files: the "
                                          "OpenSSH sftp client (several times faster; same key and pinned host "
                                          "key) or asyncssh. auto: OpenSSH when installed.", ("sftp",)),
    "destinations.<name>.bulk_min_size": _K("size > 0", "16MiB", "Files from this size go through bulk_client.",
                                            ("sftp",)),
})

#: One line per key: ``type; default ...; meaning``. Rendered from :data:`KEYS`.
SCHEMA: dict[str, str] = {path: spec.summary() for path, spec in KEYS.items()}


@lru_cache(maxsize=None)
def _section_keys(section: str, dtype: str | None = None) -> frozenset[str]:
    """The keys allowed directly under ``section`` (``""`` is the top level)."""
    prefix = f"{section}." if section else ""
    out = set()
    for path, spec in KEYS.items():
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if "." not in rest and "[]" not in rest and (dtype is None or not spec.types or dtype in spec.types):
                out.add(rest)
    if not out:
        raise KeyError(f"no such config section: {section!r}")  # a programming error, caught in tests
    return frozenset(out)


@lru_cache(maxsize=None)
def _section_required(section: str, dtype: str | None = None) -> tuple[str, ...]:
    """The keys that must be present under ``section`` (for destination type ``dtype``)."""
    prefix = f"{section}." if section else ""
    return tuple(k for k in sorted(_section_keys(section, dtype))
                 if KEYS[prefix + k].required or (dtype is not None and dtype in KEYS[prefix + k].required_for))
