"""The administrator's files for user endpoints, read once and kept as text.

``SiteFiles.from_files`` is the only place in ``mepcore.config`` that reads files: the
template (``user_config_template.yaml.j2``), the other ``*.j2`` files of its folder
(for ``include``/``import``/``extends``), the optional schema
(``user_config_schema.json``) and the optional environment (``user_environment.yaml``).
Every problem is reported with the file and, where there is one, the position. It
renders nothing for a user (rendering takes the texts held here); ``site_warnings``
renders once with no variables, for ``mepd check``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import jinja2
import yaml

from mepcore.config.endpoint import render_endpoint_config
from mepcore.config.keys import IGNORED_KEYS
from mepcore.config.render import MappedIdentity, _FolderLoader
from mepcore.config.variables import canonical_json, schema_validator
from mepcore.config.yamlsafe import YamlLoadError, compose_yaml
from mepcore.errors import MepError, TemplateConfigError, Violation
from mepcore.types import Account

MAX_FILE_BYTES = 1_048_576
MAX_INCLUDES = 100
INCLUDE_SUFFIX = ".j2"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _freeze_texts(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


def _freeze_optional(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else MappingProxyType(dict(value))


def template_digest(template_name: str, template_text: str, includes: Mapping[str, str]) -> str:
    """sha256 (hex) over the template's name and text and every include's."""
    text = canonical_json(
        {"name": template_name, "text": template_text, "includes": dict(includes)}
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@attrs.frozen
class SiteFiles:
    """The template (with its folder's includes), schema and environment, as data."""

    template_name: str
    template_text: str
    includes: Mapping[str, str] = attrs.field(converter=_freeze_texts, factory=dict)
    schema: Mapping[str, Any] | None = attrs.field(converter=_freeze_optional, default=None)
    environment: Mapping[str, str] = attrs.field(converter=_freeze_texts, factory=dict)
    template_digest: str = ""

    @classmethod
    def from_texts(
        cls,
        template_text: str,
        *,
        template_name: str = "user_config_template.yaml.j2",
        includes: Mapping[str, str] | None = None,
        schema: Mapping[str, Any] | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> SiteFiles:
        """Build from texts already in hand (checks the template's syntax and the schema)."""
        includes = dict(includes or {})
        for name, text in {**includes, template_name: template_text}.items():
            check_template_syntax(text, name)
        if schema is not None:
            schema_validator(schema, source="schema")
        return cls(
            template_name=template_name,
            template_text=template_text,
            includes=includes,
            schema=schema,
            environment=dict(environment or {}),
            template_digest=template_digest(template_name, template_text, includes),
        )

    @classmethod
    def from_files(
        cls,
        template_path: str | Path,
        schema_path: str | Path | None = None,
        environment_path: str | Path | None = None,
    ) -> SiteFiles:
        template_path = Path(template_path)
        text = _read_text(template_path, "config.template_invalid")
        includes: dict[str, str] = {}
        try:
            siblings = sorted(template_path.parent.iterdir())
        except OSError as exc:
            raise TemplateConfigError(
                "config.template_invalid", f"{template_path.parent}: {exc.strerror or exc}"
            ) from exc
        for path in siblings:
            if (
                path.name == template_path.name
                or not path.name.endswith(INCLUDE_SUFFIX)
                or not path.is_file()
            ):
                continue
            if len(includes) >= MAX_INCLUDES:
                raise TemplateConfigError(
                    "config.template_invalid",
                    f"{template_path.parent}: more than {MAX_INCLUDES} *{INCLUDE_SUFFIX} files",
                )
            includes[path.name] = _read_text(path, "config.template_invalid")
        for name, body in {**includes, template_path.name: text}.items():
            check_template_syntax(body, name, shown=str(template_path.parent / name))
        schema = load_schema(schema_path) if schema_path is not None else None
        environment = load_environment(environment_path) if environment_path is not None else {}
        return cls(
            template_name=template_path.name,
            template_text=text,
            includes=includes,
            schema=schema,
            environment=environment,
            template_digest=template_digest(template_path.name, text, includes),
        )


def _read_text(path: Path, reason: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TemplateConfigError(reason, f"{path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise TemplateConfigError(reason, f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TemplateConfigError(reason, f"{path}:{line}: not valid UTF-8") from exc


def check_template_syntax(text: str, name: str, *, shown: str | None = None) -> None:
    """Parse (not render) a template; ``config.template_invalid`` naming file and line."""
    env = jinja2.Environment(loader=_FolderLoader({}), autoescape=False)  # noqa: S701 - YAML, not HTML
    try:
        env.parse(text, name=name)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{shown or name}:{exc.lineno}"
        raise TemplateConfigError(
            "config.template_invalid",
            f"{where}: {exc.message}",
            violations=[Violation(where, str(exc.message), "syntax")],
        ) from exc


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read and check a JSON Schema file (``config.schema_invalid`` with line/column)."""
    path = Path(path)
    text = _read_text(path, "config.schema_invalid")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateConfigError(
            "config.schema_invalid",
            f"{path}:{exc.lineno}:{exc.colno}: {exc.msg}",
        ) from exc
    except RecursionError as exc:
        raise TemplateConfigError("config.schema_invalid", f"{path}: nested too deeply") from exc
    if not isinstance(schema, dict):
        raise TemplateConfigError(
            "config.schema_invalid", f"{path}: a schema must be a JSON object"
        )
    try:
        schema_validator(schema, source=str(path))
    except TemplateConfigError as exc:
        raise TemplateConfigError(
            "config.schema_invalid", exc.detail, violations=exc.violations
        ) from exc
    return schema


def load_environment(path: str | Path) -> dict[str, str]:
    """Read ``user_environment.yaml``: a flat mapping of variable names to strings.

    Numbers become their text; booleans, null, lists and mappings are refused (say
    ``"true"`` if the text is meant). Errors name the file, line and column.
    """
    path = Path(path)
    text = _read_text(path, "config.environment_invalid")

    def fail(message: str, node: yaml.Node | None = None) -> TemplateConfigError:
        where = str(path)
        if node is not None:
            where += f":{node.start_mark.line + 1}:{node.start_mark.column + 1}"
        return TemplateConfigError("config.environment_invalid", f"{where}: {message}")

    try:
        root = compose_yaml(text)
    except YamlLoadError as exc:
        raise TemplateConfigError(
            "config.environment_invalid", f"{path}:{exc.line}:{exc.column}: {exc.message}"
        ) from exc
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise fail("must be a mapping of variable names to values", root)
    result: dict[str, str] = {}
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode) or not _ENV_NAME.fullmatch(key_node.value):
            raise fail("names must match [A-Za-z_][A-Za-z0-9_]*", key_node)
        name = key_node.value
        if name in result:
            raise fail(f"duplicate name {name!r}", key_node)
        if not isinstance(value_node, yaml.ScalarNode):
            raise fail(f"{name}: the value must be a string or a number", value_node)
        tag = value_node.tag.rsplit(":", 1)[-1]
        if tag in {"bool", "null"}:
            raise fail(f"{name}: {value_node.value!r} reads as {tag}; quote it", value_node)
        if tag not in {"str", "int", "float"}:
            raise fail(f"{name}: unsupported value type {tag}", value_node)
        if "\x00" in value_node.value:
            raise fail(f"{name}: the value contains a NUL character", value_node)
        result[name] = value_node.value
    return result


_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[ \t]*:", re.MULTILINE)


def site_warnings(files: SiteFiles, account: Account) -> list[Violation]:
    """What ``mepd check`` reports about a template without refusing it: the keys it
    sets that mep accepts and ignores (Globus Compute keys mep cannot honour).

    Two looks, both cheap: a trial render with no variables for ``account`` (a template
    that needs variables simply gives nothing here), and the top-level keys written at
    the start of a line of any of its files (so a key set only for some users is seen)."""
    found: dict[str, Violation] = {}
    try:
        config = render_endpoint_config(
            files.template_text,
            {},
            mapped=MappedIdentity(account),
            includes=files.includes,
            template_name=files.template_name,
            environment=files.environment,
        )
    except MepError:
        pass
    else:
        found.update((w.path, w) for w in config.warnings)
    for text in (files.template_text, *files.includes.values()):
        for key in _TOP_LEVEL_KEY.findall(text):
            if key in IGNORED_KEYS and f"$.{key}" not in found:
                found[f"$.{key}"] = Violation(
                    f"$.{key}", f"accepted and ignored: {IGNORED_KEYS[key]}", "ignored_key"
                )
    return sorted(found.values(), key=lambda v: v.path)
