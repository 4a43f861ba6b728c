"""One run of one job: claim it, do the work, record the outcome.

The worker decides, the ledger persists. Every write after the claim is fenced
by the attempt number; the moment one matches no row the run has lost the job
(reaped, cancelled, re-run elsewhere) and it stops: ffmpeg is killed, its
temporary output removed, and nothing more is written.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from ffworker import kinds, media, outputs, paths, process
from ffworker.config import Settings
from ffworker.errors import FencedOut, NotClaimable
from ffworker.kinds.base import INPUT_FORMATS, Output, Plan, PlanError
from ffworker.ledger import Claim, Ledger
from ffworker.progress import Progress

log = logging.getLogger("ffworker.worker")

_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s:'\"/]+/)*[^\s:'\",]*")


class RunFailure(Exception):
    """The run ends failed (or, when retryable and attempts remain, queued again)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, stderr_tail: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.stderr_tail = stderr_tail


class RunStopped(Exception):
    """The run was told to stop: ``reason`` is "cancelled" or "fenced"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def sanitize(text: str, root: Path) -> str:
    """Strip server paths from a message meant for API clients."""
    text = text.replace(f"{root}/", "").replace(str(root), ".")
    text = re.sub(rf"{re.escape(paths.TEMP_MARKER)}[0-9a-f-]+\.\d+\.", "", text)
    return _ABSOLUTE_PATH.sub("<path>", text)


def last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "ffmpeg failed without a message"


PROBE_BATCH = 32   # inputs probed between two heartbeats


@dataclass(frozen=True)
class RunReport:
    outcome: str                  # skipped, completed, failed, retry, cancelled or lost
    row: dict | None = None       # the job as the run left it, when it wrote last
    due_in_s: float | None = None # the message's job is queued, not due yet: the database's remaining delay

    @property
    def retry_in_s(self) -> float | None:
        if self.outcome != "retry" or self.row is None:
            return None
        # Both stamps come from the same statement's database now().
        return max(0.0, (self.row["run_after"] - self.row["updated_at"]).total_seconds())


def run(job_id, ledger: Ledger, settings: Settings) -> RunReport:
    """Claim and run the best eligible job (the ledger picks it; ``job_id``, the message's,
    is not necessarily the job run). A duplicate message, or one that finds nothing
    within the limits, does nothing; when ``job_id`` is queued but not yet due, the report
    carries the database's remaining delay so the message is sent again."""
    try:
        claim = ledger.claim_next(worker_name(), hint=job_id)
    except NotClaimable as exc:
        # This message claimed nothing: there is no attempt of its own to name.
        due_in_s = ledger.due_in_s(job_id) if job_id else None
        why = str(exc) if due_in_s is None else f"job {job_id} is queued but not due for {due_in_s:.3f} s"
        log.info("job=%s attempt=none event=skipped reason=%r", job_id, why)
        return RunReport("skipped", due_in_s=due_in_s)
    early = None
    if job_id is not None and str(claim.job["id"]) != str(job_id):
        early = ledger.due_in_s(job_id)
    job_run = JobRun(claim, ledger, settings)
    outcome = job_run.execute()
    return RunReport(outcome, job_run.final_row, due_in_s=early)


