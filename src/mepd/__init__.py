"""mepd: the daemon of mep, thin wiring of the mepcore components.

Settings, HTTP API, authentication, the request pipeline, the user-endpoint registry,
the task store, the audit log, the command line, and the user endpoint's own entry
point (``python -m mepd.uep``). Business rules live in mepcore, not here.
"""

__version__ = "0.1.0"
