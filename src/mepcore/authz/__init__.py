"""Authorization: Casbin policies decided by a fast, exactly equivalent evaluator.

A request (``AuthzRequest``: endpoint, object, action, the caller's principals and
attributes) goes in, a ``Decision`` comes out; a denial is a value, never an exception.
``principals_of`` names a caller's principals from its identities and mapped account.
Only a broken model or policy raises (``AuthzConfigError`` naming the file and line).
See ``docs/authorization.md`` for the model, the predicates and the index design.
"""

from mepcore.authz.authorizer import (
    REQUEST_SCHEMA,
    Authorizer,
    AuthorizerHolder,
    AuthzRequest,
    Decision,
    Explanation,
    principals_of,
)
from mepcore.authz.model import MODEL_TEXT, check_model
from mepcore.authz.patterns import segment_match, validate_pattern
from mepcore.authz.policy import ACTIONS, PolicyLine, parse_policy
from mepcore.authz.predicates import REGISTRY as PREDICATES
from mepcore.authz.predicates import RequestContext, conditions_hold, parse_conditions
from mepcore.errors import AuthzConfigError, AuthzError

__all__ = [
    "ACTIONS",
    "MODEL_TEXT",
    "PREDICATES",
    "REQUEST_SCHEMA",
    "Authorizer",
    "AuthorizerHolder",
    "AuthzConfigError",
    "AuthzError",
    "AuthzRequest",
    "Decision",
    "Explanation",
    "PolicyLine",
    "RequestContext",
    "check_model",
    "conditions_hold",
    "parse_conditions",
    "parse_policy",
    "principals_of",
    "segment_match",
    "validate_pattern",
]
