"""Leadership: taking and renewing the lease, timers, and the takeover.

A coordinator stands by, following the log, until it takes the lease,
which increments the epoch and appends a LeaderElected event. It then
applies the events it has not followed yet, reconciles (pending
checkpoints of the old leader are aborted, deployments it may not have
sent are sent again, tasks that are gone fail) and runs the timers that
trigger checkpoints, expire them, declare silent workers lost and restart
failed jobs. Losing the lease, or a fenced append, stops all of that at
once, and the coordinator stands by again on a state rebuilt from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from coordinator import checkpoints, jobs, reconcile, taskmanagers
from coordinator.config import CoordinatorConfig
from coordinator.decision import Context, Decision, Effect
from coordinator.engine import Engine
from coordinator.errors import NotLeader
from coordinator.standby import Follower
from coordinator.workers import WorkerCalls
from eventlog import EventLog, EventLogError, Lease, now_ms
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)

# Seconds a standby waits past the lease's expiry before it takes the lease,
# so that a renewal committed at the last moment is seen first.
_EXPIRY_MARGIN_S = 0.005


def decide_takeover(ctx: Context) -> Decision:
    """Reconcile after a new leader took over from the log's last one.

    Aborts the checkpoints the previous leader left pending (they do not
    count against the tolerance), sends again every deployment that may
    not have reached its worker (deploying the same attempt twice is
    harmless) and notifies the latest completed checkpoint again, so that
    sinks commit what it covers even if the old leader died before the
    notification. Jobs that ended are left alone.
    """
    events: list[pb.Event] = []
    effects: list[Effect] = []
    for job in sorted(ctx.state.jobs.values(), key=lambda j: j.submitted_ms):
        if job.status in jobs.TERMINAL_JOB:
            continue
        events += checkpoints.abort_pending(ctx, job.job_id, "the leader changed")
        deploying = [
            tid for tid, t in sorted(job.tasks.items()) if t.status == pb.TASK_DEPLOYING
        ]
        if deploying:
            effects += jobs.deploy_effects(ctx.state, job, deploying)
        effects += _notify_latest_completed(ctx.state, job)
    return Decision(events, effects=effects)


def _notify_latest_completed(
    state: pb.CoordinatorState, job: pb.JobState
) -> list[Effect]:
    latest = state.checkpoints.get(job.latest_completed_checkpoint_id)
    if latest is None or latest.status != pb.CHECKPOINT_COMPLETED:
        return []
    completed = pb.Event()
    completed.checkpoint_completed.checkpoint_id = latest.checkpoint_id
    completed.checkpoint_completed.job_id = job.job_id
    return checkpoints.effects_after(state, completed)


class Leadership:
    """Runs one coordinator's leadership cycle until ``stop``.

    While standing by, the coordinator follows the log (see ``Follower``),
    records how far it got for the admin overview, and watches the lease,
    waking as it expires so that a dead leader is replaced at once.
    """

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
        self._lease_lost = asyncio.Event()
        # Set to make the renewer return between two renewals.
        self._stop_renewing = asyncio.Event()
        self._follower = Follower(log, engine.coordinator_id)

    async def run(self) -> None:
        """Stand by, lead, and stand by again, until ``stop`` is called."""
        try:
            while not self._stopping.is_set():
                self._follower.start()
                lease = await self._acquire()
                if lease is None:
                    return
                await self._hold(lease)
                await self._workers.cancel_all()
        finally:
            await self._follower.stop()

    def stop(self) -> None:
        """Ask ``run`` to return; the caller then calls ``release``."""
        self._stopping.set()

    async def release(self) -> None:
        """Give up the lease, if held, so a standby takes over at once."""
        lease = self._lease or self._engine.lease
        self._engine.step_down("the coordinator is stopping")
        with contextlib.suppress(EventLogError):
            await self._log.forget_standby(self._engine.coordinator_id)
            if lease is not None:
                await self._log.release_lease(lease)

    async def _acquire(self) -> Lease | None:
        """Stand by until the lease is taken; None once stopping."""
        poll_s = self._config.lease_s / 3
        while not self._stopping.is_set():
            try:
                lease, wait_s = await self._try_acquire(poll_s)
            except EventLogError as exc:
                # NOTE: on the SQLite log, a leader paused (not killed) inside
                # a write transaction keeps the file's write lock, so the
                # lease cannot be taken until that process resumes or dies.
                logger.warning("taking the lease failed: %s", exc)
                lease, wait_s = None, poll_s
            if lease is not None:
                return lease
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait_s)
        return None

    async def _try_acquire(self, poll_s: float) -> tuple[Lease | None, float]:
        """Take the lease if no other holder's is live; else report this
        standby's position and return how long to wait before trying again."""
        coordinator_id = self._engine.coordinator_id
        leader = await self._log.leader()
        now = now_ms()
        if not leader.is_live(now) or leader.holder == coordinator_id:
            lease = await self._log.acquire_lease(
                coordinator_id, self._address, self._config.lease_s
            )
            if lease is not None:
                return lease, 0.0
            leader = await self._log.leader()
        self._engine.leader_address = leader.address
        await self._log.report_standby(
            coordinator_id, self._address, self._follower.followed_seq
        )
        # Wake just after the lease would expire unrenewed, so a dead leader
        # is replaced without waiting for the next poll.
        until_expiry_s = (leader.expires_ms - now_ms()) / 1000 + _EXPIRY_MARGIN_S
        return None, min(poll_s, max(_EXPIRY_MARGIN_S, until_expiry_s))

    async def _hold(self, lease: Lease) -> None:
        """Lead while the lease lasts: renew it, take over, run the timers."""
        self._lease = lease
        self._lease_lost.clear()
        self._engine.leader_address = self._address
        self._stop_renewing.clear()
        renewer = asyncio.create_task(self._renew(), name="renew the lease")
        try:
            # Renewals run during the catch-up, which may need a full replay.
            state = await self._follower.take_over()
            await self._engine.lead(self._lease, state)
            if self._lease_lost.is_set():
                self._engine.step_down("the lease was lost during the takeover")
                return
            with contextlib.suppress(EventLogError):
                await self._log.forget_standby(self._engine.coordinator_id)
            await self._lead()
        finally:
            # The renewer stops between renewals, not inside a transaction.
            self._stop_renewing.set()
            with contextlib.suppress(Exception):
                await renewer
            self._lease = None

    async def _lead(self) -> None:
        try:
            await self._engine.execute(decide_takeover)
        except NotLeader:
            return
        async with asyncio.TaskGroup() as group:
            ticker = group.create_task(self._tick())
            lost = group.create_task(self._engine.lost.wait())
            stopping = group.create_task(self._stopping.wait())
            await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (ticker, lost, stopping):
                task.cancel()

    async def _renew(self) -> None:
        """Renew the lease every third of its duration until it is lost."""
        period_s = self._config.lease_s / 3
        while self._lease is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_renewing.wait(), period_s)
            lease = self._lease
            if self._stop_renewing.is_set() or lease is None:
                return
            if now_ms() >= lease.expires_ms:
                # The process was paused past the lease; another coordinator
                # may lead by now, so stop before doing anything else.
                self._lose_lease("the lease expired before it was renewed")
                return
            try:
                renewed = await self._log.renew_lease(lease, self._config.lease_s)
            except EventLogError as exc:
                logger.warning(
                    "renewing the lease at epoch %d failed: %s", lease.epoch, exc
                )
                continue
            if renewed is None:
                self._lose_lease("the lease was taken over")
                return
            self._lease = renewed
            self._engine.renewed(renewed)

    def _lose_lease(self, reason: str) -> None:
        self._lease_lost.set()
        self._engine.step_down(reason)

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
        self._gone_tasks_checked = False
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
        await self._gone_tasks_due(now)
        await self._checkpoints_due(now)
        restarting = [
            job_id
            for job_id, job in engine.state.jobs.items()
            if job.status == pb.JOB_RESTARTING and job.restart_at_ms <= now
        ]
        for job_id in restarting:
            await engine.execute(jobs.decide_restart_due, job_id)
        self._maybe_snapshot()

    async def _gone_tasks_due(self, now: int) -> None:
        """Once, one heartbeat timeout after the takeover, fail the tasks that
        their workers stopped listing."""
        engine = self._engine
        timeout_ms = int(self._config.heartbeat_timeout_s * 1000)
        if self._gone_tasks_checked or now < engine.state.leader_since_ms + timeout_ms:
            return
        self._gone_tasks_checked = True
        await engine.execute(
            reconcile.decide_gone_tasks,
            engine.running_at_takeover,
            engine.reported_running,
        )

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
