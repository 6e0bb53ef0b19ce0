"""render_template: Globus Compute compatible quoting, context, sandbox and bounds."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mepcore.config import MappedIdentity, RenderLimits, render_template
from mepcore.errors import ConfigError, TemplateConfigError
from mepcore.types import Account, Identity
from tests.work_budget import work_budget

ALICE = Account(
    name="alice",
    uid=1001,
    gid=1001,
    home="/home/alice",
    shell="/bin/bash",
    group_ids=(1001, 2000),
    group_names=("alice", "gpu-users"),
)
MAPPED = MappedIdentity(
    account=ALICE,
    identity=Identity("0b6a3c6e-1111-2222-3333-444455556666", {"username": "alice@example.org"}),
)


def render(text: str, variables: dict[str, Any] | None = None, **kwargs: Any) -> str:
    return render_template(text, variables or {}, mapped=kwargs.pop("mapped", MAPPED), **kwargs)


def refused(text: str, variables: dict[str, Any] | None = None, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        render(text, variables, **kwargs)
    return info.value


# --- quoting ----------------------------------------------------------------------


def test_strings_render_as_json_quoted_scalars() -> None:
    assert render("p: {{ p }}", {"p": "gpu"}) == 'p: "gpu"'


def test_newline_in_a_value_cannot_inject_yaml() -> None:
    hostile = "debug\nhigh_assurance: true\nengine: {type: x}"
    out = render("partition: {{ p }}\nother: 1\n", {"p": hostile})
    assert yaml.safe_load(out) == {"partition": hostile, "other": 1}


def test_quotes_in_a_value_cannot_inject_yaml() -> None:
    for hostile in ['x", "evil": "y', "x' \nevil: 'y", 'a"\nb: c', "\\", "\x7f", "\u2028: x"]:
        out = render("a: {{ v }}\nb: [{{ v }}]\nc: {x: {{ v }}}\n", {"v": hostile})
        assert yaml.safe_load(out) == {"a": hostile, "b": [hostile], "c": {"x": hostile}}


def test_dict_keys_that_could_inject_are_refused_at_render_time_too() -> None:
    template = "{% for k, v in d.items() %}{{ k }}: {{ v }}\n{% endfor %}"
    err = refused(template, {"d": {"a\nhigh_assurance": 1}})
    assert err.reason == "config.invalid_variables"
    assert err.violations[0].code == "invalid_key"
    # the same through user_runtime, which comes from the client
    err = refused("x: 1", user_runtime={'x": y': 1})
    assert err.reason == "config.invalid_variables"
    # identifier keys render as themselves and read back as the same mapping
    out = render(template, {"d": {"alpha": "1: 2", "beta": 3}})
    assert yaml.safe_load(out) == {"alpha": "1: 2", "beta": 3}


def test_none_booleans_numbers_lists_and_dicts() -> None:
    variables = {
        "n": None,
        "t": True,
        "f": False,
        "i": -3,
        "x": 1e20,
        "l": ["a", 1],
        "d": {"k": "v"},
    }
    out = render(
        "n: {{ n }}\nt: {{ t }}\nf: {{ f }}\ni: {{ i }}\nx: {{ x }}\nl: {{ l }}\nd: {{ d }}\n",
        variables,
    )
    assert "n: null\nt: true\nf: false\ni: -3\nx: 1.0e+20\n" in out
    assert 'l: ["a", 1]' in out
    assert yaml.safe_load(out) == variables


def test_lists_and_dicts_still_iterate_index_and_test() -> None:
    out = render(
        "{% for x in l %}[{{ x }}]{% endfor %} {{ l[1] }} {{ l | length }} {{ d.k }} {{ d['k'] }}"
        "{% if d %} yes{% endif %}{% if not e %} empty{% endif %}",
        {"l": ["a", "b"], "d": {"k": "v"}, "e": []},
    )
    assert out == '["a"]["b"] "b" 2 "v" "v" yes empty'


def test_the_quoted_comparison_gotcha() -> None:
    template = "{% if p == '\"gpu\"' %}quoted{% endif %}{% if p == 'gpu' %}bare{% endif %}"
    assert render(template, {"p": "gpu"}) == "quoted"
    # a value that itself contains the quotes does not pass for the bare one
    assert render(template, {"p": '"gpu"'}) == ""


def test_shell_escape_quotes_the_raw_value_and_stays_yaml_safe() -> None:
    hostile = "x'; rm -rf ~\nnext: 1"
    out = render("cmd: {{ v | shell_escape }}\n", {"v": hostile})
    loaded = yaml.safe_load(out)
    assert list(loaded) == ["cmd"]
    import shlex

    assert shlex.split(loaded["cmd"]) == [hostile]


def test_shell_escape_has_the_reference_semantics() -> None:
    # Strings are JSON-decoded (a supplied string's text is its JSON form), so a literal
    # default in its JSON form works; anything that is not a string passes through.
    assert yaml.safe_load(render("n: {{ 5 | shell_escape }}")) == {"n": 5}
    assert render("e: {{ v | default('\"\"') | shell_escape }}") == "e: \"''\""
    assert render("l: {{ xs | shell_escape }}", {"xs": ["a b"]}) == 'l: ["a b"]'
    assert render("s: {{ '\"a b\"' | shell_escape }}") == "s: \"'a b'\""
    # A JSON text that is not a string passes through as it is.
    assert render("t: {{ '[1]' | shell_escape }}") == "t: [1]"
    # A literal that is not JSON text is refused, as the reference raises.
    assert refused("x: {{ 'a b' | shell_escape }}").reason == "config.render_failed"


def test_shell_format_builds_a_command_line_from_several_values() -> None:
    out = render(
        'worker_init: {{ "module load %s && source %s" | shell_format(m, v) }}\n',
        {"m": "py 3", "v": "/x/$HOME/bin"},
    )
    assert yaml.safe_load(out) == {"worker_init": "module load 'py 3' && source '/x/$HOME/bin'"}
    assert refused('{{ "%d" | shell_format(1) }}').reason == "config.render_failed"
    assert refused("{{ f | shell_format(1) }}", {"f": "%s"}).reason == "config.render_failed"


# --- context ----------------------------------------------------------------------


def test_mapped_identity_and_user_runtime_under_gc_and_legacy_names() -> None:
    runtime = {"python_version": "3.11.4", "platform": "linux"}
    template = (
        "{{ _GC.mapped_identity.local.name }} {{ _GC.mapped_identity.local.uid }} "
        "{{ _GC.mapped_identity.local.gid }} {{ _GC.mapped_identity.local.home }} "
        "{{ _GC.mapped_identity.local.shell }} {{ _GC.mapped_identity.local.group_names }} "
        "{{ _GC.mapped_identity.id }} {{ _GC.mapped_identity.identity.username }} "
        "{{ _GC.user_runtime.python_version }}|"
        "{{ mapped_identity.local.name }} {{ user_runtime.platform }}"
        "{% if '\"gpu-users\"' in _GC.mapped_identity.local.group_names %} member{% endif %}"
    )
    out = render(template, user_runtime=runtime)
    assert out == (
        '"alice" 1001 1001 "/home/alice" /bin/bash ["alice", "gpu-users"] '
        '"0b6a3c6e-1111-2222-3333-444455556666" "alice@example.org" "3.11.4"|'
        '"alice" "linux" member'
    )


def test_the_reference_names_of_mapped_identity_render_as_the_reference_shows_them() -> None:
    # uname, dir, shell, gecos and globus.id are not quoted there: plain text stays
    # plain (so "{{ dir }}/scratch" works); anything else is quoted, never raw YAML.
    template = (
        "a: {{ _GC.mapped_identity.local.uname }}\n"
        "b: {{ _GC.mapped_identity.local.dir }}/scratch\n"
        "c: {{ _GC.mapped_identity.local.groups }}\n"
        "d: {{ _GC.mapped_identity.globus.id }}\n"
        "e: {{ _GC.mapped_identity.local.gecos }}\n"
        "f: {{ mapped_identity.local.uid }}\n"
    )
    assert yaml.safe_load(render(template)) == {
        "a": "alice",
        "b": "/home/alice/scratch",
        "c": [1001, 2000],
        "d": "0b6a3c6e-1111-2222-3333-444455556666",
        "e": None,  # empty, as in the reference: YAML reads null
        "f": 1001,
    }
    hostile = Account("eve", 1003, 1003, "/home/eve", "/bin/sh", gecos="x\nengine: {type: y}")
    out = render(
        "display_name: {{ _GC.mapped_identity.local.gecos }}\n", mapped=MappedIdentity(hostile)
    )
    assert yaml.safe_load(out) == {"display_name": "x\nengine: {type: y}"}


def test_without_identity_the_ids_are_null() -> None:
    mapped = MappedIdentity(account=ALICE)
    assert render("{{ _GC.mapped_identity.id }}", mapped=mapped) == "null"
    assert render("{{ _GC.mapped_identity.globus.id }}", mapped=mapped) == "null"


def test_parent_config_and_env_come_from_the_daemon() -> None:
    assert render("{{ _GC.parent_config }} {{ parent_config }} {{ _GC.env }}") == "{} {} {}"
    out = render_template(
        "{{ _GC.parent_config.name }} {{ _GC.env.PATH }} {{ _GC.env.X }}",
        {},
        mapped=MAPPED,
        parent_config={"name": "hpc"},
        environment={"PATH": "/usr/bin:/bin", "X": "a: b"},
    )
    assert out == 'hpc /usr/bin:/bin "a: b"'
    assert refused("{{ _GC.parent_config.missing }}").reason == "config.undefined_variable"


def test_reserved_names_are_refused_by_render_too() -> None:
    assert refused("x", {"_GC": {}}).reason == "config.reserved_variable"


def test_undefined_variables_are_errors_with_the_line() -> None:
    err = refused("a: 1\nb: {{ missing }}\n")
    assert err.reason == "config.undefined_variable"
    assert "missing" in err.detail
    assert err.violations[0].path == "user_config_template.yaml.j2:2"
    assert refused("{{ d.nope }}", {"d": {"a": 1}}).reason == "config.undefined_variable"
    assert render("{{ x | default('\"dflt\"') }}") == '"dflt"'
    assert render("{% if x is defined %}a{% else %}b{% endif %}") == "b"


def test_template_syntax_errors_are_site_errors() -> None:
    with pytest.raises(TemplateConfigError) as info:
        render("{% if %}")
    assert info.value.reason == "config.template_invalid"
    assert info.value.violations[0].path == "user_config_template.yaml.j2:1"


# --- includes -----------------------------------------------------------------------


def test_includes_and_extends_resolve_among_the_given_files() -> None:
    includes = {
        "part.j2": "p: {{ v }}\n",
        "base.j2": "top: 1\n{% block body %}{% endblock %}",
        "macros.j2": "{% macro twice(x) %}{{ x }}{{ x }}{% endmacro %}",
    }
    out = render('{% include "part.j2" %}', {"v": "a"}, includes=includes)
    assert out == 'p: "a"\n'
    out = render(
        '{% extends "base.j2" %}{% block body %}b: {{ v }}{% endblock %}',
        {"v": 1},
        includes=includes,
    )
    assert yaml.safe_load(out) == {"top": 1, "b": 1}
    out = render('{% from "macros.j2" import twice %}{{ twice(1) }}', includes=includes)
    assert out == "11"


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "sub/x.j2", "..", "./x.j2", "/work/main/pyproject.toml"]
)
def test_includes_outside_the_template_folder_are_refused(name: str) -> None:
    err = refused(f"{{% include '{name}' %}}", includes={"x.j2": "secret"})
    assert err.reason == "config.sandbox_violation"
    err = refused(f"{{% extends '{name}' %}}", includes={"x.j2": "secret"})
    assert err.reason == "config.sandbox_violation"


def test_render_reads_no_files() -> None:
    # pyproject.toml exists in the working directory; only handed-in texts count
    with pytest.raises(TemplateConfigError) as info:
        render("{% include 'pyproject.toml' %}")
    assert info.value.reason == "config.template_invalid"


# --- sandbox and bounds -------------------------------------------------------------

ESCAPES = [
    ("{{ ''.__class__.__mro__ }}", "config.sandbox_violation"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "config.sandbox_violation"),
    ("{{ cycler.__init__.__globals__ }}", "config.sandbox_violation"),
    ("{{ joiner.__init__.__globals__.os }}", "config.sandbox_violation"),
    ("{{ self._TemplateReference__context }}", "config.sandbox_violation"),
    ("{{ x.__class__ }}", "config.sandbox_violation"),
    ("{{ l.append(1) }}", "config.sandbox_violation"),
    ("{{ (1).__class__.__base__ }}", "config.sandbox_violation"),
    ("{{ range(10**9) }}", "config.render_limit"),
    ("{% for i in range(10**9) %}{% endfor %}", "config.render_limit"),
    ("{{ 'a' * 10**9 }}", "config.render_limit"),
    ("{{ 10**9 * 'a' }}", "config.render_limit"),
    ("{{ [1] * 10**9 }}", "config.render_limit"),
    ("{{ 2 ** (10**9) }}", "config.render_limit"),
    ("{{ '{:999999999}'.format(1) }}", "config.render_limit"),
    ("{{ '{:{w}}'.format(1, w=999999999) }}", "config.render_limit"),
    ("{{ '%999999999s' % 1 }}", "config.render_limit"),
    ("{{ '%*s' % (999999999, 1) }}", "config.render_limit"),
    ("{{ '%999999999s' | format(1) }}", "config.render_limit"),
    ("{{ 'a' | center(10**9) }}", "config.render_limit"),
    ("{{ 'a'.center(10**9) }}", "config.render_limit"),
    ("{{ 'a'.ljust(10**9) }}", "config.render_limit"),
    ("{{ '\t'.expandtabs(10**8) }}", "config.render_limit"),
    ("{{ ('a' * 60000).replace('', 'b' * 60000) }}", "config.render_limit"),
    ("{{ range(10000) | join('b' * 60000) }}", "config.render_limit"),
    ("{{ ('b' * 60000).join(range(10000)) }}", "config.render_limit"),
    ("{{ ('a\n' * 30000) | indent(10000) }}", "config.render_limit"),
    ("{{ [] | slice(10**9) }}", "config.render_limit"),
    ("{{ lipsum(10**6) }}", "config.undefined_variable"),
    ("{% set ns = namespace(s='a') %}", "config.undefined_variable"),
    (
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        "config.render_limit",
    ),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "config.render_limit"),
    (
        "{% macro f(n) %}{% if n %}{% set x = f(n - 1) %}{{ x }}{{ x }}{% endif %}a{% endmacro %}"
        "{{ f(64) }}",
        "config.render_limit",
    ),
    (
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
        "{{ f('a', 64) }}",
        "config.render_limit",
    ),
    ("{% for i in range(10000) %}{{ 'x' * 60000 }}{% endfor %}", "config.render_limit"),
]


@pytest.mark.parametrize(("template", "reason"), ESCAPES)
def test_sandbox_escapes_and_runaway_work_are_refused_quickly(template: str, reason: str) -> None:
    # "Quickly" as bounded work, not seconds: the worst case needs ~110,000 calls and
    # ~3.5 MB; without the limits these would make 2**64 calls or allocate 600 MB.
    with work_budget(max_calls=1_000_000, max_bytes=32 * 2**20):
        err = refused(template, {"x": "s", "l": [1]})
    assert err.reason == reason, err
    assert err.detail


def test_hostile_values_through_an_innocent_template_hit_the_bounds() -> None:
    template = "{% for i in range(n) %}x{% endfor %}{{ '=' * width }}"
    assert refused(template, {"n": 10**9, "width": 1}).reason == "config.render_limit"
    assert refused(template, {"n": 1, "width": 10**9}).reason == "config.render_limit"
    assert render(template, {"n": 3, "width": 2}) == "xxx=="


def test_limits_are_configurable() -> None:
    limits = RenderLimits(max_output_bytes=10)
    assert render("0123456789", limits=limits) == "0123456789"
    assert refused("0123456789A", limits=limits).reason == "config.render_limit"
    assert refused(
        "{% for i in range(3) %}{% endfor %}", limits=RenderLimits(max_iterations=2)
    ).reason == ("config.render_limit")
    assert refused("{{ range(4) | list }}", limits=RenderLimits(max_range=3)).reason == (
        "config.render_limit"
    )


def test_ordinary_template_features_still_work() -> None:
    out = render(
        "{% set xs = [3, 1, 2] %}{{ xs | sort | join(',') }} {{ 'ab' ~ 'cd' }} {{ 7 // 2 }} "
        "{{ '%05.1f' % 2.5 }} {{ '{:>4}'.format('a') }} {{ 'x' * 3 }} {{ 2 ** 10 }} "
        "{{ 'abc' | upper }} {{ 'a b' | replace(' ', '_') }} {% for i in range(2) %}{{ loop.index }}{% endfor %}",
    )
    assert out == "1,2,3 abcd 3 002.5    a xxx 1024 ABC a_b 12"


def test_render_errors_do_not_leak_between_calls() -> None:
    assert refused("{% for i in range(3) %}{% endfor %}", limits=RenderLimits(max_iterations=2))
    assert render("{% for i in range(3) %}{{ i }}{% endfor %}") == "012"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=50))
def test_property_any_string_reads_back_unchanged(value: str) -> None:
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return  # not valid Unicode, refused by validation
    out = render("a: {{ v }}\nb:\n  - {{ v }}\nc: {{ v | shell_escape }}\n", {"v": value})
    loaded = yaml.safe_load(out)
    assert loaded["a"] == value
    assert loaded["b"] == [value]
    assert set(loaded) == {"a", "b", "c"}


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        json_leaf,
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(st.from_regex(r"k[a-z0-9_]{0,5}", fullmatch=True), c, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_property_any_json_value_reads_back_unchanged(value: Any) -> None:
    def surrogate_free(v: Any) -> bool:
        if isinstance(v, str):
            return not any(0xD800 <= ord(c) <= 0xDFFF for c in v)
        if isinstance(v, list):
            return all(surrogate_free(x) for x in v)
        if isinstance(v, dict):
            return all(surrogate_free(x) for x in v.values())
        return True

    if not surrogate_free(value):
        return
    assert yaml.safe_load(render("v: {{ v }}\n", {"v": value})) == {"v": value}


def test_max_violations_bounds_the_problems_reported_in_one_error() -> None:
    from mepcore.config import VariableLimits, render_endpoint_config

    odd_keys = {f"{i}x": i for i in range(10)}  # not plain identifiers: one problem each
    assert len(refused("{{ 1 }}", odd_keys).violations) == 10
    assert len(refused("{{ 1 }}", odd_keys, limits=RenderLimits(max_violations=3)).violations) == 3
    # Stopped at a bound: that bound is reported, with the problems found before it.
    too_long = {**odd_keys, "s": "x" * 10}
    err = refused(
        "{{ 1 }}",
        too_long,
        limits=RenderLimits(max_violations=3),
        variable_limits=VariableLimits(max_string_length=5),
    )
    assert err.reason == "config.variables_too_large"
    assert len(err.violations) == 3 and err.violations[-1].path == "$.s"
    # The endpoint config the template produced: one problem per unknown key.
    unknown = "".join(f"key{i}: {i}\n" for i in range(10))
    with pytest.raises(ConfigError) as info:
        render_endpoint_config(unknown, {}, mapped=MAPPED, limits=RenderLimits(max_violations=2))
    assert info.value.reason == "config.endpoint_config_invalid"
    assert len(info.value.violations) == 2
