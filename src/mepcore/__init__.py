"""mepcore: the pure components of mep, for the daemon and for services that embed them.

- ``mepcore.identity`` maps external identities to local accounts;
- ``mepcore.authz`` decides requests by a Casbin policy;
- ``mepcore.config`` validates user variables and renders endpoint configurations;
- ``mepcore.spawn`` plans and launches user endpoint processes;
- ``mepcore.tasks`` packs, runs and reports tasks;
- ``mepcore.client`` is the scientists' SDK;
- ``mepcore.contrib`` puts these decisions into services sites run (Open OnDemand,
  JupyterHub); nothing else in mepcore imports it.

Importing ``mepcore`` imports none of them: each is imported by name when needed.
"""

from mepcore.errors import MepError, Violation
from mepcore.types import Account, Identity, IdentitySet

__version__ = "0.1.0"

__all__ = ["Account", "Identity", "IdentitySet", "MepError", "Violation", "__version__"]
