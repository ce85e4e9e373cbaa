"""Secrets come from environment variables or files named in config, never from config itself."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_cost_exporter.validation import Problems, resolve_path

MIN_TOKEN_LENGTH = 16


def read_secret(obj: Mapping[str, Any], prefix: str, path: str, base_dir: Path,
                env: Mapping[str, str], p: Problems) -> str | None:
    """One secret from `<prefix>_env` or `<prefix>_file`; an inline `<prefix>` is refused."""
    if prefix in obj:
        p.add(f"{path}.{prefix}", f"inline secrets are not allowed: use {prefix}_env or "
                                  f"{prefix}_file")
    name, file = obj.get(f"{prefix}_env"), obj.get(f"{prefix}_file")
    if name:
        if name not in env or not env[name].strip():
            p.add(f"{path}.{prefix}_env", f"environment variable {name} is not set")
            return None
        return env[name].strip()
    if file:
        secret_path = resolve_path(file, base_dir)
        try:
            value = secret_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            p.add(f"{path}.{prefix}_file", f"cannot read {secret_path}: {exc.strerror}")
            return None
        if not value:
            p.add(f"{path}.{prefix}_file", f"{secret_path} is empty")
        return value or None
    return None


def read_tokens(obj: Mapping[str, Any], path: str, base_dir: Path, env: Mapping[str, str],
                p: Problems) -> tuple[str, ...]:
    """Bearer tokens from `tokens_env` (comma/space separated) and/or `tokens_file` (one per
    line, # comments); an inline `tokens` list is refused."""
    if "tokens" in obj:
        p.add(f"{path}.tokens", "inline tokens are not allowed: use tokens_env or tokens_file")
    raw: list[str] = []
    env_name = obj.get("tokens_env")
    if env_name:
        if env_name not in env:
            p.add(f"{path}.tokens_env", f"environment variable {env_name} is not set")
        else:
            raw += env[env_name].replace(",", " ").split()
    if obj.get("tokens_file"):
        token_path = resolve_path(obj["tokens_file"], base_dir)
        try:
            lines = token_path.read_text(encoding="utf-8").splitlines()
            raw += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        except OSError as exc:
            p.add(f"{path}.tokens_file", f"cannot read {token_path}: {exc.strerror}")
    if (env_name or obj.get("tokens_file")) and not raw:
        p.add(path, "tokens_env/tokens_file is set but holds no token")
    for i, token in enumerate(raw):
        if len(token) < MIN_TOKEN_LENGTH:
            # Say which one by position only: the token itself is a secret.
            p.add(f"{path}.tokens", f"token #{i + 1} is shorter than {MIN_TOKEN_LENGTH} "
                                    "characters")
    return tuple(raw)


def read_basic_users(obj: Mapping[str, Any], path: str, base_dir: Path,
                     p: Problems) -> dict[str, str]:
    """`basic_auth_file`: one `user:password` per line."""
    file = obj.get("basic_auth_file")
    if not file:
        return {}
    users: dict[str, str] = {}
    file_path = resolve_path(file, base_dir)
    try:
        lines = file_path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        p.add(f"{path}.basic_auth_file", f"cannot read {file_path}: {exc.strerror}")
        return {}
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, password = line.strip().partition(":")
        if not sep or not user or len(password) < 8:
            p.add(f"{path}.basic_auth_file", f"line {n}: must be user:password "
                                             "(password of 8+ characters)")
            continue
        users[user] = password
    return users
