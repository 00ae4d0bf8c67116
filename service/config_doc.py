"""The configuration reference, `docs/configuration.md`, generated from `service.config.Settings`.

    python -m service.config_doc            write docs/configuration.md
    python -m service.config_doc --check    exit 1 when docs/configuration.md is out of date

Every `Settings` field becomes a row (its `GREAM_*` variable, type, default and description); the
variables read outside `Settings` (training, load tests, compose files) are listed by hand in
`OTHER_VARIABLES`; renamed variables come from `service.config.RENAMED_VARIABLES`. The output depends
only on this module and `service.config`, so it is deterministic and `tests/unit/test_configuration_doc.py`
can compare it with the committed file.
"""

from __future__ import annotations

import argparse
import sys
import types
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.config import RENAMED_VARIABLES, Settings

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE_COMMAND = "python -m service.config_doc"


@dataclass(frozen=True)
class EnvironmentVariable:
    """A `GREAM_*` variable that is not a `Settings` field: who reads it and what it means."""

    name: str
    read_by: str
    meaning: str


OTHER_VARIABLES: tuple[EnvironmentVariable, ...] = (
    EnvironmentVariable("GREAM_CACHE_DIR", "`gream bundle build` (model_store.semantic_ids); the images set it",
                        "folder of the sentence-embedding cache; unset = `~/.cache/gream`"),
    EnvironmentVariable("GREAM_TEACHER_API_KEY", "`gream train --teacher-url`",
                        "bearer key sent to the OpenAI-compatible teacher that writes the reasoning"),
    EnvironmentVariable("GREAM_NO_ACCELERATE", "`gream train`",
                        "any non-empty value trains without accelerate's `Accelerator`, even where it is "
                        "installed"),
    EnvironmentVariable("GREAM_LOAD_HISTORIES", "`make loadtest` (loadtests/locustfile.py)",
                        "histories to replay: JSON Lines with `history` or `item_ids`, or a JSON list of "
                        "lists; unset = the demo data, else ids the server hands out"),
    EnvironmentVariable("GREAM_LOAD_API_KEY", "`make loadtest`", "bearer key sent to /v1"),
    EnvironmentVariable("GREAM_LOAD_K", "`make loadtest`", "items per request (default 10)"),
    EnvironmentVariable("GREAM_LOAD_REASONING_TOKENS", "`make loadtest`",
                        "`max_reasoning_tokens` of streamed requests (default 32)"),
    EnvironmentVariable("GREAM_LOAD_USER_POOL", "`make loadtest`",
                        "distinct user ids for events and cached-history requests (default 1000)"),
    EnvironmentVariable("GREAM_LOAD_SEED", "`make loadtest`", "random seed of the simulated users (default 0)"),
    EnvironmentVariable("GREAM_LOAD_REQUEST_LOG", "`make loadtest`, loadtests/rollout_run.py",
                        "CSV file that gets every request (end time, type, name, ms, error); unset = none"),
    EnvironmentVariable("GREAM_LOAD_MAX_FAILURE_RATIO", "`make loadtest`",
                        "largest failure ratio that passes (default 0.01)"),
    EnvironmentVariable("GREAM_LOAD_P95_MS", "`make loadtest`",
                        "p95 bound of direct recommendations in ms (default 2000; 0 disables)"),
    EnvironmentVariable("GREAM_LOAD_TTFT_P95_MS", "`make loadtest`",
                        "p95 bound of the time to first token in ms (default 3000; 0 disables)"),
    EnvironmentVariable("GREAM_BUNDLE_DIR", "docker-compose.yml",
                        "host folder mounted as the bundle (default `./var/demo-bundle`)"),
    EnvironmentVariable("GREAM_EXTRAS", "docker-compose.yml",
                        "the image's `EXTRAS` build argument, e.g. `vllm` (default none)"),
    EnvironmentVariable("GREAM_TEST_REDIS_URL", "the test suite",
                        "the Redis the tests use (default `redis://127.0.0.1:6379/15`)"),
    EnvironmentVariable("GREAM_CHROMIUM", "the browser tests (tests/e2e)",
                        "a Chromium binary to drive; unset = the system's `chromium`"),
    EnvironmentVariable("GREAM_E2E_BUNDLE", "the browser test of the demo page",
                        "the bundle it serves; unset = a tiny bundle built for the test"),
    EnvironmentVariable("GREAM_E2E_SCREENSHOT", "the browser test of the demo page",
                        "where its screenshot goes (default `var/demo-page.png`; `docs/demo-page.png` is "
                        "made this way)"),
)

