"""Cancel on a real Slurm (the single-node cluster of the session fixture): a task running
in a batch job's Parsl worker is cancelled at once, its worker process is killed (the
job runs on this host) and the block goes on serving: the next task runs in it well
before the cancelled one's sleep would have ended."""

from __future__ import annotations

import pytest

from tests.daemon_harness import RunningDaemon
from tests.test_slurm_e2e import (  # noqa: F401 - fixtures
    User,
    accounts,
    jobs_of,
    runtime,
    site,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.slurm, pytest.mark.parsl]


def test_a_task_running_in_a_slurm_block_is_cancelled_and_its_worker_replaced(
    site: tuple[RunningDaemon, list[User]],  # noqa: F811 - the imported fixture
) -> None:
    _, users = site
    user = users[0]
    variables = {"tag": "cancel", "workers": 1}
    marker = user.marker("cancel")
    long = user.submit(variables, 600, str(marker))
    wait_for("the long task to start", marker.exists, 120)
    (job,) = jobs_of(user.account.pw_name, "R")
    r = user.client.delete(f"/v1/tasks/{long}")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled"
    assert r.json()["error"]["reason"] == "task.cancelled"
    # One worker in the block: the next task runs (within 120 s, not after the cancelled
    # task's 600 s) only once that worker was killed and Parsl's manager started
    # another, in the same job.
    uid, job_id = user.value(user.submit(variables, 0), deadline=120)
    assert (uid, job_id) == (user.account.pw_uid, job["id"])
    assert user.client.get(f"/v1/tasks/{long}").json()["state"] == "cancelled"
