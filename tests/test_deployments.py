"""What prefect.yaml promises the real deployments: qat/int8 retrained on a cron, the reaper every few
minutes on its own pool (it backs up the qat worker, so never runs on it), and flow runs that send
heartbeats at the pace the reaper reads. Read through devtools.deployments' lookup of prefect.yaml and
tasks.reaping's own reading of the heartbeat. Fast: no server."""
from __future__ import annotations

import re

from devtools.deployments import deployment, deployment_env
from tasks import reaping

QAT = ("qat/int8", "qat/int4")
HEARTBEAT = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def active_schedules(name: str) -> list[dict]:
    return [s for s in deployment(name).get("schedules") or [] if s.get("active", True)]


def test_int8_is_retrained_on_an_active_cron():
    from prefect.client.schemas.schedules import CronSchedule

    crons = [s for s in active_schedules("qat/int8") if s.get("cron")]
    assert crons, "qat/int8 has no active cron schedule"
    for s in crons:  # Prefect's own schema accepts it (a typo would fail at deploy time)
        CronSchedule(cron=s["cron"], timezone=s.get("timezone"))


def test_the_reaper_runs_on_an_interval_its_description_names():
    intervals = [s["interval"] for s in active_schedules("reap/reap") if s.get("interval")]
    assert len(intervals) == 1 and intervals[0] > 0, intervals
    # its GONE rule needs two checks: the description says how far apart they are
    minutes = re.search(r"two checks (\d+) minutes apart", deployment("reap/reap")["description"])
    assert minutes and int(minutes.group(1)) * 60 == intervals[0]
    assert deployment("reap/reap")["concurrency_limit"] == 1  # its verdicts are kept between runs


def test_the_reaper_has_its_own_pool_and_both_qat_deployments_share_one():
    qat_pools = {deployment(name)["work_pool"]["name"] for name in QAT}
    assert len(qat_pools) == 1, qat_pools
    assert deployment("reap/reap")["work_pool"]["name"] not in qat_pools


def test_qat_runs_send_heartbeats_at_the_pace_the_reaper_reads(monkeypatch):
    for name in (*QAT, "reap/reap"):
        assert int(deployment_env(name).get(HEARTBEAT, 0)) > 0, f"{name} sets no heartbeat pace"
    paces = {deployment_env(name)[HEARTBEAT] for name in QAT}
    assert len(paces) == 1, paces
    # the reaper, under its own deployment's environment, counts silence from the same pace
    monkeypatch.delenv(HEARTBEAT, raising=False)
    for k, v in deployment_env("reap/reap").items():
        monkeypatch.setenv(k, v)
    assert reaping._heartbeat_s() == int(paces.pop())
