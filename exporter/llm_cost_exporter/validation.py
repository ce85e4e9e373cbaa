"""Collect every config problem with its path, so a user fixes them all in one go."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Problems:
    """A list of `path: message` strings plus small typed readers that append to it."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, "must be a mapping")
            return {}
        return value

    def unknown_keys(self, obj: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in obj:
            if key not in allowed:
                self.add(f"{path}.{key}" if path else str(key),
                         f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def string(self, obj: Mapping[str, Any], key: str, path: str, default: str | None = None,
               required: bool = False) -> str | None:
        value = obj.get(key, default)
        if value is None:
            if required:
                self.add(f"{path}.{key}", "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(f"{path}.{key}", "must be a non-empty string")
            return None
        return value

    def decimal(self, obj: Mapping[str, Any], key: str, path: str, *, positive: bool = False,
                required: bool = False) -> Decimal | None:
        value = obj.get(key)
        if value is None:
            if required:
                self.add(f"{path}.{key}", "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            self.add(f"{path}.{key}", "must be a number")
            return None
        try:
            # str() first: a YAML float 0.1 becomes Decimal('0.1'), not its binary expansion.
            number = Decimal(str(value))
        except InvalidOperation:
            self.add(f"{path}.{key}", "must be a number")
            return None
        if not number.is_finite():
            self.add(f"{path}.{key}", "must be a finite number")
            return None
        if positive and number <= 0:
            self.add(f"{path}.{key}", "must be > 0")
            return None
        if number < 0:
            self.add(f"{path}.{key}", "must be >= 0")
            return None
        return number

    def integer(self, obj: Mapping[str, Any], key: str, path: str, default: int,
                minimum: int = 0, maximum: int | None = None) -> int:
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(f"{path}.{key}", "must be an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            self.add(f"{path}.{key}", f"must be >= {minimum}{upper}")
            return default
        return value


def resolve_path(value: Any, base_dir: Path) -> Path:
    """Relative paths in config files are relative to the file that names them."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base_dir / path
