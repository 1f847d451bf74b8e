"""The client subcommands of the ``jobledger`` command line.

``submit``, ``jobs``, ``job``, ``checkpoints``, ``checkpoint``, ``recover``,
``cancel`` and ``taskmanagers`` call a running coordinator. ``events`` and
``replay`` read a log file directly and never write to it. Each command
prints a table, or JSON with ``--json``. A failure is one line on standard
error and exit status 1 (the coordinator rejected the request, or the log
file cannot be read), 2 (invalid arguments or job spec) or 3 (no leading
coordinator reachable).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from coordinator import client_output as out
from coordinator.client_calls import (
    DEFAULT_COORDINATOR,
    EXIT_FAILED,
    EXIT_USAGE,
    CliError,
    CoordinatorClient,
    parse_addresses,
)
from coordinator.jobs import slots_free
from coordinator.jobspec import JobSpecError, load_job_graph
from coordinator.logreader import LogFile, LogFileError, rebuild_state
from protos import jobledger_events_pb2 as pb
from protos import jobledger_services_pb2 as svc
from protos import jobledger_services_pb2_grpc as svc_grpc
from protos import jobmanager_internal_pb2 as fpb
from protos import jobmanager_internal_pb2_grpc as fpb_grpc

Handler = Callable[[argparse.Namespace], int]

EXIT_STATUS_HELP = (
    "exit status: 0 done, 1 rejected by the coordinator or unreadable log file, "
    "2 invalid arguments or job spec, 3 no leading coordinator reachable"
)
_JOB_HELP = "the job id that `jobledger submit` printed"
# Seconds between two polls of a checkpoint's status.
_POLL_S = 0.2


def _addresses(text: str) -> list[str]:
    try:
        return parse_addresses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _seq(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a seq; give 1 or more")
    return value


def _remote_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--coordinator",
        type=_addresses,
        default=[DEFAULT_COORDINATOR],
        metavar="HOST:PORT[,HOST:PORT...]",
        help="coordinators to try in order; a standby's leader is followed "
        f"(default {DEFAULT_COORDINATOR})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="seconds to wait for each reply (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _log_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--db", required=True, help="path of the coordinator's SQLite event log"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def add_client_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the client subcommands; each handler returns the exit status."""
    remote = [_remote_options()]
    add = functools.partial(
        commands.add_parser, parents=remote, epilog=EXIT_STATUS_HELP
    )
    parser = add("submit", help="submit a job from a YAML or JSON job spec")
    parser.add_argument("spec", help="the job spec file (.yaml, .yml or .json)")
    parser.set_defaults(handler=_guarded(_submit))
    parser = add("jobs", help="list the jobs")
    parser.set_defaults(handler=_guarded(_jobs))
    parser = add("job", help="show a job and its tasks")
    parser.add_argument("job_id", metavar="JOB", help=_JOB_HELP)
    parser.set_defaults(handler=_guarded(_job))
    parser = add("checkpoints", help="list a job's checkpoints")
    parser.add_argument("job_id", metavar="JOB", help=_JOB_HELP)
    parser.set_defaults(handler=_guarded(_checkpoints))
    parser = add("checkpoint", help="trigger a checkpoint of a job now")
    parser.add_argument("job_id", metavar="JOB", help=_JOB_HELP)
    parser.add_argument(
        "--wait",
        type=_positive,
        metavar="SECONDS",
        help="wait up to SECONDS for the checkpoint to complete; exit 1 if it "
        "fails or is still pending then",
    )
    parser.set_defaults(handler=_guarded(_checkpoint))
    parser = add("recover", help="restart a job from a completed checkpoint")
    parser.add_argument("job_id", metavar="JOB", help=_JOB_HELP)
    parser.add_argument(
        "--checkpoint",
        type=int,
        default=0,
        metavar="N",
        help="the completed checkpoint to restore (default: the latest)",
    )
    parser.set_defaults(handler=_guarded(_recover))
    parser = add("cancel", help="cancel a job")
    parser.add_argument("job_id", metavar="JOB", help=_JOB_HELP)
    parser.set_defaults(handler=_guarded(_cancel))
    parser = add("taskmanagers", help="list the task managers")
    parser.set_defaults(handler=_guarded(_task_managers))
    _add_log_parsers(commands)


def _add_log_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    log = [_log_options()]
    parser = commands.add_parser(
        "events",
        parents=log,
        epilog=EXIT_STATUS_HELP,
        help="print the events of a log file (read-only)",
    )
    parser.add_argument(
        "--from",
        dest="from_seq",
        type=_seq,
        metavar="SEQ",
        help="first seq to print (default: the oldest event compaction kept)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep printing new events as they commit, until interrupted",
    )
    parser.set_defaults(handler=_guarded(_events))
    parser = commands.add_parser(
        "replay",
        parents=log,
        epilog=EXIT_STATUS_HELP,
        help="rebuild the state from a log file offline and print it (read-only)",
    )
    parser.set_defaults(handler=_guarded(_replay))


