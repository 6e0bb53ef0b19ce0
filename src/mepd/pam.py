"""PAM for user endpoints, as Globus Compute's multi-user endpoints do it (optional).

With ``pam: {enable: true, service: mep}`` in the settings, every user endpoint start
first runs the service's *account* stack for the account (``pam_acct_mgmt``: expiry,
``pam_access``, ``pam_nologin``, site modules) and then opens a *session* for it
(``pam_open_session``: limits, ``pam_systemd``, home directories…); the session is
closed when the endpoint's process has gone. A refusal by the account stack refuses the
start with ``identity.pam_refused``; the PAM message goes to the admin log only.

The binding is ``pamela`` (JupyterHub's ctypes binding to the system's libpam), used
here and nowhere else. PAM calls block (modules may ask a directory server), so they run
in a worker thread. Deliberately not here: authentication — callers prove who they are
with tokens, never with a password.
"""

from __future__ import annotations

import asyncio

import attrs
import pamela
import structlog

from mepcore.errors import IdentityError
from mepcore.types import Account

log = structlog.get_logger("mepd.pam")


@attrs.frozen
class PamSessions:
    """The registry's ``SessionHooks`` on top of a PAM service."""

    service: str = "mep"

    async def open(self, account: Account) -> None:
        """Account management, then a session; ``IdentityError`` if PAM refuses."""
        await asyncio.to_thread(self._open, account.name)

    async def close(self, account: Account) -> None:
        try:
            await asyncio.to_thread(pamela.close_session, account.name, self.service)
        except pamela.PAMError as exc:  # closing is best effort: the process is gone
            log.warning("pam.session_close_failed", account=account.name, error=str(exc))

    def _open(self, name: str) -> None:
        try:
            pamela.check_account(name, self.service)
        except pamela.PAMError as exc:
            raise IdentityError(
                "identity.pam_refused",
                f"account {name!r} refused by PAM service {self.service!r}: {exc}",
                context={"username": name},
            ) from exc
        try:
            pamela.open_session(name, self.service)
        except pamela.PAMError as exc:
            raise IdentityError(
                "identity.pam_refused",
                f"PAM service {self.service!r} could not open a session for {name!r}: {exc}",
                context={"username": name},
            ) from exc
