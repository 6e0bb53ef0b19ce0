"""Identity mapping: external identities to local POSIX accounts.

Two steps, kept apart so each can be tested and reused on its own:

1. ``IdentityMapper`` reads Globus Connect Server mapping documents (expression rules
   and external programs) and maps a linked ``IdentitySet`` to a *name*
   (``MappingResult``, with every candidate so an administrator can see why), using
   only identities in use and never the order of the linked identities;
2. ``check_account`` turns that name into a local ``Account`` through the
   ``AccountDatabase`` port, refusing in code what must never be used (non-portable
   names, missing accounts, uid 0, low uids, the daemon's own uid, a deny list).

Deliberately not here: authorization (``mepcore.authz``), logging (the daemon logs the
result or the error), and reading the process environment.
"""

from mepcore.identity.accounts import (
    MAX_USERNAME_LENGTH,
    AccountPolicy,
    check_account,
    is_portable_username,
)
from mepcore.identity.mapper import Candidate, IdentityMapper, MappingResult
from mepcore.identity.runner import (
    CommandOutput,
    CommandRunner,
    SubprocessCommandRunner,
)

__all__ = [
    "MAX_USERNAME_LENGTH",
    "AccountPolicy",
    "Candidate",
    "CommandOutput",
    "CommandRunner",
    "IdentityMapper",
    "MappingResult",
    "SubprocessCommandRunner",
    "check_account",
    "is_portable_username",
]
