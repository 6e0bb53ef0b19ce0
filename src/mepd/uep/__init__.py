"""The user endpoint process (``python -m mepd.uep --channel-fd N``), run as the mapped user.

``mepd.uep.entry`` proves the privilege drop, confines the process and hands over to
``mepd.uep.server``, which renders the configuration, starts the executor and serves
tasks; ``mepd.uep.identity``, ``log`` and ``orphan`` are its helpers. See
docs/user-endpoints.md.

Deliberately empty: the daemon imports ``mepd.uep.log`` (to find a user's log) and
must not pay for the endpoint's start machinery, and ``python -m mepd.uep`` imports
this package before ``__main__`` can turn the garbage collector off.
"""
