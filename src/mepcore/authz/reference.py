"""A plain ``casbin.Enforcer`` on the same model and policy: the reference semantics.

The differential tests and ``bench/authz.py`` compare the authorizer with this. Policy
lines are fed to Casbin's own line loader (as its file adapter would), the model's
custom functions are registered, and ``enforce`` receives the principals as a tuple and
the condition context as ``r.ctx``. Deliberately not used by ``decide``: evaluating
every line per request is what the index avoids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mepcore.authz.patterns import segment_match
from mepcore.authz.predicates import RequestContext, conditions_hold

# The custom functions the shipped model's matcher calls.
MODEL_FUNCTIONS: Mapping[str, Callable[..., bool]] = {
    "segmentMatch": segment_match,
    "conditionsHold": conditions_hold,
}


def build_enforcer(
    model_text: str,
    policy_texts: Iterable[str],
    *,
    functions: Mapping[str, Callable[..., bool]] | None = None,
) -> Any:
    """A ``casbin.Enforcer`` with the model, every policy line and the functions."""
    import casbin
    from casbin.persist.adapter import load_policy_line

    enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=model_text))
    for name, fn in (functions or MODEL_FUNCTIONS).items():
        enforcer.add_function(name, fn)
    model = enforcer.get_model()
    for text in policy_texts:
        for raw in text.split("\n"):
            load_policy_line(raw.strip(), model)
    enforcer.build_role_links()
    return enforcer


def enforce(
    enforcer: Any,
    endpoint: str,
    obj: str,
    action: str,
    principals: tuple[str, ...],
    ctx: RequestContext,
) -> bool:
    """Casbin's answer for one request."""
    return bool(enforcer.enforce(tuple(principals), endpoint, obj, action, ctx))
