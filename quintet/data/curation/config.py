"""A curation run, described by one TOML or YAML file.

    languages = ["en", "fi", "hi", "ja", "vi"]   # targets (ISO 639-1); code is kept when `code = true`
    code = true

    [output]                 # format "jsonl" or "parquet"; compression "none", "gzip" or "zstd"
    format = "jsonl"
    write_dropped = true     # dropped documents go to <out>/dropped/<step>/, with their reason

    [executor]               # kind "local" (default), "slurm" or "ray"; other keys go to datatrove's executor
    kind = "local"
    tasks = 2
    workers = 2

    [[inputs]]               # type "jsonl", "parquet", "text" (a folder of .txt files) or "code"
    name = "web"
    type = "jsonl"
    path = "web"             # relative to the data root (default: the config file's folder)
    on_error = "raise"       # or "skip": count and report bad lines instead of stopping

    [[steps]]                # in order; type "numbers", "language", "quality", "toxicity", "pii", "dedup"
    type = "language"
    threshold = 0.5

Every error names the file, the line and the setting, and says what would be valid.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quintet.config import ConfigFile, read_config
from quintet.data.curation.dedup import DedupSettings
from quintet.data.curation.language import TARGET_LANGUAGES, LanguageFilter, lingua_language_codes
from quintet.data.curation.numbers import NumberHeavyFilter
from quintet.data.curation.pii import PIIRedactor
from quintet.data.curation.quality import QualityFilter
from quintet.data.curation.readers import CODE_EXTENSIONS, ON_ERROR_CHOICES
from quintet.data.curation.toxicity import ToxicityFilter

STEP_TYPES: dict[str, type] = {
    "numbers": NumberHeavyFilter,
    "language": LanguageFilter,
    "quality": QualityFilter,
    "toxicity": ToxicityFilter,
    "pii": PIIRedactor,
    "dedup": DedupSettings,
}
INPUT_TYPES = {"jsonl": "**/*.jsonl", "parquet": "**/*.parquet", "text": "**/*.txt", "code": None}
OUTPUT_FORMATS = ("jsonl", "parquet")
COMPRESSIONS = ("none", "gzip", "zstd")
EXECUTORS = ("local", "slurm", "ray")
_TOP_KEYS = ("languages", "code", "inputs", "steps", "output", "executor")
_INPUT_KEYS = ("name", "type", "path", "glob", "on_error", "lang", "extensions")
_INPUT_TYPES = {key: str for key in _INPUT_KEYS} | {"extensions": list[str]}
_OUTPUT_KEYS = ("format", "compression", "write_dropped")
_STEP_COMMON = ("type", "name")
_INJECTED = ("self", "exclusion_writer", "languages", "name")  # set by the pipeline, not the file


@dataclass
class InputConfig:
    name: str
    type: str
    path: Path
    glob: list[str]
    on_error: str = "raise"
    lang: str | None = None


@dataclass
class StepConfig:
    type: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputConfig:
    format: str = "jsonl"
    compression: str = "none"
    write_dropped: bool = True


@dataclass
class ExecutorConfig:
    kind: str = "local"
    tasks: int = 1
    workers: int | None = None  # local: 1 unless given; Slurm/Ray: datatrove's default (no limit)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurationConfig:
    languages: list[str]
    inputs: list[InputConfig]
    steps: list[StepConfig]
    code: bool = True
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    source: Path | None = None  # the file it was read from

    @property
    def filter_steps(self) -> list[StepConfig]:
        return [s for s in self.steps if s.type != "dedup"]

    @property
    def dedup(self) -> DedupSettings | None:
        found = [s for s in self.steps if s.type == "dedup"]
        return DedupSettings(**found[0].options) if found else None

    def fingerprint(self) -> str:
        """A hash of everything that decides the output (not the executor): a rerun must match it."""
        data = asdict(self)
        data.pop("executor")
        data.pop("source")
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(path: str | Path, data_root: str | Path | None = None) -> CurationConfig:
    """Read and validate a curation config; input paths are relative to `data_root` (default: its folder)."""
    config = read_config(path, "curation config")
    path = Path(path)
    return config_from_dict(
        config.data, source=path, data_root=Path(data_root) if data_root else path.parent, config=config
    )


def _step_parameters(step_type: str) -> list[str]:
    cls = STEP_TYPES[step_type]
    if step_type == "dedup":
        return DedupSettings.names()
    return [p for p in inspect.signature(cls.__init__).parameters if p not in _INJECTED]


def config_from_dict(
    data: dict[str, Any],
    source: Path | None = None,
    data_root: Path | None = None,
    config: ConfigFile | None = None,
) -> CurationConfig:
    """Validate `data` (a parsed config file) into a CurationConfig."""
    loc = config or ConfigFile(data, source)
    root = data_root or (source.parent if source else Path.cwd())
    loc.check_keys(data, _TOP_KEYS, "top level")

    languages = data.get("languages", list(TARGET_LANGUAGES))
    if not isinstance(languages, list) or not languages:
        raise loc.error("languages: expected a non-empty list of ISO 639-1 codes", key="languages")
    valid_codes = lingua_language_codes()
    for code in languages:
        if code not in valid_codes:
            raise loc.error(
                f"languages: unknown language code {code!r}; valid ISO 639-1 codes: {', '.join(valid_codes)}",
                key="languages",
                value=f'"{code}"',
            )
    code = data.get("code", True)
    if not isinstance(code, bool):
        raise loc.error(f"code = {code!r}: expected true or false", key="code")

    inputs = _inputs(loc, data.get("inputs"), root)
    steps = _steps(loc, data.get("steps"), languages, root)
    output = _output(loc, data.get("output", {}))
    executor = _executor(loc, data.get("executor", {}))
    return CurationConfig(languages, inputs, steps, code, output, executor, source)


def _inputs(loc: ConfigFile, raw: Any, root: Path) -> list[InputConfig]:
    if not isinstance(raw, list) or not raw:
        raise loc.error("inputs: expected at least one [[inputs]] table (type and path)", key="inputs")
    inputs, names = [], set()
    for i, item in enumerate(raw):
        where = {"section": "inputs", "index": i}
        if not isinstance(item, dict):
            raise loc.error(f"inputs[{i}]: expected a table with type and path", **where)
        loc.check_keys(item, _INPUT_KEYS, f"inputs[{i}]", **where)
        loc.check_types(item, _INPUT_TYPES, f"inputs[{i}]", **where)
        kind = item.get("type")
        if kind not in INPUT_TYPES:
            raise loc.error(
                f"inputs[{i}].type = {kind!r}: valid are {', '.join(INPUT_TYPES)}",
                key="type",
                value=kind,
                **where,
            )
        if "path" not in item:
            raise loc.error(f"inputs[{i}]: missing path (a folder)", **where)
        name = str(item.get("name", kind))
        if name in names:
            raise loc.error(
                f"inputs[{i}].name = {name!r}: used twice; names must be unique", key="name", **where
            )
        names.add(name)
        on_error = item.get("on_error", "raise")
        if on_error not in ON_ERROR_CHOICES:
            raise loc.error(
                f"inputs[{i}].on_error = {on_error!r}: valid are {', '.join(ON_ERROR_CHOICES)}",
                key="on_error",
                **where,
            )
        if kind == "code":
            exts = item.get("extensions", sorted(CODE_EXTENSIONS))
            unknown = [e for e in exts if not str(e).startswith(".")]
            if unknown:
                raise loc.error(
                    f"inputs[{i}].extensions: {unknown} must start with '.'", key="extensions", **where
                )
            glob = [f"**/*{e}" for e in exts]
        else:
            glob = [item["glob"]] if "glob" in item else [INPUT_TYPES[kind]]
        lang = "code" if kind == "code" else item.get("lang")
        path = Path(item["path"])
        inputs.append(
            InputConfig(name, kind, path if path.is_absolute() else root / path, glob, on_error, lang)
        )
    return inputs


def _steps(loc: ConfigFile, raw: Any, languages: list[str], root: Path) -> list[StepConfig]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise loc.error("steps: expected a list of [[steps]] tables", key="steps")
    steps, names = [], set()
    for i, item in enumerate(raw):
        where = {"section": "steps", "index": i}
        if not isinstance(item, dict) or "type" not in item:
            raise loc.error(f"steps[{i}]: expected a table with a type", **where)
        kind = item["type"]
        if kind not in STEP_TYPES:
            raise loc.error(
                f"steps[{i}].type = {kind!r}: unknown step; valid steps: {', '.join(STEP_TYPES)}",
                key="type",
                value=kind,
                **where,
            )
        if kind == "dedup" and i != len(raw) - 1:
            raise loc.error(f"steps[{i}]: dedup must be the last step (it runs as separate stages)", **where)
        options = {k: v for k, v in item.items() if k not in _STEP_COMMON}
        loc.check_keys(options, _step_parameters(kind), f"steps[{i}] ({kind})", **where)
        loc.check_types(options, STEP_TYPES[kind], f"steps[{i}] ({kind})", **where)
        if kind == "toxicity" and "lists" in options:
            options["lists"] = {
                lang: str(p if Path(p).is_absolute() else root / p) for lang, p in options["lists"].items()
            }
        name = str(item.get("name", kind))
        if name in names:
            raise loc.error(f"steps[{i}].name = {name!r}: used twice; give one a name = ...", **where)
        names.add(name)
        step = StepConfig(kind, name, options)
        try:
            build_step(step, languages)  # validates the values
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise loc.error(f"steps[{i}] ({kind}): {err}", **where) from None
        steps.append(step)
    return steps


def build_step(step: StepConfig, languages: list[str], exclusion_writer: Any = None) -> Any:
    """The datatrove step (or, for dedup, the settings) a StepConfig describes."""
    cls = STEP_TYPES[step.type]
    kwargs = dict(step.options)
    if step.type == "dedup":
        return DedupSettings(**kwargs)
    params = inspect.signature(cls.__init__).parameters
    if "languages" in params:
        kwargs["languages"] = list(languages)
    if "exclusion_writer" in params:
        kwargs["exclusion_writer"] = exclusion_writer
    return cls(name=step.name, **kwargs)


def _output(loc: ConfigFile, raw: Any) -> OutputConfig:
    if not isinstance(raw, dict):
        raise loc.error("output: expected a table", key="output")
    loc.check_keys(raw, _OUTPUT_KEYS, "output", section="output")
    out = OutputConfig(**raw)
    if out.format not in OUTPUT_FORMATS:
        raise loc.error(
            f"output.format = {out.format!r}: valid are {', '.join(OUTPUT_FORMATS)}", key="format"
        )
    if out.compression not in COMPRESSIONS:
        raise loc.error(
            f"output.compression = {out.compression!r}: valid are {', '.join(COMPRESSIONS)}",
            key="compression",
        )
    if not isinstance(out.write_dropped, bool):
        raise loc.error(
            f"output.write_dropped = {out.write_dropped!r}: expected true or false", key="write_dropped"
        )
    return out


def _executor(loc: ConfigFile, raw: Any) -> ExecutorConfig:
    if not isinstance(raw, dict):
        raise loc.error("executor: expected a table", key="executor")
    raw = dict(raw)
    kind = raw.pop("kind", "local")
    if kind not in EXECUTORS:
        raise loc.error(f"executor.kind = {kind!r}: valid are {', '.join(EXECUTORS)}", key="kind", value=kind)
    tasks, workers = raw.pop("tasks", 1), raw.pop("workers", None)
    for key, value in (("tasks", tasks), ("workers", workers)):
        if key == "workers" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise loc.error(f"executor.{key} = {value!r}: expected a positive integer", key=key)
    return ExecutorConfig(kind, tasks, workers, raw)