def _guarded(run: Handler) -> Handler:
    """Print a CliError as one line on standard error; return its status."""

    @functools.wraps(run)
    def handle(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CliError as exc:
            print(f"jobledger {args.command}: {exc}", file=sys.stderr)
            return exc.exit_status
        except JobSpecError as exc:
            print(f"jobledger {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except LogFileError as exc:
            print(f"jobledger {args.command}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except BrokenPipeError:
            # The reader of the output went away, as `| head` does: not an error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0

    return handle


def _emit(args: argparse.Namespace, data: object, text: str) -> int:
    print(out.dumps(data) if args.json else text)
    return 0


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return CoordinatorClient(args.coordinator, args.timeout)


def _admin(args: argparse.Namespace, method: str, request: Any) -> Any:
    with _client(args) as client:
        return client.call(svc_grpc.AdminServiceStub, method, request)


def _job_manager(args: argparse.Namespace, method: str, request: Any) -> Any:
    with _client(args) as client:
        return client.call(fpb_grpc.JobManagerInternalServiceStub, method, request)


# ------------------------------------------------------------------ commands


def _submit(args: argparse.Namespace) -> int:
    graph = load_job_graph(args.spec)
    reply = _job_manager(args, "SubmitJob", fpb.SubmitJobRequest(job_graph=graph))
    if not reply.success:
        raise CliError(
            f"the coordinator did not accept job {graph.job_name!r}: {reply.message}"
        )
    data = {
        "job_id": reply.job_id,
        "job_name": graph.job_name,
        "message": reply.message,
    }
    return _emit(args, data, f"job {reply.job_id} submitted ({graph.job_name})")


def _jobs(args: argparse.Namespace) -> int:
    reply = _admin(args, "ListJobs", svc.ListJobsRequest())
    data = [out.job_summary_json(job) for job in reply.jobs]
    return _emit(args, data, out.jobs_table(reply.jobs))


def _job(args: argparse.Namespace) -> int:
    job = _admin(args, "GetJob", svc.GetJobRequest(job_id=args.job_id))
    return _emit(args, out.job_json(job), out.job_text(job))


def _checkpoints(args: argparse.Namespace) -> int:
    request = svc.ListCheckpointsRequest(job_id=args.job_id)
    reply = _admin(args, "ListCheckpoints", request)
    data = [out.checkpoint_json(c) for c in reply.checkpoints]
    return _emit(args, data, out.checkpoints_table(reply.checkpoints))


def _checkpoint(args: argparse.Namespace) -> int:
    request = fpb.RequestCheckpointRequest(job_id=args.job_id)
    with _client(args) as client:
        reply = client.call(
            fpb_grpc.JobManagerInternalServiceStub, "RequestCheckpoint", request
        )
        if not reply.accepted or not reply.checkpoint_ids:
            raise CliError(
                f"the coordinator triggered no checkpoint of job {args.job_id}"
            )
        checkpoint_id = reply.checkpoint_ids[0]
        if args.wait is None:
            data = {"job_id": args.job_id, "checkpoint_id": checkpoint_id}
            text = f"checkpoint {checkpoint_id} of job {args.job_id} triggered"
            return _emit(args, data, text)
        summary = _wait_for_checkpoint(client, args.job_id, checkpoint_id, args.wait)
    data = {"job_id": args.job_id, **out.checkpoint_json(summary)}
    text = (
        f"checkpoint {checkpoint_id} of job {args.job_id} completed in "
        f"{summary.duration_ms} ms ({summary.acknowledged_tasks} tasks, "
        f"{summary.size} bytes)"
    )
    return _emit(args, data, text)


def _wait_for_checkpoint(
    client: CoordinatorClient, job_id: str, checkpoint_id: int, wait_s: float
) -> svc.CheckpointSummary:
    """Poll until the checkpoint has completed; raise CliError when it failed
    or is still pending after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    request = svc.ListCheckpointsRequest(job_id=job_id)
    while True:
        reply: svc.ListCheckpointsResponse = client.call(
            svc_grpc.AdminServiceStub, "ListCheckpoints", request
        )
        found = [c for c in reply.checkpoints if c.checkpoint_id == checkpoint_id]
        if found and found[0].status == pb.CHECKPOINT_FAILED:
            failure = found[0]
            raise CliError(
                f"checkpoint {checkpoint_id} of job {job_id} failed: "
                f"{out.checkpoint_failure(failure.failure)} "
                f"{failure.failure_message}".rstrip()
            )
        # A discarded checkpoint completed before newer ones subsumed it.
        if found and found[0].status != pb.CHECKPOINT_PENDING:
            return found[0]
        if time.monotonic() >= deadline:
            raise CliError(
                f"checkpoint {checkpoint_id} of job {job_id} has not completed after "
                f"{wait_s:g} s; follow it with `jobledger checkpoints {job_id}`"
            )
        time.sleep(_POLL_S)


def _recover(args: argparse.Namespace) -> int:
    if args.checkpoint < 0:
        raise CliError(
            f"--checkpoint {args.checkpoint} is negative; give a checkpoint id, or "
            "leave it out for the latest",
            EXIT_USAGE,
        )
    request = fpb.RequestRecoveryRequest(
        job_id=args.job_id, checkpoint_id=args.checkpoint
    )
    reply = _job_manager(args, "RequestRecovery", request)
    if not reply.recovery_initiated:
        raise CliError(
            f"the coordinator did not start the recovery of job {args.job_id}"
        )
    data = {"job_id": args.job_id, "checkpoint_id": reply.checkpoint_id}
    text = f"job {args.job_id} recovering from checkpoint {reply.checkpoint_id}"
    return _emit(args, data, text)


def _cancel(args: argparse.Namespace) -> int:
    reply = _admin(args, "CancelJob", svc.CancelJobRequest(job_id=args.job_id))
    status = out.job_status(reply.status)
    data = {"job_id": args.job_id, "status": status}
    return _emit(args, data, f"job {args.job_id} {status}")


def _task_managers(args: argparse.Namespace) -> int:
    reply = _admin(args, "ListTaskManagers", svc.ListTaskManagersRequest())
    data = [out.task_manager_json(s) for s in reply.task_managers]
    return _emit(args, data, out.task_managers_table(reply.task_managers))


def _events(args: argparse.Namespace) -> int:
    with LogFile(args.db) as log:
        from_seq = args.from_seq or log.compacted_through() + 1
        if args.follow:
            _print_events(args, log.follow(from_seq), follow=True)
        else:
            _print_events(args, log.read(from_seq), follow=False)
    return 0


def _print_events(
    args: argparse.Namespace, events: Iterable[pb.Event], follow: bool
) -> None:
    """Print JSON Lines with ``--json``, else a table; when following, one
    line per event, flushed, under a header printed first."""
    if args.json:
        for event in events:
            print(json.dumps(out.event_json(event)), flush=follow)
        return
    if follow:
        widths = (8, 6, 19, 24)
        print(_fixed_row(out.EVENT_HEADERS, widths), flush=True)
        for event in events:
            print(_fixed_row(out.event_row(event), widths), flush=True)
        return
    rows = [out.event_row(event) for event in events]
    print(out.table(out.EVENT_HEADERS, rows) if rows else "no events")


def _fixed_row(cells: Iterable[object], widths: tuple[int, ...]) -> str:
    texts = [str(cell) for cell in cells]
    padded = [text.ljust(width) for text, width in zip(texts, widths, strict=False)]
    return "  ".join([*padded, *texts[len(widths) :]]).rstrip()


def _replay(args: argparse.Namespace) -> int:
    with LogFile(args.db) as log:
        state, snapshot_seq, applied = rebuild_state(log)
    return _emit(
        args,
        _replay_json(args.db, state, snapshot_seq, applied),
        _replay_text(args.db, state, snapshot_seq, applied),
    )


def _replay_parts(
    state: pb.CoordinatorState,
) -> tuple[
    list[svc.JobSummary], list[svc.TaskManagerSummary], list[svc.CheckpointSummary]
]:
    jobs = sorted(state.jobs.values(), key=lambda job: job.submitted_ms)
    free = slots_free(state)
    task_managers = [
        svc.TaskManagerSummary(task_manager=tm, slots_free=free.get(tm_id, 0))
        for tm_id, tm in sorted(state.task_managers.items())
    ]
    checkpoints = [
        out.summarize_checkpoint(c) for _, c in sorted(state.checkpoints.items())
    ]
    return [out.summarize_job(job) for job in jobs], task_managers, checkpoints


def _replay_json(
    path: str, state: pb.CoordinatorState, snapshot_seq: int, applied: int
) -> dict[str, Any]:
    jobs, task_managers, checkpoints = _replay_parts(state)
    managers = [out.task_manager_json(s) for s in task_managers]
    return {
        "log": path,
        "snapshot_seq": snapshot_seq,
        "events_applied": applied,
        "applied_seq": state.applied_seq,
        "epoch": state.epoch,
        "leader_id": state.leader_id,
        "leader_address": state.leader_address,
        "last_checkpoint_id": state.last_checkpoint_id,
        "jobs": [out.job_summary_json(job) for job in jobs],
        "task_managers": managers,
        "checkpoints": [
            {
                "job_id": state.checkpoints[c.checkpoint_id].job_id,
                **out.checkpoint_json(c),
            }
            for c in checkpoints
        ],
    }


def _replay_text(
    path: str, state: pb.CoordinatorState, snapshot_seq: int, applied: int
) -> str:
    jobs, task_managers, checkpoints = _replay_parts(state)
    header = (
        f"log {path}: snapshot at seq {snapshot_seq or '-'}, {applied} events "
        f"applied, state at seq {state.applied_seq}\n"
        f"leader {state.leader_id or '-'} ({state.leader_address or '-'}) at "
        f"epoch {state.epoch}"
    )
    return "\n\n".join(
        [
            header,
            out.jobs_table(jobs),
            out.task_managers_table(task_managers),
            out.checkpoints_table(checkpoints),
        ]
    )
