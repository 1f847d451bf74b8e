"""The core loop of the coordinator: decide, apply, append, reply.

Commands are decided one at a time, in arrival order: deciding and applying
are synchronous, so two decisions never see the same state. The events of a
decision are applied at once and handed to the log; the caller's reply goes
out only once the log reports them durable, and concurrent commands share
one commit. Effects (calls to workers) start only after that, too.

If an append fails or is fenced, the coordinator stops acting as leader at
once, drops its state and rebuilds it from the log before it leads again,
so nothing that was not durable is ever replied or acted on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from coordinator import checkpoints, jobs, reconcile
from coordinator.config import CoordinatorConfig
from coordinator.decision import Context, Decision, Effect
from coordinator.errors import CommandRejected, NotLeader, ReplayError
from coordinator.replay import replay
from coordinator.state import apply
from eventlog import EventLog, EventLogError, Lease, now_ms
from observability import instruments, spans
from protos import jobledger_events_pb2 as pb

logger = logging.getLogger(__name__)

# Rules run in rounds after a decision until they decide nothing more; a
# handful of rounds covers every chain (fail, abort, restart, schedule).
_MAX_RULE_ROUNDS = 8

# Events after which free slots may have changed, so the scheduler runs.
_SLOT_EVENTS = frozenset(
    {
        "task_manager_registered",
        "task_manager_lost",
        "job_submitted",
        "job_restarted",
        "job_failing_over",
        "job_status_changed",
        "task_status_changed",
    }
)

EffectSink = Callable[[list[Effect], int], None]


class Engine:
    """The coordinator's state and the only path by which it changes.

    ``execute`` runs a command while this coordinator leads; ``lead`` and
    ``step_down`` move it between leading and standing by. ``effect_sink``
    receives the effects of each durable decision with the epoch that
    decided them.
    """

    def __init__(
        self,
        log: EventLog,
        config: CoordinatorConfig,
        coordinator_id: str,
        effect_sink: EffectSink | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.log = log
        self.config = config
        self.coordinator_id = coordinator_id
        self.effect_sink = effect_sink
        self._rng = rng or random.Random()
        self.state = pb.CoordinatorState()
        # The state as it was when this coordinator last stopped leading,
        # kept for inspection only.
        self.last_state = self.state
        self.lease: Lease | None = None
        # The epoch this coordinator leads at, or 0 while it is a standby.
        # It copies the lease's, because every traced RPC reads it.
        self.epoch = 0
        self.leader_address = ""
        self._durable_seq = 0
        self._durable = asyncio.Condition()
        # Appends whose callers gave up before they landed, counted on landing.
        self._late_appends: set[asyncio.Task[None]] = set()
        self.lost = asyncio.Event()
        # What the workers reported running since this coordinator took over,
        # and what the state had running then; leader-local, never events.
        self.reported_running: dict[str, set[reconcile.Attempt]] = {}
        self.running_at_takeover: dict[str, set[reconcile.Attempt]] = {}

    # ------------------------------------------------------------ leadership

    @property
    def is_leader(self) -> bool:
        """Whether this coordinator leads and may decide."""
        return self.lease is not None

    async def lead(
        self, lease: Lease, state: pb.CoordinatorState | None = None
    ) -> None:
        """Start deciding at the lease's epoch, from ``state`` or a replay.

        The log already contains the LeaderElected event of ``lease``, and
        ``state``, when given, has applied every event of the log: a
        standby's followed state. Without it the state is replayed.
        """
        self.state = state if state is not None else (await replay(self.log))[0]
        if self.state.epoch != lease.epoch:
            raise ReplayError(
                self.state.applied_seq,
                "leader_elected",
                f"the log's latest epoch is {self.state.epoch}, not the lease's "
                f"{lease.epoch}",
            )
        self._durable_seq = self.state.applied_seq
        self.reported_running = {}
        self.running_at_takeover = reconcile.running_at_takeover(self.state)
        self.lost.clear()
        self.lease = lease
        self.epoch = lease.epoch
        logger.info(
            "coordinator %s leads at epoch %d from seq %d",
            self.coordinator_id,
            lease.epoch,
            self.state.applied_seq,
        )

    def step_down(self, reason: str) -> None:
        """Stop deciding at once and drop the state. Safe to call twice."""
        if self.lease is None:
            return
        logger.warning(
            "coordinator %s stops leading at epoch %d: %s",
            self.coordinator_id,
            self.lease.epoch,
            reason,
        )
        self.lease = None
        self.epoch = 0
        self.last_state = self.state
        self.state = pb.CoordinatorState()
        self.lost.set()

    def leads_at(self, epoch: int) -> bool:
        """Return whether this coordinator still leads at ``epoch``.

        A lease that expired unrenewed (the process was paused, or renewals
        failed) steps down first: another coordinator may lead by now.
        """
        lease = self.lease
        if lease is None or lease.epoch != epoch:
            return False
        if now_ms() >= lease.expires_ms:
            self.step_down("the lease expired before it was renewed")
            return False
        return True

    def record_running(self, tm_id: str, attempts: set[reconcile.Attempt]) -> None:
        """Note the attempts a worker's acknowledged heartbeat listed."""
        if self.lease is not None:
            self.reported_running.setdefault(tm_id, set()).update(attempts)

    def renewed(self, lease: Lease) -> None:
        """Record a renewed lease of the current epoch."""
        if self.lease is not None and self.lease.epoch == lease.epoch:
            self.lease = lease

    # ------------------------------------------------------------ commands

    async def execute(self, decider: Callable[..., Decision], *args: Any) -> Any:
        """Decide a command, apply its events, and return its reply once durable.

        Raises CommandRejected (writing nothing) when the command is
        rejected, and NotLeader when this coordinator does not lead or loses
        the leadership before the events are durable. A reply or rejection
        without events of its own waits until the events it read are
        durable, so it shows nothing that a crash could take back.
        """
        lease = self.lease
        if lease is None or not self.leads_at(lease.epoch):
            raise NotLeader(self.leader_address)
        ctx = Context(self.state, self.config, now_ms(), self._rng)
        try:
            decision = decider(ctx, *args)
        except CommandRejected:
            await self.wait_settled()
            raise
        events, effects = self._apply_decision(ctx, lease.epoch, decision)
        if events:
            await self._append(events, lease.epoch)
            spans.record_events(self.state, events)
        else:
            await self.wait_settled()
        if effects and self.effect_sink is not None:
            self.effect_sink(effects, lease.epoch)
        return decision.reply

    async def execute_at(
        self, epoch: int, decider: Callable[..., Decision], *args: Any
    ) -> Any:
        """Run ``execute`` only while still leading at ``epoch``; else None."""
        if not self.leads_at(epoch):
            return None
        return await self.execute(decider, *args)

    def _apply_decision(
        self, ctx: Context, epoch: int, decision: Decision
    ) -> tuple[list[pb.Event], list[Effect]]:
        """Apply a decision's events, then the rules' events, collecting effects."""
        applied: list[pb.Event] = []
        effects = list(decision.effects)
        pending = decision.events
        try:
            for _ in range(_MAX_RULE_ROUNDS):
                if not pending:
                    break
                touched: set[str] = set()
                slots_changed = False
                for ev in pending:
                    self._apply_one(ctx, epoch, ev, effects)
                    applied.append(ev)
                    body = getattr(ev, ev.WhichOneof("body") or "")
                    job_id = getattr(body, "job_id", "")
                    if job_id:
                        touched.add(job_id)
                    slots_changed |= ev.WhichOneof("body") in _SLOT_EVENTS
                pending = self._run_rules(ctx, sorted(touched), slots_changed)
            else:
                raise RuntimeError("the rules did not settle; a rule keeps deciding")
        except Exception as exc:
            # A live apply that fails is a bug: the state may be half changed,
            # so drop it and rebuild it from the log.
            logger.exception("applying a decision failed at epoch %d", epoch)
            self.step_down(f"applying a decision failed: {exc}")
            raise
        return applied, effects

    def _apply_one(
        self, ctx: Context, epoch: int, ev: pb.Event, effects: list[Effect]
    ) -> None:
        ev.seq = self.state.applied_seq + 1
        ev.epoch = epoch
        ev.timestamp.FromMilliseconds(ctx.now_ms)
        effects += jobs.effects_before(self.state, ev)
        effects += checkpoints.effects_before(self.state, ev)
        apply(self.state, ev)
        effects += jobs.effects_after(self.state, ev)
        effects += checkpoints.effects_after(self.state, ev)

    @staticmethod
    def _run_rules(
        ctx: Context, touched: Iterable[str], slots_changed: bool
    ) -> list[pb.Event]:
        touched = list(touched)
        events = checkpoints.rule_complete(ctx, touched)
        if events:
            return events
        events = jobs.rule_fail_over(ctx, touched)
        if events:
            return events
        events = jobs.rule_finish(ctx, touched)
        if events:
            return events
        if slots_changed:
            return jobs.rule_schedule(ctx)
        return []

    async def _append(self, events: list[pb.Event], epoch: int) -> None:
        expected_first = events[0].seq
        started = time.perf_counter()
        appended: Awaitable[list[int]] | None = None
        try:
            appended = self.log.append(events, epoch)
            # A queued append is shielded: when the caller gives up (its RPC
            # was cancelled), its events are applied already and still land,
            # or fail, later. A coroutine (the in-memory log) runs inline.
            if isinstance(appended, asyncio.Future):
                seqs = await asyncio.shield(appended)
            else:
                seqs = await appended
        except asyncio.CancelledError:
            if isinstance(appended, asyncio.Future):
                late = asyncio.ensure_future(self._land_late(appended, epoch))
                self._late_appends.add(late)
                late.add_done_callback(self._late_appends.discard)
            raise
        except EventLogError as exc:
            self.step_down(f"append failed: {exc}")
            raise NotLeader(self.leader_address) from exc
        instruments.log_append_duration.record(time.perf_counter() - started)
        instruments.log_append_events.record(len(events))
        if seqs[0] != expected_first:
            self.step_down(
                f"the log assigned seq {seqs[0]} where seq {expected_first} was "
                "expected; another writer shares this epoch"
            )
            raise NotLeader(self.leader_address)
        await self._note_durable(seqs[-1])

    async def _land_late(self, appended: asyncio.Future[list[int]], epoch: int) -> None:
        """Count an append whose caller gave up once it lands; step down
        when it fails, since its events are applied already."""
        try:
            seqs = await appended
        except EventLogError as exc:
            if self.epoch == epoch:
                self.step_down(f"append failed after its caller gave up: {exc}")
            return
        if self.epoch == epoch:
            await self._note_durable(seqs[-1])

    async def _note_durable(self, seq: int) -> None:
        async with self._durable:
            self._durable_seq = max(self._durable_seq, seq)
            self._durable.notify_all()

    async def wait_durable(self, seq: int) -> None:
        """Return once every event up to ``seq`` is durable."""
        async with self._durable:
            await self._durable.wait_for(lambda: self._durable_seq >= seq)

    async def wait_settled(self) -> None:
        """Return once every event applied so far is durable.

        Handlers call this after building a reply from the state and before
        sending it, so the reply shows nothing a crash could undo. Raises
        NotLeader when this coordinator does not lead, or stops leading
        before then.
        """
        epoch = self.epoch
        seq = self.state.applied_seq
        if not epoch:
            raise NotLeader(self.leader_address)
        if self._durable_seq >= seq:
            return
        durable = asyncio.ensure_future(self.wait_durable(seq))
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait((durable, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            durable.cancel()
            lost.cancel()
        if self.epoch != epoch or self._durable_seq < seq:
            raise NotLeader(self.leader_address)

    # ------------------------------------------------------------ snapshots

    async def snapshot(self) -> int | None:
        """Save a snapshot of the state at the applied seq, once durable.

        Returns the snapshot's seq, or None when leadership was lost first.
        Compacts the log behind it, keeping ``retain_events`` events.
        """
        lease = self.lease
        if lease is None:
            return None
        started = time.perf_counter()
        snapshot = pb.Snapshot(seq=self.state.applied_seq, epoch=lease.epoch)
        snapshot.state.CopyFrom(self.state)
        snapshot.taken.GetCurrentTime()
        await self.wait_durable(snapshot.seq)
        if self.epoch != lease.epoch:
            return None
        await self.log.save_snapshot(snapshot)
        deleted = await self.log.compact(self.config.retain_events)
        logger.info(
            "snapshot at seq %d saved in %.0f ms; compaction deleted %d events",
            snapshot.seq,
            (time.perf_counter() - started) * 1000,
            deleted,
        )
        return snapshot.seq
