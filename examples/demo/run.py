"""The scientists' side of the mep demo: functions submitted through ``Executor``.

``demo.py`` starts the daemon and runs this script with ``MEP_URL`` set and one token
per demo identity in ``MEP_DEMO_TOKENS`` (a JSON object). A scientist's own script
needs only the first lines of ``main()``:

    from mepcore.client import Executor

    with Executor("demo", url=URL, token=TOKEN) as ex:     # or MEP_URL / MEP_TOKEN
        print(ex.submit(whoami).result())

Functions defined in a script's ``__main__`` travel by value (dill), so they must
import what they use inside their body. ``python run.py --function-ids`` prints the
ids of the functions the "curated" endpoint allows (demo.py puts them in the settings).
"""

from __future__ import annotations

import json
import os
import sys
import time

from mepcore.client import Executor, RemoteException, RequestRefused, ShellFunction


def whoami(label: str = "") -> dict[str, object]:
    """Where and as whom this call ran."""
    import os
    import pwd
    import socket

    return {
        "label": label,
        "account": pwd.getpwuid(os.getuid()).pw_name,
        "uid": os.getuid(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "host": socket.gethostname(),
    }


def shout(text: str) -> str:
    return text.upper() + "!"


def square(x: int) -> int:
    return x * x


def average(values: list[float]) -> float:
    return sum(values) / len(values)


ALLOW_LISTED = (shout, square)


def function_ids() -> list[str]:
    from mepcore.client import pack_function

    return [pack_function(fn)[0] for fn in ALLOW_LISTED]


def section(title: str) -> None:
    print(f"\n== {title}")


def indent(text: str, prefix: str = "   | ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


def main() -> int:
    url = os.environ["MEP_URL"]
    tokens: dict[str, str] = json.loads(os.environ["MEP_DEMO_TOKENS"])
    as_root = os.environ.get("MEP_DEMO_MODE") == "root"
    alice, bob, mallory = "alice@example.org", "bob@example.org", "mallory@example.org"

    section("1. Two scientists, each on their own account")
    for who in (alice, bob):
        with Executor("demo", url=url, token=tokens[who]) as ex:
            seen = ex.submit(whoami, who).result(timeout=60)
        print(f"   {who:<20} ran as {seen['account']} (uid {seen['uid']}), pid {seen['pid']}")
    if not as_root:
        print("   (not root: both identities map to your own account; as root, demo.py")
        print("    creates mepdemo1 and mepdemo2 and each identity runs as its own uid)")

    section("2. One scientist, two user endpoint configurations")
    configs = [{"max_workers": 1, "label": "small"}, {"max_workers": 2, "label": "wider"}]
    with Executor("demo", url=url, token=tokens[alice]) as ex:
        futures = []
        for config in configs:
            ex.user_endpoint_config = config  # may change between submits
            futures.append(ex.submit(whoami, config["label"]))
        results = [f.result(timeout=60) for f in futures]
        endpoints = ex.client.status("demo")["user_endpoints"]
    for config, seen in zip(configs, results, strict=True):
        print(f"   {json.dumps(config)} -> user endpoint pid {seen['ppid']}")
    print(
        f"   alice's user endpoints on 'demo' ({len(endpoints)}: one per configuration,"
        " with step 1's default):"
    )
    for entry in endpoints:
        print(f"     config {entry['config_key'][:12]}…  {entry['state']}  pid {entry['pid']}")

    section("3. Refusals, with the reason")
    with Executor("demo", url=url, token=tokens[mallory]) as ex:
        refused = ex.submit(whoami).exception(timeout=60)
    print(f"   {mallory} (no mapping rule): {refused}")
    with Executor("curated", url=url, token=tokens[alice]) as ex:
        allowed = ex.submit(shout, "allowed")
        not_allowed = ex.submit(average, [1.0, 2.0])
        print(f"   'curated' runs shout(): {allowed.result(timeout=60)}")
        print(f"   'curated' refuses average(): {not_allowed.exception(timeout=60)}")
    with Executor("demo", {"max_workers": 64}, url=url, token=tokens[alice]) as ex:
        invalid = ex.submit(whoami).exception(timeout=60)
    assert isinstance(invalid, RequestRefused)
    print(f"   max_workers=64 (the schema says <= 4): HTTP {invalid.status} {invalid.reason}")
    for violation in invalid.violations:
        print(f"     {violation.path}: {violation.message}")

    section("4. A remote exception, with its traceback")
    with Executor("demo", url=url, token=tokens[bob]) as ex:
        failed = ex.submit(average, []).exception(timeout=60)
    assert isinstance(failed, RemoteException)
    print(f"   future.exception(): {failed.type_name}: {failed.message}")
    print(indent(failed.traceback))

    section("5. 2,000 futures through one Executor")
    started = time.perf_counter()
    with Executor("demo", url=url, token=tokens[bob]) as ex:
        total = sum(ex.map(square, range(2_000)))
    elapsed = time.perf_counter() - started
    assert total == sum(i * i for i in range(2_000))
    print(f"   sum of squares {total} correct; {2_000 / elapsed:,.0f} futures/s")

    section("6. A shell command as a function")
    # {name} fields are filled from the arguments, each shell-quoted; a failing command
    # is a result with its return code, not an exception.
    count = ShellFunction("id -un; echo {text} | wc -w")
    listing = ShellFunction("ls {path}")
    with Executor("demo", url=url, token=tokens[alice]) as ex:
        counted = ex.submit(count, text="five words; one $(quoted) arg").result(timeout=60)
        missing = ex.submit(listing, path="/no/such/dir").result(timeout=60)
    for result in (counted, missing):
        print(f"   $ {result.cmd}")
        print(f"     return code {result.returncode}")
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text:
                print(indent(text, f"     {name} | "))
    return 0


def run() -> int:
    try:
        return main()
    except RequestRefused as exc:
        print(f"   refused: {exc}")
        return 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--function-ids"]:
        print(json.dumps(function_ids()))
        sys.exit(0)
    sys.exit(run())
