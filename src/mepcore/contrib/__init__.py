"""Integrations: mepcore's decisions inside services sites already run.

- ``mepcore.contrib.login``: ``LoginGate``, a login name to a checked local account with
  a mep identity-mapping file;
- ``mepcore.contrib.profiles``: ``SpawnGate``, may this account start this profile, by a
  mep Casbin policy (both free of any one service);
- ``mepcore.contrib.ood``: ``mep-ood-map``, Open OnDemand's ``user_map_cmd``;
- ``mepcore.contrib.jupyterhub``: an ``Authenticator`` mixin for JupyterHub (needs the
  ``jupyterhub`` extra).

The set-up of each service is in docs/integrations.md.

This package sits on top of mepcore: it uses the public API of the components, and
nothing in mepcore's layers (nor mepd) imports it, so a service's library (JupyterHub,
traitlets, tornado) never reaches the daemon. Importing ``mepcore.contrib`` imports none
of its modules.
"""

__all__: list[str] = []
