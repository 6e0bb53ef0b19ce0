"""Rendering an administrator's template with a user's variables, safely.

Rendering follows Globus Compute multi-user endpoints so existing templates work: every
string the renderer supplies (user variables, the client's runtime report, identity
fields, account data) is JSON-quoted before the template sees it, so ``{{ name }}``
produces a double-quoted YAML scalar that no newline, quote or colon can break out of.
Lists and objects render as their JSON text and still iterate and index; ``None``,
booleans and floats render in their YAML/JSON forms (``null``, ``true``, ``1.0e+20``).

The context is the reference's (GC-COMPAT.md §3.3, §4): the user's variables, and
``_GC`` with ``mapped_identity`` (the reference's ``local.uname/uid/gid/groups/gecos/
shell/dir`` and ``globus.id`` beside mep's own ``local.name/home/group_ids/group_names``,
``id`` and ``identity``), ``user_runtime``, ``parent_config`` (what the daemon hands in:
a non-secret subset of the endpoint's settings) and ``env`` (the user endpoint's
environment); ``mapped_identity``, ``user_runtime`` and ``parent_config`` also at the top
level (the reference's deprecated names). The reference gives the values of
``mapped_identity``, ``parent_config`` and ``env`` to templates as they are, not quoted;
so that ``{{ _GC.mapped_identity.local.dir }}/scratch`` works as there, the
reference-named strings of those three render as they are when they are plain YAML text
(letters, digits and ``_ . / + = @ % ( ) ~ : -``, single spaces) and JSON-quoted otherwise,
so no value can change the YAML's structure. ``shell_escape`` is the reference's filter.

The template runs in an immutable Jinja2 sandbox with ``StrictUndefined``, autoescape
off, and with its work bounded (``RenderLimits``): ``range``, loop iterations, calls,
repetition, concatenation, ``**``, ``%``/``format`` widths, filter arguments and the
output size. ``include``/``import``/``extends`` resolve only among the files handed in
(the template's own folder). This module deliberately reads no files and no
environment and keeps no state between calls: the caller passes text, every call
builds its own environment.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import string
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import attrs
import jinja2
import jinja2.exceptions
import jinja2.nodes as jnodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from mepcore.config.keys import DEFAULT_TEMPLATE_NAME as DEFAULT_TEMPLATE_NAME
from mepcore.config.limits import RenderLimits, VariableLimits
from mepcore.config.variables import RESERVED_NAMES, structural_violations
from mepcore.errors import ConfigError, MepError, TemplateConfigError, Violation
from mepcore.types import Account, Identity

# File names a template may include: one plain name inside its own folder.
_INCLUDE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
# printf-style conversion specs: flags, width, precision.
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


class RenderLimitExceeded(jinja2.exceptions.SecurityError):
    """A template tried to do more work than ``RenderLimits`` allows."""


# --- how values look to a template ------------------------------------------------


class QuotedStr(str):
    """A supplied string as the template sees it: the text is its JSON form.

    ``{{ v }}`` therefore prints ``"gpu"`` (quotes included) and comparisons must use
    the quoted form (``v == '"gpu"'``), exactly as in Globus Compute. The original
    text is kept where the sandbox cannot reach it (underscore attribute), for
    ``shell_escape``.
    """

    _mep_raw: str


class PlainStr(str):
    """A supplied string shown as it is (it has only characters that cannot change the
    YAML's structure; see the module docstring)."""


class JsonList(list[Any]):
    """A supplied list: items are wrapped values; ``str()`` is the JSON text."""

    _mep_json: str

    def __str__(self) -> str:
        return self._mep_json


class JsonDict(dict[str, Any]):
    """A supplied object: values are wrapped; ``str()`` is the JSON text."""

    _mep_json: str

    def __str__(self) -> str:
        return self._mep_json


# Characters json.dumps(ensure_ascii=False) leaves as they are but YAML does not read
# back as themselves inside a double-quoted scalar: DEL and C1 controls (not printable),
# NEL and the Unicode line/paragraph separators (line breaks, which YAML folds), the
# byte-order mark, non-characters and lone surrogates.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def _json_string(raw: str) -> str:
    # Not ensure_ascii=True: it writes characters beyond the BMP as surrogate-pair
    # escapes, which PyYAML reads back as two lone surrogates.
    text = json.dumps(raw, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_text(value: Any) -> str:
    """JSON text that YAML also reads back as the same value (floats as ``1.0e-05``:
    PyYAML takes ``1e-05`` for a string). Depth is bounded by the variable limits."""
    if isinstance(value, str):
        return _json_string(value)
    if value is None or isinstance(value, bool):
        return _finalize(value)  # type: ignore[no-any-return]
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(f"{_json_string(str(k))}: {_json_text(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_json_text(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def quote_string(raw: str) -> QuotedStr:
    quoted = QuotedStr(_json_text(raw))
    quoted._mep_raw = raw
    return quoted


def wrap_value(value: Any) -> Any:
    """Turn plain JSON-like data into what a template sees (see module docstring).

    Input must already have passed ``structural_violations`` (bounded depth)."""
    if isinstance(value, str):
        return quote_string(value)
    if isinstance(value, Mapping):
        wrapped_dict = JsonDict((k, wrap_value(v)) for k, v in value.items())
        wrapped_dict._mep_json = _json_text(value)
        return wrapped_dict
    if isinstance(value, list | tuple):
        wrapped_list = JsonList(wrap_value(v) for v in value)
        wrapped_list._mep_json = _json_text(list(value))
        return wrapped_list
    return value


# Plain YAML text that reads back as itself inside a larger plain scalar: no quotes,
# no indicators, no "# " comment, no ": " mapping, no flow punctuation.
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9_./(][A-Za-z0-9_./+=@%()~:-]*(?: [A-Za-z0-9_./+=@%()~:-]+)*")


def plain_value(value: Any) -> Any:
    """What the reference shows as it is: strings that are plain YAML text stay plain
    (``PlainStr``), other strings are JSON-quoted; lists and objects recurse (and print
    as JSON); other values are unchanged."""
    if isinstance(value, str):
        plain = _PLAIN_TEXT.fullmatch(value) and ": " not in value and not value.endswith(":")
        if plain or value == "":
            return PlainStr(value)
        return quote_string(value)
    if isinstance(value, Mapping):
        wrapped_dict = JsonDict((k, plain_value(v)) for k, v in value.items())
        wrapped_dict._mep_json = _json_text(value)
        return wrapped_dict
    if isinstance(value, list | tuple):
        wrapped_list = JsonList(plain_value(v) for v in value)
        wrapped_list._mep_json = _json_text(list(value))
        return wrapped_list
    return value


def raw_value(value: Any) -> str:
    """The text a supplied value stands for (the inverse of JSON-quoting)."""
    if isinstance(value, QuotedStr):
        return value._mep_raw
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        "config.render_failed",
        f"shell_escape needs a string or a number, not {type(value).__name__}",
    )


def _yaml_float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    # PyYAML reads "1e+20" as a string; "1.0e+20" as a float.
    if "e" in text and "." not in text:
        text = text.replace("e", ".0e", 1)
    return text


def _finalize(value: Any) -> Any:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return _yaml_float(value)
    return value


def shell_escape(value: Any) -> Any:
    """The reference's filter: a string is JSON-decoded (a supplied string's text is its
    JSON form) and, when that gives a string, becomes one shell word (``shlex.quote``)
    rendered as a quoted YAML scalar; anything else passes through unchanged. So
    ``v | shell_escape`` quotes a user's value and ``default('""') | shell_escape``
    renders ``''``. A string that is not JSON text is an error, as there."""
    if not isinstance(value, str):
        return value
    try:
        decoded = json.loads(str(value))
    except ValueError as exc:
        raise ConfigError(
            "config.render_failed",
            f"shell_escape: {str(value)[:40]!r} is not JSON text (a supplied value, or a"
            " literal in its JSON form such as '\"text\"')",
        ) from exc
    if not isinstance(decoded, str):
        return value
    return quote_string(shlex.quote(decoded))


def shell_format(template: Any, *args: Any) -> QuotedStr:
    """``"cmd %s --x %s" | shell_format(a, b)``: each argument shell-quoted into the
    template's own ``%s`` slots; the line renders as one quoted YAML scalar."""
    if isinstance(template, QuotedStr) or not isinstance(template, str):
        raise ConfigError(
            "config.render_failed", "shell_format needs a literal format string of the template"
        )
    if template.count("%s") != len(args) or template.replace("%s", "").count("%") != 0:
        raise ConfigError(
            "config.render_failed",
            "shell_format: the format needs exactly one %s per argument and no other %",
        )
    return quote_string(template % tuple(shlex.quote(raw_value(a)) for a in args))


# --- the identity a template sees -------------------------------------------------


@attrs.frozen
class MappedIdentity:
    """The local account a request was mapped to, and the external identity that matched."""

    account: Account
    identity: Identity | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """Plain data, mep's names: ``{"local": {name, uid, gid, group_ids, group_names,
        home, shell}, "id": <identity id or None>, "identity": {<plain-keyed scalar
        fields>}}``; ``reference_dict`` holds the reference's names."""
        fields: dict[str, Any] = {}
        if self.identity is not None:
            for key, value in self.identity.fields.items():
                if (
                    isinstance(key, str)
                    and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)
                    and (value is None or isinstance(value, str | int | float | bool))
                    and not (isinstance(value, str) and len(value) > 4096)
                ):
                    fields[key] = value
        return {
            "local": {
                "name": self.account.name,
                "uid": self.account.uid,
                "gid": self.account.gid,
                "group_ids": list(self.account.group_ids),
                "group_names": list(self.account.group_names),
                "home": self.account.home,
                "shell": self.account.shell,
            },
            "id": self.identity.id if self.identity is not None else None,
            "identity": fields,
        }

    def reference_dict(self) -> dict[str, Any]:
        """The reference's shape: ``{"local": {uname, uid, gid, groups, gecos, shell,
        dir}, "globus": {"id"}}``; ``groups`` are group ids, the primary group first (as
        ``os.getgrouplist`` gives them)."""
        account = self.account
        groups = [account.gid, *(g for g in account.group_ids if g != account.gid)]
        return {
            "local": {
                "uname": account.name,
                "uid": account.uid,
                "gid": account.gid,
                "groups": groups,
                "gecos": account.gecos,
                "shell": account.shell,
                "dir": account.home,
            },
            "globus": {"id": self.identity.id if self.identity is not None else None},
        }


# --- the bounded sandbox ----------------------------------------------------------


class _BoundTransformer(NodeTransformer):
    """Route every ``for`` iterable and every ``~`` through the environment's guards."""

    def visit_For(self, node: jnodes.For) -> jnodes.Node:
        self.generic_visit(node)
        node.iter = jnodes.Call(
            jnodes.EnvironmentAttribute("mep_iterate", lineno=node.lineno),
            [node.iter],
            [],
            None,
            None,
            lineno=node.lineno,
        )
        return node

    def visit_Concat(self, node: jnodes.Concat) -> jnodes.Node:
        self.generic_visit(node)
        return jnodes.Call(
            jnodes.EnvironmentAttribute("mep_concat", lineno=node.lineno),
            [jnodes.List(list(node.nodes), lineno=node.lineno)],
            [],
            None,
            None,
            lineno=node.lineno,
        )


class _FolderLoader(jinja2.BaseLoader):
    """Templates by plain file name, from the texts handed in; nothing else."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        self._texts = dict(texts)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        if (
            not isinstance(template, str)
            or not _INCLUDE_NAME.fullmatch(template)
            or ".." in template
        ):
            raise jinja2.exceptions.SecurityError(
                f"{template!r}: templates may include only files of their own folder, by plain name"
            )
        if template not in self._texts:
            raise jinja2.TemplateNotFound(template)
        return self._texts[template], template, lambda: True


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: RenderLimits, texts: Mapping[str, str]) -> None:
        super().__init__(
            loader=_FolderLoader(texts),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            finalize=_finalize,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        self.limits = limits
        self.calls = 0
        self.iterations = 0
        self.globals["range"] = self.bounded_range
        # lipsum(n) does unbounded work; namespace() is the one mutable object that
        # would let a loop carry state from one iteration to the next.
        self.globals.pop("lipsum", None)
        self.globals.pop("namespace", None)
        for name, func in list(self.filters.items()):
            self.filters[name] = self._guard_filter(name, func)
        self.filters["shell_escape"] = self._guard_filter("shell_escape", shell_escape)
        self.filters["shell_format"] = self._guard_filter("shell_format", shell_format)

    # parsing: add the loop and concatenation guards to every template
    def _parse(self, source: str, name: str | None, filename: str | None) -> jnodes.Template:
        tree = super()._parse(source, name, filename)
        guarded = _BoundTransformer().visit(tree)
        assert isinstance(guarded, jnodes.Template)
        guarded.set_environment(self)
        return guarded

    # limits
    def _refuse(self, what: str) -> RenderLimitExceeded:
        return RenderLimitExceeded(f"render limit: {what}")

    def _check_size(self, value: Any, what: str) -> Any:
        if isinstance(value, str | list | tuple) and len(value) > self.limits.max_string_length:
            raise self._refuse(f"{what} longer than {self.limits.max_string_length}")
        return value

    def bounded_range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise self._refuse(f"range() of more than {self.limits.max_range} items")
        return rng

    def mep_iterate(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.iterations += 1
            if self.iterations > self.limits.max_iterations:
                raise self._refuse(f"more than {self.limits.max_iterations} loop iterations")
            yield item

    def mep_concat(self, parts: list[Any]) -> str:
        total = 0
        texts: list[str] = []
        for part in parts:
            text = str(part)
            total += len(text)
            if total > self.limits.max_string_length:
                raise self._refuse(f"concatenation longer than {self.limits.max_string_length}")
            texts.append(text)
        return "".join(texts)

    def _check_printf(self, fmt: str) -> None:
        for match in _PRINTF_SPEC.finditer(fmt):
            for number in match.groups():
                if number == "*" or (number and int(number) > self.limits.max_range):
                    raise self._refuse("format width or precision too large")

    def _check_format_spec(self, fmt: str) -> None:
        try:
            parsed = list(string.Formatter().parse(fmt))
        except ValueError:
            return  # the call itself reports the malformed format
        for _literal, _field, spec, _conv in parsed:
            if not spec:
                continue
            if "{" in spec:
                raise self._refuse("nested format specifications")
            if any(int(d) > self.limits.max_range for d in _DIGITS.findall(spec)):
                raise self._refuse("format width or precision too large")

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        self._check_binop(operator, left, right)
        return self._check_size(super().call_binop(context, operator, left, right), "result")

    def _check_binop(self, operator: str, left: Any, right: Any) -> None:
        """Refuse an operation whose result would exceed the limits, before computing it."""
        if operator == "*":
            self._check_repetition(left, right)
            self._check_int_product(left, right)
        elif operator == "**":
            self._check_int_power(left, right)
        elif operator == "+":
            self._check_addition(left, right)
        elif operator == "%" and isinstance(left, str):
            self._check_printf(left)

    def _check_repetition(self, left: Any, right: Any) -> None:
        """``str * n`` / ``list * n``, either way round."""
        limit = self.limits.max_string_repeat
        for seq, count in ((left, right), (right, left)):
            if (
                isinstance(seq, str | list | tuple)
                and isinstance(count, int)
                and len(seq) * max(count, 0) > limit
            ):
                raise self._refuse(f"repetition longer than {limit} items")

    def _check_int_product(self, left: Any, right: Any) -> None:
        if (
            isinstance(left, int)
            and isinstance(right, int)
            and left.bit_length() + right.bit_length() > self.limits.max_int_bits
        ):
            raise self._refuse(f"integer larger than {self.limits.max_int_bits} bits")

    def _check_int_power(self, base: Any, exponent: Any) -> None:
        if (
            isinstance(base, int)
            and isinstance(exponent, int)
            and exponent > 0
            and abs(base) > 1
            and exponent * base.bit_length() > self.limits.max_int_bits
        ):
            raise self._refuse(f"integer larger than {self.limits.max_int_bits} bits")

    def _check_addition(self, left: Any, right: Any) -> None:
        if (
            isinstance(left, str | list | tuple)
            and isinstance(right, str | list | tuple)
            and len(left) + len(right) > self.limits.max_string_length
        ):
            raise self._refuse(f"concatenation longer than {self.limits.max_string_length}")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        self._check_format_spec(value.__self__)
        inner = wrapper

        def checked(*args: Any, **kwargs: Any) -> str:
            return str(self._check_size(inner(*args, **kwargs), "format result"))

        return checked

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        self = __self
        self.calls += 1
        if self.calls > self.limits.max_calls:
            raise self._refuse(f"more than {self.limits.max_calls} calls")
        if isinstance(__obj, types.BuiltinMethodType | types.MethodType):
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                self._check_str_method(owner, __obj.__name__, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return self._check_size(result, "call result")

    def _check_str_method(
        self, text: str, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        limit = self.limits.max_string_length
        values = [*args, *kwargs.values()]
        if name in {"center", "ljust", "rjust", "zfill"}:
            if any(isinstance(v, int) and v > limit for v in values):
                raise self._refuse(f"str.{name} wider than {limit}")
        elif name == "expandtabs":
            if any(
                isinstance(v, int) and v * (text.count("\t") + 1) + len(text) > limit
                for v in values
            ):
                raise self._refuse("str.expandtabs result too long")
        elif name == "replace" and len(args) >= 2:
            self._check_replace(text, args[0], args[1])
        elif name == "join" and args:
            self._check_join(text, args[0])
        elif name in {"format", "format_map"}:
            self._check_format_spec(text)

    def _check_replace(self, text: Any, old: Any, new: Any) -> None:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            growth = max(len(new) - len(old), 0)
            if len(text) + (len(text) + 1) * growth > self.limits.max_string_length:
                raise self._refuse("replace() result could be too long")

    def _check_join(self, separator: Any, items: Any) -> None:
        if not isinstance(items, Sized):
            return
        count = len(items)
        total = len(str(separator)) * count
        if isinstance(items, list | tuple):
            total += sum(len(i) if isinstance(i, str) else 32 for i in items)
        if total > self.limits.max_string_length:
            raise self._refuse("join() result too long")

    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1
        env = self

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            env.calls += 1
            if env.calls > env.limits.max_calls:
                raise env._refuse(f"more than {env.limits.max_calls} calls")
            value = args[skip - 1] if len(args) >= skip else None
            extra = [*args[skip:], *kwargs.values()]
            for item in extra:
                if (
                    isinstance(item, int)
                    and not isinstance(item, bool)
                    and abs(item) > env.limits.max_range
                ):
                    raise env._refuse(f"filter {name}: argument larger than {env.limits.max_range}")
            env._filter_precheck(name, value, extra)
            return env._check_size(func(*args, **kwargs), f"filter {name} result")

        return guarded

    def _filter_precheck(self, name: str, value: Any, extra: list[Any]) -> None:
        limit = self.limits.max_string_length
        if name == "format" and isinstance(value, str):
            self._check_printf(value)
        elif name == "join" and extra and not isinstance(extra[0], int):
            self._check_join(extra[0], value)
        elif name == "join":
            self._check_join("", value)
        elif name == "replace" and len(extra) >= 2:
            self._check_replace(str(value), extra[0], extra[1])
        elif name in {"indent", "wordwrap"} and isinstance(value, str):
            lines = value.count("\n") + 1 if name == "indent" else len(value) + 1
            widest = max((len(x) if isinstance(x, str) else 1 for x in extra), default=4)
            if name == "indent":
                widest = max(
                    [widest, *(x for x in extra if isinstance(x, int) and not isinstance(x, bool))]
                )
            if len(value) + lines * widest > limit:
                raise self._refuse(f"filter {name} result could be too long")


# --- rendering ---------------------------------------------------------------------


def _template_line(exc: BaseException, names: Iterable[str]) -> str:
    """``name:line`` of the innermost template frame of a traceback, if any."""
    wanted = set(names)
    where = ""
    tb = exc.__traceback__
    steps = 0
    while tb is not None and steps < 10_000:
        code = tb.tb_frame.f_code
        if code.co_filename in wanted:
            where = f"{code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
        steps += 1
    return where


def _wrap_checked(
    data: Mapping[str, Any] | None,
    what: str,
    limits: VariableLimits,
    reserved: frozenset[str],
    max_violations: int,
) -> Any:
    if data is None:
        return wrap_value({})
    found = structural_violations(data, limits, reserved=reserved, max_violations=max_violations)
    if found:
        raise ConfigError(
            "config.reserved_variable"
            if any(v.code == "reserved_name" for v in found)
            else "config.invalid_variables",
            f"{what}: {found[0].path}: {found[0].message}",
            violations=found[:max_violations],
        )
    return wrap_value(data)


def _template_identity(mapped: MappedIdentity) -> JsonDict:
    """mep's names quoted, the reference's names as the reference shows them; the two
    ``local`` mappings merged (their keys differ)."""
    ours = mapped.to_template_dict()
    theirs = mapped.reference_dict()
    merged = {**ours, "local": {**ours["local"], **theirs["local"]}, "globus": theirs["globus"]}
    identity: JsonDict = wrap_value(merged)
    local = identity["local"]
    for key, value in theirs["local"].items():
        local[key] = plain_value(value)
    local._mep_json = _json_text(merged["local"])
    identity["globus"] = plain_value(theirs["globus"])
    return identity


def render_template(
    template_text: str,
    variables: Mapping[str, Any],
    *,
    mapped: MappedIdentity,
    user_runtime: Mapping[str, Any] | None = None,
    parent_config: Mapping[str, Any] | None = None,
    environment: Mapping[str, str] | None = None,
    includes: Mapping[str, str] | None = None,
    limits: RenderLimits = RenderLimits(),  # noqa: B008 - frozen, so sharing is safe
    template_name: str = DEFAULT_TEMPLATE_NAME,
    variable_limits: VariableLimits = VariableLimits(),  # noqa: B008
) -> str:
    """Render ``template_text`` with ``variables`` (already validated by
    ``validate_variables``; their shape is checked again here, cheaply).

    ``parent_config`` (the endpoint's settings a template may read) and ``environment``
    (the user endpoint's environment) are the daemon's: ``_GC.parent_config`` and
    ``_GC.env``, empty when not given.

    Raises ``ConfigError`` with reason ``config.sandbox_violation``,
    ``config.render_limit``, ``config.undefined_variable`` or ``config.render_failed``,
    and ``TemplateConfigError`` (``config.template_invalid``) for a broken template; a
    refusal of the variables' shape reports at most ``limits.max_violations`` problems.
    """

    most = limits.max_violations
    context_vars = _wrap_checked(variables, "variables", variable_limits, RESERVED_NAMES, most)
    runtime = _wrap_checked(user_runtime, "user_runtime", variable_limits, frozenset(), most)
    context = _context(context_vars, runtime, mapped, parent_config, environment)
    texts = dict(includes or {})
    texts[template_name] = template_text
    sandbox = _BoundedSandbox(limits, texts)
    try:
        return _generate(sandbox, template_name, context, limits.max_output_bytes)
    except ConfigError:
        raise
    except Exception as exc:  # every template failure becomes a reason code
        raise _render_error(exc, list(texts), template_name) from exc


def _context(
    variables: Mapping[str, Any],
    runtime: Mapping[str, Any],
    mapped: MappedIdentity,
    parent_config: Mapping[str, Any] | None,
    environment: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The names a template sees: the caller's variables, and what the daemon provides
    both at the top level and under ``_GC`` (Globus Compute's spelling)."""
    identity = _template_identity(mapped)
    parent = plain_value(dict(parent_config or {}))
    env = plain_value(dict(environment or {}))
    gc = {"mapped_identity": identity, "user_runtime": runtime, "parent_config": parent, "env": env}
    context: dict[str, Any] = dict(variables)
    context.update(
        {"_GC": gc, "mapped_identity": identity, "user_runtime": runtime, "parent_config": parent}
    )
    return context


def _generate(
    sandbox: _BoundedSandbox, template_name: str, context: dict[str, Any], max_bytes: int
) -> str:
    """Render chunk by chunk, refusing output past ``max_bytes`` as it grows."""
    template = sandbox.get_template(template_name)
    out: list[str] = []
    size = 0
    for chunk in template.generate(context):
        size += len(chunk.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise sandbox._refuse(f"output larger than {max_bytes} bytes")
        out.append(chunk)
    return "".join(out)


# A failure while rendering, by kind: (reason, violation kind); the first match wins.
_RENDER_FAILURES: tuple[tuple[type[BaseException], str, str], ...] = (
    (RenderLimitExceeded, "config.render_limit", "render_limit"),
    (jinja2.exceptions.SecurityError, "config.sandbox_violation", "sandbox"),
    (jinja2.UndefinedError, "config.undefined_variable", "undefined"),
)


def _render_error(exc: BaseException, names: list[str], template_name: str) -> MepError:
    """One reason code for any failure of a template, located where the template allows."""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        where = f"{exc.name or template_name}:{exc.lineno}"
        return TemplateConfigError(
            "config.template_invalid",
            f"{where}: {exc.message}",
            violations=[Violation(where, str(exc.message), "syntax")],
        )
    if isinstance(exc, jinja2.TemplateNotFound):
        return TemplateConfigError(
            "config.template_invalid", f"included template not found: {exc.name!r}"
        )
    if isinstance(exc, RecursionError | MemoryError):
        return ConfigError("config.render_limit", f"{type(exc).__name__} while rendering")
    where = _template_line(exc, names)
    for kind, reason, violation in _RENDER_FAILURES:
        if isinstance(exc, kind):
            message = str(getattr(exc, "message", None) or exc)
            return ConfigError(
                reason,
                f"{where}: {message}",
                violations=[Violation(where or template_name, message, violation)],
            )
    message = f"{type(exc).__name__}: {exc}"
    return ConfigError(
        "config.render_failed",
        f"{where}: {message}",
        violations=[Violation(where or template_name, message, "error")],
    )