class JobRun:
    """One attempt at one job; also the ``RunContext`` (ffworker.kinds.base) its planner works through."""

    def __init__(self, claim: Claim, ledger: Ledger, settings: Settings) -> None:
        self.job = claim.job
        self.job_id = claim.job["id"]
        self.spec = claim.job["spec"]
        self.token = claim.token
        self.ledger = ledger
        self.settings = settings
        self.root = paths.tenant_root(settings, claim.job["tenant_name"])
        self.deadline = time.monotonic() + claim.job["timeout_s"]
        self.outputs: list[Output] = []
        self.scratch_files: list[Path] = []
        self.final_row: dict | None = None
        self.last_beat = time.monotonic()
        self.progress_written: Progress | None = None
        self.media_duration_s: float | None = None
        self.final_progress: Progress | None = None
        # An earlier attempt died while placing outputs: what it placed is ours to replace.
        self.replaces_own_outputs = claim.job.get("outputs_placed_attempt") is not None

    def log(self, event: str, **fields) -> None:
        details = "".join(f" {k}={v!r}" for k, v in fields.items())
        log.info("job=%s attempt=%s event=%s%s", self.job_id, self.token, event, details)

    # -- the run --------------------------------------------------------

    def execute(self) -> str:
        self.log("claimed", kind=self.job["kind"])
        published = False
        try:
            result = self.perform()
            if self.outputs:  # a cancel seen now still leaves nothing behind
                self.checkpoint(placing_outputs=True)
                outputs.publish(self.outputs, overwrite=self.overwrite)
            published = True
            self.final_row = self.with_db_retries(lambda: self.ledger.complete(
                self.job_id, self.token, result, media_duration_s=self.media_duration_s,
                progress=self.final_progress.as_dict() if self.final_progress else None))
            self.log("completed")
            return "completed"
        except RunStopped as stop:
            return self.stopped(stop.reason)
        except FencedOut:
            return self.stopped("fenced")
        except RunFailure as failure:
            return self.failed(failure)
        except outputs.OutputExists as exc:
            return self.failed(RunFailure("output_exists", exc.message))
        except paths.UnsafePath as exc:
            return self.failed(RunFailure("invalid_request", exc.message))
        except process.ProbeFailed as exc:
            return self.failed(RunFailure("invalid_input", f"cannot read the input: {exc}", stderr_tail=exc.stderr_tail))
        except PlanError as exc:
            return self.failed(RunFailure(exc.code, str(exc)))
        except OSError as exc:
            return self.failed(RunFailure("io_error", f"I/O error: {exc.strerror or exc}", retryable=True))
        except DBAPIError as exc:
            self.log("database_error", error=type(exc.orig or exc).__name__)
            return self.failed(RunFailure("database_error", "the ledger was unreachable", retryable=True))
        finally:
            if not published:
                outputs.discard(self.outputs)
            self.remove_scratch()

    def perform(self) -> dict:
        """Plan with the kind's planner, run ffmpeg, finish, and describe the outputs."""
        kind = kinds.get(self.job["kind"])
        if kind is None:
            raise RunFailure("unsupported_kind", f"this worker cannot run {self.job['kind']!r} jobs")
        plan = kind.plan(self)
        self.media_duration_s = plan.duration_s
        if plan.args is not None:
            # A cancel requested while planning is seen at ffmpeg's first heartbeat.
            self.run_ffmpeg(plan)
        result = dict(plan.result)
        if plan.finish is not None:
            result.update(plan.finish())
        if self.outputs:
            result = {"outputs": [self.describe(output) for output in self.outputs], **result}
        return result

    def run_ffmpeg(self, plan: Plan) -> None:
        outcome = process.run_ffmpeg(
            plan.args, duration_s=plan.duration_s, tick=self.tick,
            tick_interval_s=self.settings.progress_interval_s, timeout_s=self.remaining_s(),
        )
        if outcome.last_progress != self.progress_written:
            self.final_progress = outcome.last_progress  # the completion writes it
        if outcome.stopped == "timeout":
            raise RunFailure("timeout", f"the job ran past its timeout of {self.job['timeout_s']} s",
                             stderr_tail=outcome.stderr_tail)
        if outcome.stopped is not None:
            raise RunStopped(outcome.stopped)
        if outcome.returncode is not None and outcome.returncode < 0:
            raise RunFailure("ffmpeg_killed", f"ffmpeg was killed by signal {-outcome.returncode}",
                             retryable=True, stderr_tail=outcome.stderr_tail)
        if outcome.returncode != 0:
            message = sanitize(last_error_line(outcome.stderr_tail), self.root)
            raise RunFailure("ffmpeg_failed", f"ffmpeg exited with code {outcome.returncode}: {message}",
                             stderr_tail=outcome.stderr_tail)

    # -- ledger writes during the run ---------------------------------

    def tick(self, progress: Progress | None) -> str | None:
        """Heartbeat (with progress when there is new progress); a reason stops ffmpeg."""
        try:
            beat = self.ledger.heartbeat(self.job_id, self.token, progress.as_dict() if progress else None,
                                         media_duration_s=self.media_duration_s)
            if progress is not None:
                self.progress_written = progress
        except FencedOut:
            self.log("fenced_out")
            return "fenced"
        except DBAPIError as exc:
            # A brief database outage must not kill a long encode: the next tick retries.
            self.log("heartbeat_failed", error=type(exc.orig).__name__ if exc.orig else str(exc))
            return None
        return "cancelled" if beat.cancel_requested else None

    def checkpoint(self, **columns) -> None:
        """A fenced heartbeat between steps: stop here if the job was cancelled or lost."""
        beat = self.with_db_retries(lambda: self.ledger.heartbeat(self.job_id, self.token, **columns))
        self.last_beat = time.monotonic()
        if beat.cancel_requested:
            raise RunStopped("cancelled")

    def keep_alive(self) -> None:
        """During long planning (probing 100 inputs): a checkpoint once per progress interval."""
        if time.monotonic() - self.last_beat >= self.settings.progress_interval_s:
            self.checkpoint()

    def with_db_retries(self, write, attempts: int = 5):
        """Retry an idempotent ledger write through a brief database outage."""
        for attempt in range(1, attempts + 1):
            try:
                return write()
            except DBAPIError:
                if attempt == attempts:
                    raise
                time.sleep(min(5.0, 0.2 * 2 ** attempt))

    # -- endings ----------------------------------------------------------

    def stopped(self, reason: str) -> str:
        outputs.discard(self.outputs)
        if reason == "cancelled":
            try:
                self.final_row = self.with_db_retries(lambda: self.ledger.record_cancelled(self.job_id, self.token))
            except FencedOut:
                return self.stopped("fenced")
            self.log("cancelled")
            return "cancelled"
        self.log("lost", reason=reason)
        return "lost"

    def failed(self, failure: RunFailure) -> str:
        outputs.discard(self.outputs)
        try:
            row = self.with_db_retries(lambda: self.ledger.fail(
                self.job_id, self.token, code=failure.code, message=failure.message,
                stderr_tail=failure.stderr_tail, retryable=failure.retryable,
            ))
        except FencedOut:
            return self.stopped("fenced")
        self.final_row = row
        # A cancel requested before the failure ends the job cancelled (ledger.fail decides).
        outcome = {"queued": "retry", "cancelled": "cancelled"}.get(row["status"], "failed")
        self.log(outcome, code=failure.code, message=failure.message)
        return outcome

    # -- the planner's context (ffworker.kinds.base.RunContext) ---------------

    def input(self, user_path: str) -> Path:
        return paths.input_path(self.root, user_path)

    def probe(self, path: Path, *, extradata_hash: bool = False) -> dict:
        return self.probe_many([path], extradata_hash=extradata_hash)[0]

    def probe_many(self, sources: list[Path], *, extradata_hash: bool = False) -> list[dict]:
        """ffprobe every source (side by side), heartbeating between batches."""
        probes: list[dict] = []
        for start in range(0, len(sources), PROBE_BATCH):
            self.keep_alive()
            batch = [str(path) for path in sources[start:start + PROBE_BATCH]]
            try:
                probes += process.ffprobe_many(batch, timeout_s=max(1.0, self.remaining_s()),
                                               formats=INPUT_FORMATS, extradata_hash=extradata_hash)
            except process.ProbeFailed as exc:
                exc.index += start
                raise
        return probes

    def output(self, user_path: str, suffixes: frozenset[str] | None = None) -> Output:
        final = paths.output_path(self.root, user_path, overwrite=self.overwrite, suffixes=suffixes)
        if any(output.final == final for output in self.outputs):
            raise RunFailure("invalid_request", f"output {user_path!r} is named twice")
        final.parent.mkdir(parents=True, exist_ok=True)
        output = Output(user_path, final, self.temp_name(final))
        self.outputs.append(output)
        return output

    def output_dir(self, user_path: str, *, entry: str, formats: str) -> Output:
        final = paths.output_dir_path(self.root, user_path, overwrite=self.overwrite)
        final.parent.mkdir(parents=True, exist_ok=True)
        output = Output(user_path, final, self.temp_name(final), is_dir=True, entry=entry, formats=formats)
        self.outputs.append(output)
        output.temp.mkdir()
        return output

    def scratch(self, beside: Path, suffix: str) -> Path:
        path = self.temp_name(beside.with_name(beside.name + suffix))
        self.scratch_files.append(path)
        return path

    @property
    def overwrite(self) -> bool:
        """May outputs replace existing files: asked for, or those files are this job's own."""
        return bool(self.spec.get("overwrite", False)) or self.replaces_own_outputs

    def temp_name(self, final: Path) -> Path:
        return paths.temp_path_for(final, str(self.job_id), self.token)

    # -- outputs ------------------------------------------------------------

    def describe(self, output: Output) -> dict:
        try:
            probe = process.ffprobe(str(output.described_path), timeout_s=max(5.0, self.remaining_s()),
                                    formats=output.formats)
        except process.ProbeFailed as exc:
            raise RunFailure("ffmpeg_failed", f"ffmpeg wrote an output that ffprobe cannot read: "
                                              f"{output.described_user_path!r}", stderr_tail=exc.stderr_tail) from None
        size = outputs.size_bytes(output.temp)
        return media.output_summary(output.described_user_path, probe, size)

    def remove_scratch(self) -> None:
        for path in self.scratch_files:
            outputs.remove(path)

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())
