"""The shipped Casbin model and the check that a model file is that model.

``MODEL_TEXT`` is the model mep evaluates (``policies/model.conf`` is the same model,
commented for administrators). The authorizer's fast evaluator implements exactly this
matcher, so a model file is accepted only when Casbin parses it and its definitions,
effect and matcher equal the shipped ones up to whitespace and comments; anything else
is refused with ``authz.model_invalid`` instead of being evaluated with different
semantics. Deliberately not here: support for arbitrary Casbin models.
"""

from __future__ import annotations

import ast
import re

from mepcore.errors import AuthzConfigError

# The request: r.sub is the tuple of the caller's principals, r.ctx a RequestContext.
MODEL_TEXT = """\
[request_definition]
r = sub, dom, obj, act, ctx

[policy_definition]
p = sub, dom, obj, act, cond, eft

[role_definition]
g = _, _, _
g2 = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = segmentMatch(r.dom, p.dom) \\
    && (p.act == "*" || p.act == r.act) \\
    && [s for s in r.sub if g(s, p.sub, r.dom) || segmentMatch(s, p.sub)] != [] \\
    && (g2(r.obj, p.obj) || segmentMatch(r.obj, p.obj)) \\
    && conditionsHold(p.cond, r.ctx)
"""

# Section key -> (section, assertion) of every definition the evaluator depends on.
_KEYS = (("r", "r"), ("p", "p"), ("g", "g"), ("g", "g2"), ("e", "e"), ("m", "m"))


def _normalized(text: str, source: str) -> dict[tuple[str, str], str]:
    import casbin  # imported here: only loading a model needs it

    try:
        model = casbin.Enforcer.new_model(text=text)
    except Exception as exc:  # casbin raises bare exceptions of many kinds
        raise AuthzConfigError(
            "authz.model_invalid", f"{source}: Casbin cannot parse the model: {exc}"
        ) from exc
    out: dict[tuple[str, str], str] = {}
    for sec, key in _KEYS:
        try:
            value = model[sec][key].value
        except (KeyError, TypeError) as exc:
            raise AuthzConfigError(
                "authz.model_invalid", f"{source}: the model has no '{key}' definition"
            ) from exc
        out[(sec, key)] = _matcher_ast(str(value)) if sec == "m" else re.sub(r"\s+", "", value)
    # casbin's Model has keys() but is not iterable, hence the explicit .keys().
    sections = model.keys()
    extra = [f"{sec}.{key}" for sec in sections for key in model[sec] if (sec, key) not in _KEYS]
    if extra:
        raise AuthzConfigError(
            "authz.model_invalid",
            f"{source}: the model defines {', '.join(sorted(extra))}, which mep does not evaluate",
        )
    return out


def _matcher_ast(value: str) -> str:
    """The matcher's syntax tree, so that only layout may differ (Casbin rewrites
    ``&&``, ``||`` and ``!`` the same way before evaluating)."""
    expr = value.replace("&&", " and ").replace("||", " or ")
    expr = re.sub(r"!(?!=)", " not ", expr)
    try:
        return ast.dump(ast.parse(expr.strip(), mode="eval"))
    except SyntaxError:
        return "<syntax error>"


def check_model(text: str, source: str = "<model>") -> None:
    """Refuse (``AuthzConfigError``) a model that is not the shipped one."""
    expected = _normalized(MODEL_TEXT, "<shipped model>")
    found = _normalized(text, source)
    for key in _KEYS:
        if found[key] != expected[key]:
            raise AuthzConfigError(
                "authz.model_invalid",
                f"{source}: '{key[1]}' differs from the shipped model; mep evaluates only the "
                "shipped model (policies/model.conf)",
            )
