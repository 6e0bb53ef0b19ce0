"""``make demo``: start mepd on 127.0.0.1, run examples/demo/run.py against it, stop it.

As root: the demo accounts ``mepdemo1`` and ``mepdemo2`` are created if missing (and
kept for the next run; ``userdel -r mepdemo1`` removes one), the identities
alice@example.org and bob@example.org map to them, and user endpoints run from a
world-readable runtime virtualenv under /var/lib/mep-demo, built as an administrator
builds one: ``mepd runtime build`` (once per content of this checkout; runtimes of
other checkouts untouched for a day are removed). Not as root: both identities map to
the current account and user endpoints run from this virtualenv.

The daemon's settings, mapping, policy and template are the files next to this script;
its state (key, task store, audit log) lives in a temporary directory removed at the
end. Nothing is left running: the daemon is stopped with SIGTERM (it stops its user
endpoints), killed if it does not stop in time, and leftover processes are checked for.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEMO_DIR = Path(__file__).resolve().parent
REPO = DEMO_DIR.parent.parent
ACCOUNTS = ("mepdemo1", "mepdemo2")
IDENTITIES = ("alice@example.org", "bob@example.org", "mallory@example.org")
START_DEADLINE = 60.0
STOP_DEADLINE = 30.0


def say(text: str) -> None:
    print(text, flush=True)


def _unknown_password_hash() -> str:
    # A hash of a random password nobody keeps: the account is usable (mepd refuses
    # locked accounts, and useradd's default "!" locks it) but cannot log in by password.
    secret = base64.b64encode(os.urandom(24)).decode()
    made = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=secret,
        check=True,
        capture_output=True,
        text=True,
    )
    return made.stdout.strip()


def ensure_account(name: str) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", name],
            check=True,
            capture_output=True,
            text=True,
        )
        say(f"   created the demo account {name}")
        entry = pwd.getpwnam(name)
    subprocess.run(
        ["usermod", "--password", _unknown_password_hash(), name],
        check=True,
        capture_output=True,
        text=True,
    )
    return entry


RUNTIMES = Path("/var/lib/mep-demo")
RUNTIME_KEPT = 86_400  # seconds a runtime of another checkout is kept unused


def runtime_python() -> str:
    """As root: a runtime every account can read, from ``mepd runtime build`` — one per
    content of this checkout's mep (built under a lock; two demos share it)."""
    import fcntl
    import hashlib

    from mepd.commands.runtime import source_digest

    RUNTIMES.mkdir(mode=0o755, parents=True, exist_ok=True)
    key = hashlib.sha256(source_digest(str(REPO)).encode()).hexdigest()[:16]
    runtime = RUNTIMES / f"rt-{key}"
    with open(RUNTIMES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (runtime / "bin" / "python").exists():
            command = ["runtime", "build", str(runtime), "--replace", "--source", str(REPO)]
            built = subprocess.run(
                [sys.executable, "-m", "mepd", *command],
                capture_output=True,
                text=True,
                check=False,
            )
            if built.returncode != 0:
                raise RuntimeError(f"mepd runtime build failed:\n{built.stderr}{built.stdout}")
        os.utime(runtime)
        for other in RUNTIMES.glob("rt-*"):
            if other != runtime and time.time() - other.stat().st_mtime > RUNTIME_KEPT:
                shutil.rmtree(other, ignore_errors=True)
    return str(runtime / "bin" / "python")


def fill(template: Path, target: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    target.write_text(text)


def start_daemon(config: Path, state_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("ab") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "mepd", "serve", "--config", str(config)],
            stdout=err,
            stderr=err,
            cwd=str(REPO),
        )
    port_file = state_dir / "port"
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mepd exited with {process.returncode}:\n{log.read_text()}")
        text = port_file.read_text().strip() if port_file.exists() else ""
        if text:
            url = f"http://127.0.0.1:{int(text)}"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
        time.sleep(0.05)  # polling interval of a bounded wait
    process.kill()
    process.wait(10)
    raise RuntimeError(f"mepd was not ready within {START_DEADLINE:.0f}s:\n{log.read_text()}")


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def issue_token(config: Path, identity: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mepd",
            "token",
            "issue",
            "--config",
            str(config),
            "--identity",
            identity,
            "--ttl",
            "1h",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=str(REPO),
    )
    return done.stdout.strip()


def leftovers(accounts: list[str], daemon_pid: int) -> list[str]:
    found = []
    if os.path.exists(f"/proc/{daemon_pid}"):
        found.append(f"mepd (pid {daemon_pid})")
    if os.geteuid() == 0:
        for name in accounts:
            done = subprocess.run(["pgrep", "-u", name], capture_output=True, text=True)
            found += [f"pid {pid} of {name}" for pid in done.stdout.split()]
    return found


def private_parent() -> Path:
    """Where the demo's temporary deployment goes. Not /tmp: mepd refuses files under
    a shared sticky directory (security rule 8), so a directory only root can write
    (as root) or this account's own runtime or cache directory."""
    if os.geteuid() == 0:
        return Path("/run")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and Path(runtime).stat().st_uid == os.getuid():
        return Path(runtime)
    cache = Path.home() / ".cache"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    return cache


def prepare(work: Path) -> tuple[Path, Path, list[str]]:
    """Accounts, runtime and files of a demo deployment in ``work``: returns the settings
    file, the state directory and the accounts alice and bob map to."""
    if os.geteuid() == 0:
        accounts = [ensure_account(name).pw_name for name in ACCOUNTS]
        python = runtime_python()
    else:
        me = pwd.getpwuid(os.getuid()).pw_name
        accounts = [me, me]
        python = sys.executable
    state_dir = work / "state"
    state_dir.mkdir(mode=0o700)
    ids = subprocess.run(
        [sys.executable, str(DEMO_DIR / "run.py"), "--function-ids"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    fill(
        DEMO_DIR / "mapping.json.in",
        work / "mapping.json",
        {"ALICE_ACCOUNT": accounts[0], "BOB_ACCOUNT": accounts[1]},
    )
    config = work / "settings.yaml"
    files, shipped = copy_site_files(work)
    fill(
        DEMO_DIR / "settings.yaml.in",
        config,
        {
            "STATE_DIR": str(state_dir),
            "PYTHON": python,
            "DEMO_DIR": str(files),
            "WORK_DIR": str(work),
            "REPO": str(shipped),
            "ALLOWED_FUNCTIONS": ids,
        },
    )
    return config, state_dir, accounts


SITE_FILES = (
    "user_config_template.yaml.j2",
    "user_config_schema.json",
    "user_environment.yaml",
    "policy.csv",
)


def copy_site_files(work: Path) -> tuple[Path, Path]:
    """Copies of the site's files in the demo's own directory, as an administrator
    installs them: mepd trusts only files no one else could have changed, and the
    checkout may live anywhere (under /tmp, cloned with a group-writable umask…)."""
    files = work / "site"
    shipped = work / "shipped"
    (shipped / "policies").mkdir(parents=True)
    files.mkdir()
    for name in SITE_FILES:
        shutil.copyfile(DEMO_DIR / name, files / name)
    for name in ("model.conf", "base.csv"):
        shutil.copyfile(REPO / "policies" / name, shipped / "policies" / name)
    for path in (files, shipped, shipped / "policies", *files.iterdir(), *shipped.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return files, shipped


def main() -> int:
    started = time.monotonic()
    as_root = os.geteuid() == 0
    say("mep demo")
    work = Path(tempfile.mkdtemp(prefix="mep-demo-", dir=private_parent()))
    config, state_dir, accounts = prepare(work)
    process: subprocess.Popen[bytes] | None = None
    code = 1
    try:
        process, url = start_daemon(config, state_dir, work / "mepd.log")
        mode = "as root" if as_root else f"as {accounts[0]} (not root)"
        say(f"   mepd serving on {url} {mode}; state in {state_dir}")
        say(
            f"   alice@example.org -> {accounts[0]}, bob@example.org -> {accounts[1]},"
            " mallory@example.org -> (no rule)"
        )
        tokens = {identity: issue_token(config, identity) for identity in IDENTITIES}
        env = {k: v for k, v in os.environ.items() if k not in ("MEP_TOKEN", "MEP_URL")}
        env.update(
            MEP_URL=url,
            MEP_DEMO_TOKENS=json.dumps(tokens),
            MEP_DEMO_MODE="root" if as_root else "single",
        )
        code = subprocess.run(
            [sys.executable, str(DEMO_DIR / "run.py")], env=env, check=False
        ).returncode
        if code:
            say("\n== The daemon's log (the end)")
            say((work / "mepd.log").read_text()[-3000:])
    except Exception as exc:
        say(f"demo failed: {exc}")
        log = work / "mepd.log"
        if log.exists():
            say(log.read_text()[-3000:])
    finally:
        if process is not None:
            stop_daemon(process)
            left = leftovers(sorted(set(accounts)) if as_root else [], process.pid)
            say("\n== Stopped")
            say(
                f"   daemon exit status {process.returncode}; "
                + (f"STILL RUNNING: {', '.join(left)}" if left else "nothing left running")
            )
            code = code or (1 if left else 0)
        shutil.rmtree(work, ignore_errors=True)
    say(f"   demo finished in {time.monotonic() - started:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
