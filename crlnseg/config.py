"""Resolve a run's settings: defaults < preset < ``--config`` file < CLI options < ``--set``.

Every layer is a nested dict of overrides (``{"train": {"patch": [16, 16, 16]}}``) merged into the
previous one; the result is validated once by :class:`~crlnseg.settings.RunSettings`. Validation
errors become a one-line :class:`~crlnseg.errors.ConfigError` naming the field and, where pydantic
knows them, the allowed values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from crlnseg.errors import ConfigError
from crlnseg.settings import PRESETS, RunSettings

__all__ = ["resolve_settings", "load_config_file", "parse_set", "deep_merge", "validation_message",
           "settings_from_dict", "saved_run_settings"]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``override`` merged into ``base``, recursing into nested dicts."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON settings file (JSON is YAML, but its errors read better as JSON)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a folder, not a settings file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: settings file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); expected a YAML "
                          "or JSON settings file") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read ({err.strerror})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ConfigError(f"--config {path}: not valid {kind}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, "
                          f"got {type(data).__name__}")
    return data


def _known_keys(model: type[BaseModel], dotted: list[str]) -> list[str]:
    """Field names at the level where ``dotted`` stops matching (for error messages)."""
    for part in dotted:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if field is None or not nested:
            break
        model = annotation
    return sorted(model.model_fields)


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["train.patch=[16,16,16]", "method.xi=0.9"]`` -> nested overrides.

    Values are parsed as YAML (numbers, booleans, lists, ``null``); a bare comma-separated value
    such as ``16,16,16`` becomes a list.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, "
                              "e.g. train.iterations=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            if raw.strip()[:1] in "[{\"'" or "," not in raw:
                raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                                  f"({_first_line(err)})") from None
            value = raw
        if isinstance(value, str) and "," in value:
            value = [_parse_piece(item, v) for v in value.split(",")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _first_line(err: Exception) -> str:
    problem = getattr(err, "problem", None)  # yaml's own words ("expected ',' or ']', ...")
    if problem:
        return str(problem)
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _parse_piece(item: str, piece: str) -> Any:
    """One element of a bare comma-separated ``--set`` value, parsed as YAML."""
    import yaml

    try:
        return yaml.safe_load(piece)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: element {piece!r} is not valid YAML "
                          f"({_first_line(err)})") from None


def validation_message(err: ValidationError, source: str = "settings") -> str:
    """One line for the first error: the dotted field, what arrived and what is allowed."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    kind, msg = first["type"], first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        known = ", ".join(_known_keys(RunSettings, [str(p) for p in first["loc"][:-1]]))
        return f"{source}: unknown setting '{field}' (known: {known})"
    if not field:  # a check across sections names its fields itself
        return f"{source}: {msg}"
    return f"{source}: {field} = {first.get('input')!r}: {msg}"


def settings_from_dict(data: Mapping[str, Any], source: str = "settings") -> RunSettings:
    """Validate a nested dict into :class:`RunSettings` or raise a one-line ConfigError."""
    try:
        return RunSettings.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(validation_message(err, source)) from None


def resolve_settings(preset: str | None = None, config: Path | None = None,
                     options: Mapping[str, Any] | None = None,
                     overrides: Iterable[str] = (),
                     base: Mapping[str, Any] | None = None) -> RunSettings:
    """Merge the layers in order of precedence and validate the result.

    ``base`` replaces the package defaults as the lowest layer (a resumed run's saved settings).

    ``options`` are the CLI's explicit options as nested overrides (``None`` values are dropped, so
    an option left at its default never hides a config file); ``overrides`` are ``--set`` strings.
    """
    layers: list[dict[str, Any]] = [dict(base or {})]
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (allowed: {', '.join(PRESETS)})")
        layers.append(PRESETS[preset])
    if config is not None:
        layers.append(load_config_file(config))
    layers.append(_drop_none(options or {}))
    layers.append(parse_set(overrides))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return settings_from_dict(merged)


def _drop_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = _drop_none(value)
            if sub:
                out[key] = sub
        elif value is not None:
            out[key] = value
    return out


def saved_run_settings(run_dir: Path) -> dict[str, Any] | None:
    """A run's saved ``settings.json`` (the base layer of ``--resume``), or None."""
    path = Path(run_dir) / "settings.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{path}: unreadable run settings") from None