# Help texts write `GREAM_X` for "the variable of any setting".
PLACEHOLDER_VARIABLES: tuple[str, ...] = ("GREAM_X",)

_TYPE_NAMES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable pydantic-settings reads for a field (an alias replaces prefix + name)."""
    alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
    if alias:
        return alias.upper()
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def type_text(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(type_text(a) for a in members)
        return f"{text} or unset" if len(members) < len(get_args(annotation)) else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {type_text(item)}s (JSON or comma-separated)"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def constraint_text(field: FieldInfo) -> str:
    """Bounds and patterns from the field's metadata, e.g. `>= 1, <= 65535`."""
    parts: list[str] = []
    for item in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            parts.append(f"matching `{pattern}`")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (list, tuple, set, dict)) and not value:
        return "empty"
    return f"`{value}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_rows() -> list[str]:
    rows = []
    for name, field in Settings.model_fields.items():
        if not field.description:
            raise ValueError(f"Settings.{name} has no description; add description= to its Field")
        kind = type_text(field.annotation)
        bounds = constraint_text(field)
        rows.append(f"| `{env_name(name, field)}` | `{name}` | {cell(kind + (f' ({bounds})' if bounds else ''))} "
                    f"| {cell(default_text(field))} | {cell(field.description)} |")
    return rows


def other_rows() -> list[str]:
    settings_names = {env_name(n, f) for n, f in Settings.model_fields.items()}
    rows = []
    for var in sorted(OTHER_VARIABLES, key=lambda v: v.name):
        if var.name in settings_names:
            raise ValueError(f"{var.name} is a Settings field; remove it from OTHER_VARIABLES")
        rows.append(f"| `{var.name}` | {cell(var.read_by)} | {cell(var.meaning)} |")
    return rows


SETTINGS_INTRO = (
    "`gream serve` (the gateway and its engines) reads one `Settings` object (`service/config.py`). Each "
    "setting comes from, highest precedence first: a `gream serve` flag (`gream serve --help` lists them), "
    "its environment variable, a `.env` file in the working directory, the default below. Every setting has "
    "a default, so `gream serve` runs with none. Booleans take `true`/`false` (also `1`/`0`, `yes`/`no`); "
    "lists take a JSON list or a comma-separated string."
)
OTHERS_INTRO = "Read outside `Settings`: by the training command, the load tests, the compose file and the tests."
RENAMED_INTRO = ("`gream serve` refuses to start while an old name is set, and names the new one; an unknown "
                 "`GREAM_*` variable close to a setting's name is logged as a warning.")


def renamed_rows() -> list[str]:
    return [f"| `{old}` | `{new}` |" for old, new in sorted(RENAMED_VARIABLES.items())]


def render_configuration_markdown() -> str:
    """The whole of docs/configuration.md."""
    placeholders = ", ".join(f"`{name}`" for name in PLACEHOLDER_VARIABLES)
    lines = [
        "# Configuration",
        "",
        f"<!-- Generated by `{REGENERATE_COMMAND}` from service/config.py; do not edit by hand. -->",
        "",
        "## Serving settings",
        "",
        SETTINGS_INTRO,
        "",
        "| variable | setting | type | default | meaning |",
        "| --- | --- | --- | --- | --- |",
        *settings_rows(),
        "",
        "## Other variables",
        "",
        OTHERS_INTRO,
        "",
        "| variable | read by | meaning |",
        "| --- | --- | --- |",
        *other_rows(),
        "",
        (f"Help texts write {placeholders} for the variable of any setting above (for example "
         "`--gateway-env GREAM_X=V` of the engine benchmark)."),
        "",
        "## Renamed variables",
        "",
        RENAMED_INTRO,
        "",
        "| old variable | new variable |",
        "| --- | --- |",
        *renamed_rows(),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.config_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="where the reference goes")
    args = parser.parse_args(argv)
    text = render_configuration_markdown()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date; run `{REGENERATE_COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
