"""The one reader of configuration files: TOML, YAML and JSON, every error as `file:line: message`.

    config = read_config("train.toml", what="training config")
    optim = config.section("optim", OptimSection)       # unknown keys and wrong types are errors
    config.check_keys(config.data, ("model", "data"), "top level")

Every stage's config (training, vision training, alignment, curation) and every model folder's
config.json is read here, and every problem raises `quintet.errors.ConfigError` naming the file and the
line of the setting, the value, and what would be valid (an unknown key is answered with the closest valid
one). Values are type-checked against the dataclass fields they fill when the file is read, so a
`lr = "x"` stops at the file, not deep inside a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from quintet.errors import ConfigError

FORMATS = (".toml", ".yaml", ".yml", ".json")


def suggest(key: str, valid: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the valid name closest to `key`, or nothing."""
    close = difflib.get_close_matches(str(key), sorted(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ConfigFile:
    """A parsed configuration file: `data` (its top-level mapping), and errors pointing at its lines."""

    def __init__(self, data: dict[str, Any], path: str | Path | None = None, text: str = ""):
        self.data, self.path, self.lines = data, Path(path) if path else None, text.splitlines()

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "<config>"

    # ------------------------------------------------------------------ locating settings
    def line(
        self, section: str | None = None, index: int = 0, key: str | None = None, value: Any = None
    ) -> int:
        """1-based line of a setting: `key` (and `value`) within `[section]` / `[[section]]` number
        `index` (or the YAML mapping / list item); the section's first line when the key is not found."""
        start = self._section_start(section, index) if section else 0
        needles = []
        if key is not None and value is not None:
            needles.append(re.compile(rf"\b{re.escape(str(key))}\b.*{re.escape(str(value))}"))
        if value is not None:
            needles.append(re.compile(re.escape(str(value))))
        if key is not None:
            needles.append(re.compile(rf"(^|[\s\[{{.,\"-]){re.escape(str(key))}\"?\s*[=:]"))
            needles.append(re.compile(rf"^\s*\[\[?{re.escape(str(key))}\]\]?\s*$"))
        for needle in needles:
            for i in range(start, len(self.lines)):
                if needle.search(self.lines[i]):
                    return i + 1
        return start + 1

    def _section_start(self, section: str, index: int) -> int:
        array = [i for i, ln in enumerate(self.lines) if re.match(rf"\s*\[\[{re.escape(section)}\]\]", ln)]
        headers = array or self._yaml_items(section)
        if not headers:
            headers = [
                i
                for i, ln in enumerate(self.lines)
                if re.match(rf"\s*(\[{re.escape(section)}\]|\"?{re.escape(section)}\"?\s*:)", ln)
            ]
        if not headers:
            return 0
        return headers[min(index, len(headers) - 1)]

    def _yaml_items(self, section: str) -> list[int]:
        items, inside = [], False
        for i, ln in enumerate(self.lines):
            if re.match(rf"{re.escape(section)}\s*:\s*$", ln):
                inside = True
                continue
            if inside:
                if ln.strip() and not ln.startswith((" ", "-")):
                    break
                if re.match(r"\s*-\s", ln) and (len(ln) - len(ln.lstrip())) <= 2:
                    items.append(i)
        return items

    def error(self, message: str, **where: Any) -> ConfigError:
        """A ConfigError `file:line: message`, the line found from `where` (see `line`)."""
        if not self.lines:
            return ConfigError(f"{self.name}: {message}")
        return ConfigError(f"{self.name}:{self.line(**where)}: {message}")

    # ------------------------------------------------------------------ checking
    def check_keys(self, found: Mapping, valid: Iterable[str], what: str, **where: Any) -> None:
        """Every key of `found` is one of `valid`; else an error naming it, the closest valid key and all
        of them."""
        valid = list(valid)
        for key in found:
            if key not in valid:
                raise self.error(
                    f"{what}: unknown setting {key!r}; valid: {', '.join(valid)}{suggest(key, valid)}",
                    key=key,
                    **where,
                )

    def check_sections(self, valid: Iterable[str]) -> None:
        """The file's top-level keys are all among `valid` sections."""
        valid = list(valid)
        unknown = sorted(set(self.data) - set(valid))
        if unknown:
            raise self.error(
                f"unknown section(s) {unknown}; valid: {sorted(valid)}{suggest(unknown[0], valid)}",
                key=unknown[0],
            )

    def check_types(self, values: Mapping, target: Any, label: str, **where: Any) -> None:
        """Every value of `values` fits the annotation of the setting it fills in `target` (a dataclass, a
        class whose `__init__` is annotated, a function, or a mapping of names to types); else an error at
        its line naming the setting, the value and the expected type. Unannotated ones are not checked."""
        for key, value in values.items():
            expected = annotations(target).get(key)
            if expected is not None and not type_matches(value, expected):
                raise self.error(
                    f"{label}.{key} = {value!r}: expected {type_name(expected)}", key=key, **where
                )

    def require(self, table: Mapping, key: str, what: str, meaning: str, **where: Any) -> Any:
        if key not in table:
            raise self.error(f"{what}.{key} is missing: {meaning}", **where)
        return table[key]

    def section(
        self,
        name: str,
        cls: type,
        values: Mapping | None = None,
        label: str | None = None,
        **where: Any,
    ) -> Any:
        """The dataclass `cls` filled from the table `name` of the file (or from `values`): unknown keys
        and values of the wrong type are errors at their line; `cls`'s own validation errors (ValueError or
        TypeError from `__post_init__`) get the file and line too. `label` names the table in messages
        (default `[name]`)."""
        label = label or f"[{name}]"
        values = self.data.get(name, {}) if values is None else values
        where = where or ({"section": name} if name else {})
        if not isinstance(values, Mapping):
            raise self.error(f"{label}: expected a table of settings, got {type(values).__name__}", **where)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        self.check_keys(values, fields, label, **where)
        self.check_types(values, cls, label, **where)
        try:
            return cls(**values)
        except (ValueError, TypeError) as err:
            message = str(err)
            if self.path and message.startswith(f"{self.path}"):
                raise ConfigError(message) from None
            key = next((k for k in values if re.search(rf"\b{re.escape(k)}\b", message)), None)
            raise self.error(message, key=key, **where) from None


# ---------------------------------------------------------------------------------------- type checks
def annotations(target: Any) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields, a class's `__init__` or a function's parameters
    (empty where they cannot be resolved, e.g. a forward reference to a name never imported)."""
    if isinstance(target, Mapping):  # the annotations themselves
        return dict(target)
    plain_class = isinstance(target, type) and not dataclasses.is_dataclass(target)
    hints_of = target.__init__ if plain_class else target
    try:
        hints = typing.get_type_hints(hints_of)
    except (NameError, TypeError, AttributeError):
        return {}
    hints.pop("return", None)
    return hints


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a value parsed from TOML/YAML/JSON fits a dataclass field's annotation (ints are floats;
    strings are paths; lists are tuples)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str or annotation is Path:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:
            return len(value) == len(args) and all(
                type_matches(v, a) for v, a in zip(value, args, strict=True)
            )
        return not args or all(type_matches(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            return False
        args = typing.get_args(annotation)
        return not args or all(type_matches(v, args[1]) for v in value.values())
    if isinstance(annotation, type):
        return isinstance(value, (annotation, Mapping))  # nested sections
    return True


def type_name(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        optional = type(None) in typing.get_args(annotation)
        return " or ".join(parts) + (" (or leave it out)" if optional else "")
    if origin in (list, tuple) or annotation in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or annotation is dict:
        return "a table"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


# ---------------------------------------------------------------------------------------- reading
def parse_config_text(text: str, path: Path) -> dict[str, Any]:
    """The top-level mapping of a TOML / YAML / JSON text, chosen by `path`'s suffix."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
            ) from None
    else:
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use {', '.join(FORMATS)}")
    if not isinstance(data, dict):
        kind = "a JSON object" if suffix == ".json" else "a mapping of settings"
        raise ConfigError(f"{path}:1: expected {kind}, got {type(data).__name__}")
    return data


def read_config(path: str | Path, what: str = "config") -> ConfigFile:
    """Read and parse a config file (TOML, YAML or JSON by its suffix). A missing file raises
    FileNotFoundError naming `what`; text that is not UTF-8 or does not parse raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    return ConfigFile(parse_config_text(text, path), path, text)
