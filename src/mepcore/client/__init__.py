"""The scientists' SDK: ``Client`` (the HTTP API) and ``Executor`` (``concurrent.futures``).

    from mepcore.client import Executor

    with Executor("hpc", url="https://mep.example.org") as ex:   # token from MEP_TOKEN
        print(ex.submit(pow, 2, 10).result())

It depends on nothing server-side (no casbin, jinja2, starlette, uvicorn, jsonschema) and
on no other mepcore component but the L0 error catalogue. The environment is an input
(``Client.from_environment(environ)``, ``token_from_environment(environ)``); only
``Executor``, the scientists' entry point, defaults to ``os.environ`` when it is given no
``environ``. See docs/client.md.
"""

from mepcore.client.errors import (
    ClientError,
    RemoteException,
    RequestRefused,
    SerializationError,
    ServiceUnavailable,
    TaskFailed,
    TaskInfrastructureError,
)
from mepcore.client.executor import Executor, TaskFuture
from mepcore.client.functions import MPIFunction, ShellFunction, ShellResult
from mepcore.client.records import TaskRecord, WaitReport
from mepcore.client.serialize import pack_args, pack_function, pack_value, unpack_value
from mepcore.client.service import (
    Client,
    RetryPolicy,
    TaskRequest,
    token_from_environment,
    url_from_environment,
)

__all__ = [
    "Client",
    "ClientError",
    "Executor",
    "MPIFunction",
    "RemoteException",
    "RequestRefused",
    "RetryPolicy",
    "SerializationError",
    "ServiceUnavailable",
    "ShellFunction",
    "ShellResult",
    "TaskFailed",
    "TaskFuture",
    "TaskInfrastructureError",
    "TaskRecord",
    "TaskRequest",
    "WaitReport",
    "pack_args",
    "pack_function",
    "pack_value",
    "token_from_environment",
    "unpack_value",
    "url_from_environment",
]
