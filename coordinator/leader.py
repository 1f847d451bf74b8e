"""Leadership: taking and renewing the lease, timers, and the takeover.

A coordinator stands by until it takes the lease, which increments the
epoch and appends a LeaderElected event. It then rebuilds its state from
the log, reconciles (pending checkpoints of the old leader are aborted,
deployments it may not have sent are sent again) and runs the timers that
trigger checkpoints, expire them, declare silent workers lost and restart
failed jobs. Losing the lease, or a fenced append, stops all of that at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from coordinator import checkpoints, jobs, taskmanagers
from coordinator.config import CoordinatorConfig
from coordinator.decision import Context, Decision, Effect
from coordinator.engine import Engine
from coordinator.errors import NotLeader
from coordinator.workers import WorkerCalls
from eventlog import EventLog, EventLogError, Lease, now_ms
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)


def decide_takeover(ctx: Context) -> Decision:
    """Reconcile after a new leader took over from the log's last one.

    Aborts the checkpoints the previous leader left pending (they do not
    count against the tolerance) and sends again every deployment that may
    not have reached its worker; deploying the same attempt twice is
    harmless.
    """
    events: list[pb.Event] = []
    effects: list[Effect] = []
    for job in sorted(ctx.state.jobs.values(), key=lambda j: j.submitted_ms):
        events += checkpoints.abort_pending(ctx, job.job_id, "the leader changed")
        deploying = [
            tid for tid, t in sorted(job.tasks.items()) if t.status == pb.TASK_DEPLOYING
        ]
        if deploying:
            effects += jobs.deploy_effects(ctx.state, job, deploying)
    return Decision(events, effects=effects)


class Leadership:
    """Runs one coordinator's leadership cycle until ``stop``."""

    def __init__(
        self,
        engine: Engine,
        log: EventLog,
        workers: WorkerCalls,
        config: CoordinatorConfig,
        address: str,
    ) -> None:
        self._engine = engine
        self._log = log
        self._workers = workers
        self._config = config
        self._address = address
        self._stopping = asyncio.Event()
        self._lease: Lease | None = None

    async def run(self) -> None:
        """Stand by, lead, and stand by again, until ``stop`` is called."""
        while not self._stopping.is_set():
            lease = await self._acquire()
            if lease is None:
                return
            await self._engine.lead(lease)
            self._lease = lease
            await self._lead(lease)
            self._lease = None
            await self._workers.cancel_all()

    def stop(self) -> None:
        """Ask ``run`` to return; the caller then calls ``release``."""
        self._stopping.set()

    async def release(self) -> None:
        """Give up the lease, if held, so a standby takes over at once."""
        lease = self._lease or self._engine.lease
        self._engine.step_down("the coordinator is stopping")
        if lease is not None:
            with contextlib.suppress(EventLogError):
                await self._log.release_lease(lease)

    async def _acquire(self) -> Lease | None:
        """Poll for the lease until taken; None once stopping."""
        poll_s = self._config.lease_s / 3
        coordinator_id = self._engine.coordinator_id
        while not self._stopping.is_set():
            try:
                lease = await self._log.acquire_lease(
                    coordinator_id, self._address, self._config.lease_s
                )
            except EventLogError as exc:
                logger.warning("taking the lease failed: %s", exc)
                lease = None
            if lease is not None:
                return lease
            leader = await self._log.leader()
            self._engine.leader_address = leader.address
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), poll_s)
        return None

    async def _lead(self, lease: Lease) -> None:
        try:
            await self._engine.execute(decide_takeover)
        except NotLeader:
            return
        async with asyncio.TaskGroup() as group:
            renewer = group.create_task(self._renew(lease))
            ticker = group.create_task(self._tick())
            lost = group.create_task(self._engine.lost.wait())
            stopping = group.create_task(self._stopping.wait())
            await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (renewer, ticker, lost, stopping):
                task.cancel()

    async def _renew(self, lease: Lease) -> None:
        period_s = self._config.lease_s / 3
        while True:
            await asyncio.sleep(period_s)
            if now_ms() >= lease.expires_ms:
                # The process was paused past the lease; another coordinator
                # may lead by now, so stop before doing anything else.
                self._engine.step_down("the lease expired before it was renewed")
                return
            try:
                renewed = await self._log.renew_lease(lease, self._config.lease_s)
            except EventLogError as exc:
                logger.warning(
                    "renewing the lease at epoch %d failed: %s", lease.epoch, exc
                )
                continue
            if renewed is None:
                self._engine.step_down("the lease was taken over")
                return
            lease = renewed
            self._engine.renewed(lease)

    async def _tick(self) -> None:
        timers = _Timers(self._engine, self._config)
        while True:
            await asyncio.sleep(self._config.tick_s)
            try:
                await timers.run_due(now_ms())
            except NotLeader:
                return
            except Exception:
                logger.exception("a timer failed at epoch %d", self._engine.epoch)


class _Timers:
    """The leader's timers, derived from the state at every tick."""

    def __init__(self, engine: Engine, config: CoordinatorConfig) -> None:
        self._engine = engine
        self._config = config
        self._next_heartbeat_check = 0
        self._next_trigger: dict[str, int] = {}
        self._snapshot_seq = engine.state.applied_seq
        self._snapshot: asyncio.Task[int | None] | None = None

    async def run_due(self, now: int) -> None:
        engine = self._engine
        if now >= self._next_heartbeat_check:
            self._next_heartbeat_check = now + min(
                1000, int(self._config.heartbeat_interval_s * 1000)
            )
            await engine.execute(
                taskmanagers.decide_check_heartbeats, engine.state.leader_since_ms
            )
        await self._checkpoints_due(now)
        restarting = [
            job_id
            for job_id, job in engine.state.jobs.items()
            if job.status == pb.JOB_RESTARTING and job.restart_at_ms <= now
        ]
        for job_id in restarting:
            await engine.execute(jobs.decide_restart_due, job_id)
        self._maybe_snapshot()

    async def _checkpoints_due(self, now: int) -> None:
        engine = self._engine
        settings = self._config.checkpoints
        timeout_ms = settings.timeout_s * 1000
        expired = [
            cid
            for cid, c in engine.state.checkpoints.items()
            if c.status == pb.CHECKPOINT_PENDING and now - c.triggered_ms >= timeout_ms
        ]
        for cid in expired:
            await engine.execute(checkpoints.decide_expire, cid)
        if settings.interval_s is None:
            return
        interval_ms = int(settings.interval_s * 1000)
        running = [
            job_id
            for job_id, job in engine.state.jobs.items()
            if job.status == pb.JOB_RUNNING
        ]
        for job_id in running:
            due = self._next_trigger.setdefault(job_id, now + interval_ms)
            if now < due:
                continue
            # A fixed rate: a trigger skipped or slowed down does not shift
            # the schedule of the next ones.
            self._next_trigger[job_id] = max(due + interval_ms, now + 1)
            await engine.execute(checkpoints.decide_periodic, job_id)

    def _maybe_snapshot(self) -> None:
        every = self._config.snapshot_every
        if every <= 0 or (self._snapshot is not None and not self._snapshot.done()):
            return
        if self._engine.state.applied_seq - self._snapshot_seq < every:
            return
        self._snapshot_seq = self._engine.state.applied_seq
        self._snapshot = asyncio.create_task(self._engine.snapshot())
        self._snapshot.add_done_callback(_log_snapshot_failure)


def _log_snapshot_failure(task: asyncio.Task[int | None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("snapshot failed: %s", task.exception())
