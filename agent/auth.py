"""API keys and their rights: who may be served, who may teach, who may steer, who may administer.

A runtime that learns from its traffic can be taught wrong things by that traffic, so being *answered* and
*teaching* are separate rights. Each key has a name and a set of rights:

- ``answer``: may call ``/v1/*`` at all;
- ``teach``: what it sends may become training data (without it the request is answered, System 2 may run
  to answer it, but no example is stored);
- ``steer``: may set ``route``, ``method`` or ``tag`` in the request's ``s2agent`` field (forcing System 2 or
  a method is how one pushes chosen answers into the buffer);
- ``admin``: the ``/admin/*`` routes; its traffic is the operator's and is never capped per source.

Keys come from ``server.api_key`` (``agent serve --api-key KEY``: one key with every right, as vLLM's),
``server.api_keys`` (``S2AGENT_API_KEYS``) and ``server.api_keys_file``, tables of
``name -> {key_sha256 | key, rights}``. A secret is kept only as its SHA-256 digest, compared in constant
time, and never logged or stored: what the store records as the *source* of a request is the key's name
(``key-<first 12 hex digits of its SHA-256>`` for the unnamed ``--api-key``), ``local`` for in-process calls
and ``anonymous`` for a server without keys. ``server.admin_token`` keeps working: it opens ``/admin/*``.

This module decides nothing about HTTP (the server's :mod:`agent.server.auth` turns its answers into 401
and 403 responses) and imports no configuration, so the configuration can check key tables with it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ConfigError

logger = logging.getLogger(__name__)

RIGHTS = ("answer", "teach", "steer", "admin")
"""Every right a key may have."""
ALL_RIGHTS = frozenset(RIGHTS)
LOCAL = "local"
"""The source of in-process calls (an embedded ``Agent``, ``agent ask``, ``agent store import``)."""
ANONYMOUS = "anonymous"
"""The source of requests to a server without API keys (loopback only, unless explicitly allowed)."""
OPERATOR_SOURCES = frozenset({LOCAL, ANONYMOUS})
"""Sources that are the operator by construction: never capped, never a key's name."""
DEFAULT_RIGHTS = ("answer",)
"""A key table entry without ``rights`` may only be answered: teaching and steering are granted, not assumed."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_ENTRY_FIELDS = frozenset({"key", "key_sha256", "rights"})


@dataclass(frozen=True)
class APIKey:
    """One key: its name (the source its traffic is recorded under), its secret's digest, its rights."""

    name: str
    digest: bytes = field(repr=False)
    rights: frozenset[str]


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the runtime needs to know it: a source name and the rights it has."""

    source: str
    rights: frozenset[str]

    def may(self, right: str) -> bool:
        return right in self.rights


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def unnamed_source(secret: str) -> str:
    """The source name of a key given without a name: a short prefix of its SHA-256, never the secret."""
    return f"key-{hashlib.sha256(secret.encode('utf-8')).hexdigest()[:12]}"


def entry_problems(table: Any) -> list[str]:
    """What is wrong with a key table (``name -> {key | key_sha256, rights}``); empty when it is usable."""
    if not isinstance(table, Mapping):
        return [f"must be a table of name -> {{key_sha256, rights}}, not {type(table).__name__}"]
    problems: list[str] = []
    for name, entry in table.items():
        where = f"key {name!r}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(f"{where}: a name is 1-64 letters, digits or ._@- (starting with a letter or digit)")
        elif name in OPERATOR_SOURCES:
            problems.append(f"{where}: the name is reserved for the operator's own traffic")
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a table with key_sha256 (or key) and rights")
            continue
        unknown = set(entry) - _ENTRY_FIELDS
        if unknown:
            problems.append(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_ENTRY_FIELDS)}")
        if ("key" in entry) == ("key_sha256" in entry):
            problems.append(f"{where}: give exactly one of key_sha256 (preferred) or key")
        elif "key" in entry and not (isinstance(entry["key"], str) and entry["key"].strip()):
            problems.append(f"{where}: key must be a non-empty string")
        elif "key_sha256" in entry and not (isinstance(entry["key_sha256"], str)
                                            and re.fullmatch(r"[0-9a-fA-F]{64}", entry["key_sha256"])):
            problems.append(f"{where}: key_sha256 must be 64 hex digits (sha256sum of the key)")
        rights = entry.get("rights", list(DEFAULT_RIGHTS))
        if not isinstance(rights, (list, tuple)) or not all(isinstance(r, str) for r in rights):
            problems.append(f"{where}: rights must be a list among {', '.join(RIGHTS)}")
        elif set(rights) - ALL_RIGHTS:
            problems.append(f"{where}: unknown right(s) {sorted(set(rights) - ALL_RIGHTS)}; "
                            f"a key may have {', '.join(RIGHTS)}")
    return problems


def _parse_table(table: Mapping[str, Any], where: str) -> list[APIKey]:
    problems = entry_problems(table)
    if problems:
        raise ConfigError(f"{where}: {problems[0]}")
    keys = []
    for name, entry in table.items():
        value = bytes.fromhex(entry["key_sha256"]) if "key_sha256" in entry else digest(entry["key"])
        keys.append(APIKey(name, value, frozenset(entry.get("rights", DEFAULT_RIGHTS))))
    return keys


def read_keys_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A key table from a file: JSON when it ends in ``.json``, TOML otherwise."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file {file}: {exc.strerror or exc}") from None
    try:
        table = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the API keys file {file} is not valid {'JSON' if file.suffix == '.json' else 'TOML'}: "
                          f"{exc}") from None
    if isinstance(table, dict) and any(isinstance(e, dict) and "key" in e for e in table.values()):
        try:
            if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                logger.warning("the API keys file %s holds plain keys and other users may read it: chmod 600 it, "
                               "or store key_sha256 instead of key", file)
        except OSError:
            pass
    return table


class KeySettings(Protocol):
    """Where the keys are configured: :class:`agent.config.ServerConfig` is one."""

    api_key: str | None
    api_keys: dict[str, dict[str, Any]]
    api_keys_file: str | None
    admin_token: str | None


class KeyRing:
    """The keys a server accepts; :meth:`authenticate` finds the key a bearer token is, in constant time."""

    def __init__(self, keys: list[APIKey], admin_token: str | None = None) -> None:
        digests = [k.digest for k in keys]
        if len(set(digests)) != len(digests):
            raise ConfigError("two API keys have the same secret: each key must be its own, or its source is ambiguous")
        self.keys = tuple(keys)
        self._admin_token = digest(admin_token) if admin_token else None

    @classmethod
    def load(cls, settings: KeySettings) -> KeyRing:
        """The keys of ``server.api_key``, ``server.api_keys`` and ``server.api_keys_file``, plus the admin token."""
        keys: list[APIKey] = []
        if settings.api_key:
            keys.append(APIKey(unnamed_source(settings.api_key), digest(settings.api_key), ALL_RIGHTS))
        keys += _parse_table(settings.api_keys or {}, "config key 'server.api_keys'")
        if settings.api_keys_file:
            table = read_keys_file(settings.api_keys_file)
            clash = set(table) & set(settings.api_keys or {}) if isinstance(table, dict) else set()
            if clash:
                raise ConfigError(f"API key name(s) {sorted(clash)} are in both server.api_keys and "
                                  f"{settings.api_keys_file}")
            keys += _parse_table(table, f"API keys file {settings.api_keys_file}")
        return cls(keys, settings.admin_token)

    @property
    def configured(self) -> bool:
        """Whether ``/v1/*`` needs a key (any API key is configured; the admin token alone does not count)."""
        return bool(self.keys)

    @property
    def admin_enabled(self) -> bool:
        """Whether anything may open ``/admin/*``: the admin token, or a key with the ``admin`` right."""
        return self._admin_token is not None or any("admin" in k.rights for k in self.keys)

    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def admin_names(self) -> set[str]:
        """The names of keys with the ``admin`` right: the operator's, whose examples are never capped."""
        return {k.name for k in self.keys if "admin" in k.rights}

    def authenticate(self, token: str) -> APIKey | None:
        """The key ``token`` is, or None. Every key's digest is compared (``hmac.compare_digest``), so the
        time taken does not tell which key, or how much of one, matched."""
        presented = digest(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found

    def is_admin_token(self, token: str) -> bool:
        return self._admin_token is not None and hmac.compare_digest(digest(token), self._admin_token)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: str, keys: KeyRing, allow_unauthenticated: bool) -> None:
    """Refuse to serve a non-loopback address without API keys, unless the operator said so explicitly.

    Without keys every client may teach and steer: on loopback that is the operator; on a network it is
    anyone who can reach the port."""
    if keys.configured or allow_unauthenticated or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host} without API keys: anyone who can reach it could teach the model; "
        "give --api-key KEY (or server.api_keys, server.api_keys_file, S2AGENT_API_KEYS), "
        "or --allow-unauthenticated to accept that"
    )
