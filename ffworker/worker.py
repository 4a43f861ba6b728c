"""One run of one job: claim it, do the work, record the outcome.

The worker decides, the ledger persists. Every write after the claim is fenced
by the attempt number; the moment one matches no row the run has lost the job
(reaped, cancelled, re-run elsewhere) and it stops: ffmpeg is killed, its
temporary output removed, and nothing more is written.

With object storage (``FFWORKER_STORAGE_URL``) a run works in a scratch directory of its
own instead of the tenant's media directory: ``ffworker.staging`` downloads its inputs and
uploads its outputs, within the placement step.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from ffworker import fetch, isobmff, kinds, media, outputs, paths, process, s3, staging
from ffworker.config import Settings
from ffworker.errors import FencedOut, NotClaimable
from ffworker.kinds.base import INPUT_FORMATS, Output, Plan, PlanError
from ffworker.ledger import Claim, Ledger, ProbeKey
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


class Beats:
    """What a step's heartbeat thread saw: ``reason`` to stop ("cancelled" or "fenced"), and
    ``stop`` set along with it, for a subprocess to be killed at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reason: str | None = None


class RunStopped(Exception):
    """The run was told to stop: ``reason`` is "cancelled" or "fenced"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Which OSErrors are worth another attempt, by errno: True = transient (retried with
# backoff while attempts remain), False = deterministic (the same request on the same
# files fails the same way: fail at once). An errno missing from the table counts as
# transient: a wrong guess then costs at most max_attempts runs, never a job lost to a blip.
OS_ERRORS: dict[int, bool] = {
    # The request or the tenant's files: no retry changes them.
    errno.ENOTDIR: False,       # a directory on the way is a file
    errno.EISDIR: False,        # a file name is a directory
    errno.EEXIST: False,        # something took the name
    errno.ENAMETOOLONG: False,  # a name (or the in-flight name beside it) exceeds NAME_MAX
    errno.ENOENT: False,        # an input or a directory went away
    errno.ELOOP: False,         # a symlink loop
    errno.EACCES: False,        # permissions: an operator must change them
    errno.EPERM: False,
    errno.EROFS: False,         # the media store is mounted read-only: an operator's matter
    errno.EINVAL: False,
    errno.EFBIG: False,         # larger than the filesystem allows
    errno.EXDEV: False,         # a rename across filesystems never works
    errno.ENOTEMPTY: False,
    errno.EMLINK: False,
    # The machine or the store, for now: worth another attempt, maybe on another host.
    errno.EIO: True,
    errno.ENOSPC: True,         # space is freed by retention and by operators
    errno.EDQUOT: True,
    errno.EAGAIN: True,
    errno.EINTR: True,
    errno.ENOMEM: True,
    errno.ENFILE: True,
    errno.EMFILE: True,
    errno.EBUSY: True,
    errno.ETXTBSY: True,
    errno.ESTALE: True,         # NFS handle gone stale: a fresh lookup works
    errno.ETIMEDOUT: True,
    errno.ENOLCK: True,
    errno.ECONNRESET: True,
    errno.EHOSTUNREACH: True,
    errno.ENETUNREACH: True,
}


def os_error_is_transient(exc: OSError) -> bool:
    return OS_ERRORS.get(exc.errno, True)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Size, mtime and inode: what moving a file into place leaves as it was."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


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



def object_probe_key(relative: str, identity: staging.ObjectIdentity, options: str) -> ProbeKey:
    """The probe-cache key of an object: its size, Last-Modified and ETag in the columns a local
    file's stat fills. The ctime -1, which no file has, keeps it from ever equalling a file's."""
    return ProbeKey(relative, identity.size, identity.mtime_ns, -1, identity.etag_digest, options)


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
    started = time.monotonic()
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
    job_run.phases["claim"] = time.monotonic() - started
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
        # With object storage the run works in a scratch directory of its own (``stage_media``)
        # and never touches the local media root.
        self.stage: staging.Stage | None = None
        self.root = None if s3.bucket(settings) else paths.tenant_root(settings, claim.job["tenant_name"])
        self.deadline = time.monotonic() + claim.job["timeout_s"]
        self.outputs: list[Output] = []
        self.scratch_files: list[Path] = []
        self.final_row: dict | None = None
        # When the ledger last took a write of this run (the claim counts): the claim
        # stays valid until the heartbeat it stamped is older than the stale threshold.
        self.last_write = time.monotonic()
        self.progress_written: Progress | None = None
        self.media_duration_s: float | None = None
        self.final_progress: Progress | None = None
        self.outputs_already_placed = False
        self.swept_dirs: set[Path] = set()
        self.scratch_dir: Path | None = None   # downloaded URL inputs (ffworker.fetch)
        self.downloads = 0
        # An earlier attempt died while placing outputs: what it placed is ours to replace.
        self.replaces_own_outputs = claim.job.get("outputs_placed_attempt") is not None
        # Seconds spent per step of the run (logged with its completion; bench/overhead reads them).
        self.phases: dict[str, float] = {}
        self.described_probes: list[tuple[Output, tuple[int, int, int], dict]] = []
        self.probes_to_store: list[tuple[ProbeKey, dict]] = []

    @contextmanager
    def phase(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - started

    def log(self, event: str, **fields) -> None:
        details = "".join(f" {k}={v!r}" for k, v in fields.items())
        log.info("job=%s attempt=%s event=%s%s", self.job_id, self.token, event, details)

    # -- the run --------------------------------------------------------

    def execute(self) -> str:
        """The run and its one outcome write; whatever happens, its files are cleaned up after."""
        self.log("claimed", kind=self.job["kind"])
        try:
            return self.outcome()
        finally:
            self.cleanup()

    def outcome(self) -> str:
        try:
            result = self.perform()
            if self.outputs_already_placed:
                self.discard_outputs()  # the planner's temp names: nothing was written to them
            elif self.outputs:
                # The placement checkpoint records what is being placed, so that a later
                # attempt can complete from placed outputs instead of encoding again.
                # A cancel seen now still leaves nothing behind.
                with self.phase("checkpoint"):
                    self.checkpoint(placing_outputs=True, placed_result=result)
                with self.phase("place"), self.heartbeating() as beats:  # swapping an HLS ladder removes the old one
                    outputs.publish(self.outputs, overwrite=self.overwrite)
                    if self.stage is not None:
                        self.upload(beats)
            self.published = True
            with self.phase("complete"):
                self.final_row = self.with_db_retries(lambda: self.ledger.complete(
                    self.job_id, self.token, result, media_duration_s=self.media_duration_s,
                    progress=self.final_progress.as_dict() if self.final_progress else None))
            self.log("completed", phases_ms={name: round(1000 * s, 1) for name, s in self.phases.items()})
            # After the completion nothing may change the run's outcome: a failure here is logged.
            self.quietly("remember_probes", self.remember_probes)
            return "completed"
        except RunStopped as stop:
            return self.stopped(stop.reason)
        except FencedOut:
            return self.stopped("fenced")
        except RunFailure as failure:
            return self.failed(failure)
        except staging.StorageFailed as exc:
            return self.failed(RunFailure(exc.code, exc.message, retryable=exc.retryable))
        except outputs.OutputExists as exc:
            return self.failed(RunFailure("output_exists", exc.message))
        except paths.UnsafePath as exc:
            return self.failed(RunFailure("invalid_request", exc.message))
        except process.ProbeFailed as exc:
            return self.failed(RunFailure("invalid_input", f"cannot read the input: {exc}", stderr_tail=exc.stderr_tail))
        except PlanError as exc:
            return self.failed(RunFailure(exc.code, str(exc)))
        except OSError as exc:
            return self.failed(RunFailure("io_error", f"I/O error: {exc.strerror or exc}",
                                          retryable=os_error_is_transient(exc)))
        except DBAPIError as exc:
            self.log("database_error", error=type(exc.orig or exc).__name__)
            return self.failed(RunFailure("database_error", "the ledger was unreachable", retryable=True))
        except Exception as exc:
            # A fault of ffworker itself: one failed write, not a job left running for the reaper.
            return self.failed(self.internal_error(exc))

    published = False

    def perform(self) -> dict:
        """Plan with the kind's planner, run ffmpeg, finish, and describe the outputs."""
        kind = kinds.get(self.job["kind"])
        if kind is None:
            raise RunFailure("unsupported_kind", f"this worker cannot run {self.job['kind']!r} jobs")
        if self.root is None:
            self.stage_media()
        with self.phase("plan"):
            plan = kind.plan(self)
        self.media_duration_s = plan.duration_s
        placed = self.predecessors_result()
        if placed is not None:
            self.outputs_already_placed = True
            self.log("outputs_reused", placed_by=self.job["outputs_placed_attempt"])
            return placed
        if plan.args is not None:
            # A cancel requested while planning is seen at ffmpeg's first heartbeat.
            self.run_ffmpeg(plan)
        result = dict(plan.result)
        if plan.finish is not None:
            with self.heartbeating():
                result.update(plan.finish())
            if self.remaining_s() <= 0:
                raise self.timed_out()
        if self.outputs:
            with self.phase("describe"), self.heartbeating() as beats:
                described = [self.describe(output, beats=beats) for output in self.outputs]
            result = {"outputs": described, **result}
        return result

    def stage_media(self) -> None:
        """Object storage: a scratch directory of this attempt's own plays the tenant's media
        directory (inputs are downloaded into it, outputs uploaded from it)."""
        self.stage = staging.Stage(self.settings, self.job["tenant_name"], str(self.job_id), self.token)
        self.root = self.stage.root

    def upload(self, beats: Beats) -> None:
        """Object storage: the placed outputs into the bucket, before the completion is recorded."""
        with self.phase("upload"):
            try:
                self.stage.upload(self.outputs, overwrite=self.overwrite, stop=beats.stop, deadline=self.deadline)
            except staging.TransferStopped:
                if beats.reason is None:
                    raise self.timed_out() from None
                # Stopped by a cancel or a lost fence: leaving the heartbeating block raises RunStopped.

    def run_ffmpeg(self, plan: Plan) -> None:
        with self.phase("ffmpeg"):
            outcome = process.run_ffmpeg(
                plan.args, duration_s=plan.duration_s, tick=self.tick,
                tick_interval_s=self.settings.progress_interval_s, timeout_s=self.remaining_s(),
            )
        if outcome.last_progress != self.progress_written:
            self.final_progress = outcome.last_progress  # the completion writes it
        if outcome.stopped == "timeout":
            raise self.timed_out(outcome.stderr_tail)
        if outcome.stopped is not None:
            raise RunStopped(outcome.stopped)
        if outcome.returncode is not None and outcome.returncode < 0:
            raise RunFailure("ffmpeg_killed", f"ffmpeg was killed by signal {-outcome.returncode}",
                             retryable=True, stderr_tail=outcome.stderr_tail)
        if outcome.returncode != 0:
            message = sanitize(last_error_line(outcome.stderr_tail), self.root)
            raise RunFailure("ffmpeg_failed", f"ffmpeg exited with code {outcome.returncode}: {message}",
                             stderr_tail=outcome.stderr_tail)

    def timed_out(self, stderr_tail: str | None = None) -> RunFailure:
        return RunFailure("timeout", f"the job ran past its timeout of {self.job['timeout_s']} s",
                          stderr_tail=stderr_tail)

    def internal_error(self, exc: Exception) -> RunFailure:
        trace = traceback.format_exc()
        log.error("job=%s attempt=%s event=internal_error error=%s\n%s",
                  self.job_id, self.token, type(exc).__name__, trace)
        return RunFailure("internal_error", f"the worker failed unexpectedly ({type(exc).__name__}); "
                                            "the details are in its log",
                          stderr_tail=trace[-process.STDERR_TAIL_BYTES:])

    # -- ledger writes during the run ---------------------------------

    def tick(self, progress: Progress | None) -> str | None:
        """Heartbeat (with progress when there is new progress); a reason stops ffmpeg."""
        try:
            with self.phase("heartbeats"):
                beat = self.ledger.heartbeat(self.job_id, self.token, progress.as_dict() if progress else None,
                                             media_duration_s=self.media_duration_s)
            self.last_write = time.monotonic()
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
        if beat.cancel_requested:
            raise RunStopped("cancelled")

    @contextmanager
    def heartbeating(self):
        """Heartbeat once per progress interval while a long step runs without ffmpeg's
        ticks (probing, finishing, describing, placing). A cancel or a lost fence seen
        meanwhile sets the yielded ``Beats.stop`` (ffprobe watches it) and stops the run
        when the step ends."""
        beats = Beats()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.progress_interval_s):
                reason = self.tick(None)
                if reason is not None:
                    beats.reason = reason
                    beats.stop.set()
                    return

        beater = threading.Thread(target=beat, name=f"heartbeat-{self.job_id}", daemon=True)
        beater.start()
        try:
            yield beats
        finally:
            done.set()
            beater.join()
        if beats.reason is not None:
            raise RunStopped(beats.reason)

    def claim_valid_until(self) -> float:
        """Until when (monotonic) this run's claim can still hold: the reaper takes it
        only once the last heartbeat the ledger took is older than the stale threshold."""
        return self.last_write + self.settings.stale_after_s - self.settings.progress_interval_s

    def with_db_retries(self, write):
        """Retry an idempotent ledger write through a database outage, for as long as
        the claim can still be valid: giving up earlier would throw away finished work
        (an encode whose outputs are placed) that the ledger would still accept."""
        delay = 0.2
        while True:
            try:
                row = write()
            except DBAPIError as exc:
                if time.monotonic() + delay >= self.claim_valid_until():
                    raise
                self.log("ledger_write_retry", error=type(exc.orig or exc).__name__)
                time.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            self.last_write = time.monotonic()
            return row

    # -- endings ----------------------------------------------------------

    def stopped(self, reason: str) -> str:
        self.discard_outputs()
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
        self.discard_outputs()
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
        if fetch.is_url(user_path):
            return self.download(user_path)
        if self.stage is not None:
            return self.fetch_object(user_path)
        return paths.input_path(self.root, user_path)

    def fetch_object(self, user_path: str) -> Path:
        """Object storage: the tenant's file, downloaded into this run's scratch root (once)."""
        with self.phase("fetch"), self.heartbeating() as beats:
            try:
                path = self.stage.fetch(user_path, stop=beats.stop, deadline=self.deadline)
            except staging.TransferStopped:
                if beats.reason is None:
                    raise self.timed_out() from None
                path = None  # stopped by a cancel or a lost fence: leaving the block raises RunStopped
        return path

    def download(self, url: str) -> Path:
        """A URL input, downloaded to this run's scratch directory (removed in ``cleanup``)."""
        if self.scratch_dir is None:
            self.scratch_dir = (self.stage.downloads_dir() if self.stage is not None
                                else fetch.scratch_dir(str(self.job_id), self.token))
        self.downloads += 1
        with self.heartbeating() as beats:
            try:
                path = fetch.download(url, self.scratch_dir, self.downloads,
                                      policy=fetch.UrlPolicy.from_settings(self.settings),
                                      max_bytes=self.settings.max_upload_bytes, deadline=self.deadline,
                                      stop=beats.stop)
            except fetch.FetchFailed as exc:
                raise RunFailure("input_unavailable", exc.message, retryable=exc.retryable) from None
            except fetch.FetchStopped:
                if beats.reason is None:
                    raise self.timed_out() from None
                path = None  # stopped by a cancel or a lost fence: leaving the block raises RunStopped
        return path

    def probe(self, path: Path, *, extradata_hash: bool = False) -> dict:
        return self.probe_many([path], extradata_hash=extradata_hash)[0]

    def probe_many(self, sources: list[Path], *, extradata_hash: bool = False) -> list[dict]:
        """ffprobe every source (side by side), heartbeating meanwhile, within the job's deadline.

        A file this tenant's jobs probed before, unchanged since (same size, mtime, ctime and
        inode) and probed the same way, is described from the ledger's probe cache instead:
        starting ffprobe costs ≈ 100 ms, the lookup well under 1 ms.
        """
        if self.remaining_s() <= 0:
            raise self.timed_out()
        options = " ".join(process.probe_argv(formats=INPUT_FORMATS, extradata_hash=extradata_hash))
        keys = [self.probe_key(path, options) for path in sources]
        with self.phase("probe_cache"):
            probes = self.cached_probes(keys)
        missing = [index for index, probe in enumerate(probes) if probe is None]
        if not missing:
            return probes
        with self.phase("ffprobe_inputs"), self.heartbeating() as beats:
            try:
                found = process.ffprobe_many([str(sources[index]) for index in missing],
                                             timeout_s=self.remaining_s(), formats=INPUT_FORMATS,
                                             extradata_hash=extradata_hash, stop=beats.stop)
            except process.ProbeFailed as exc:
                exc.index = missing[exc.index]  # the caller names the input by its place in ``sources``
                self.raise_if_not_about_the_file(exc, beats)
                raise
        for index, probe in zip(missing, found):
            probes[index] = probe
        # Only a file that did not change while ffprobe read it is described by what it printed.
        # Stored once the job is completed: the insert then delays nobody.
        self.probes_to_store += [(keys[index], probes[index]) for index in missing
                                 if keys[index] is not None and self.probe_key(sources[index], options) == keys[index]]
        return probes

    def probe_key(self, path: Path, options: str) -> ProbeKey | None:
        if self.stage is not None:
            # A scratch copy's inode and times say nothing of the tenant's file: the object's do.
            relative = self.stage.relative(path) if path.is_relative_to(self.stage.root) else None
            identity = self.stage.objects.get(relative) if relative is not None else None
            return object_probe_key(relative, identity, options) if identity is not None else None
        try:
            st = os.stat(path)
            relative = str(path.relative_to(self.root))
        except (OSError, ValueError):
            return None  # not cached; ffprobe reports what is wrong with the file
        return ProbeKey(relative, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, options)

    def cached_probes(self, keys: list[ProbeKey | None]) -> list[dict | None]:
        wanted = [key for key in keys if key is not None]
        try:
            found = iter(self.ledger.cached_probes(self.job["tenant_id"], wanted))
        except DBAPIError as exc:
            # The cache only saves time: without the database the run probes as before.
            self.log("probe_cache_unavailable", error=type(exc.orig or exc).__name__)
            return [None] * len(keys)
        return [next(found) if key is not None else None for key in keys]

    def remember_probes(self) -> None:
        """Store the inputs' new probes, and the placed outputs' under their final names (moving
        a file into place keeps its size, mtime and inode; only its ctime is new)."""
        options = " ".join(process.probe_argv(formats=INPUT_FORMATS))
        entries = list(self.probes_to_store)
        for output, identity, probe in self.described_probes:
            key = self.placed_probe_key(output, identity, options)
            if key is not None:
                entries.append((key, probe))
        self.store_probes(entries)

    def placed_probe_key(self, output: Output, identity: tuple[int, int, int], options: str) -> ProbeKey | None:
        """The probe-cache key of an output as placed, if it is still the file that was described."""
        if self.stage is None:
            key = self.probe_key(output.final, options)
            return key if key is not None and (key.size_bytes, key.mtime_ns, key.inode) == identity else None
        # Object storage: the uploaded object's identity, which only a HEAD tells (its upload
        # answered with an ETag, not a Last-Modified).
        relative = self.stage.relative(output.final)
        uploaded = self.stage.stat(relative, f"output {output.user_path!r}", code="storage_unavailable")
        return object_probe_key(relative, uploaded, options) if uploaded and uploaded.size == identity[0] else None

    def store_probes(self, entries: list) -> None:
        try:
            self.ledger.store_probes(self.job["tenant_id"], entries)
        except DBAPIError as exc:
            self.log("probe_cache_unavailable", error=type(exc.orig or exc).__name__)

    def output(self, user_path: str, suffixes: frozenset[str] | None = None) -> Output:
        final = paths.output_path(self.root, user_path, overwrite=self.overwrite, suffixes=suffixes)
        if any(output.final == final for output in self.outputs):
            raise RunFailure("invalid_request", f"output {user_path!r} is named twice")
        output = Output(user_path, final, self.temp_name(final))
        self.check_in_bucket(output)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.sweep_predecessors(final.parent)
        self.outputs.append(output)
        return output

    def output_dir(self, user_path: str, *, entry: str, formats: str) -> Output:
        final = paths.output_dir_path(self.root, user_path, overwrite=self.overwrite)
        output = Output(user_path, final, self.temp_name(final), is_dir=True, entry=entry, formats=formats)
        self.check_in_bucket(output)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.sweep_predecessors(final.parent)
        self.outputs.append(output)
        output.temp.mkdir()
        return output

    def check_in_bucket(self, output: Output) -> None:
        """Object storage: the target's checks against the bucket, before anything is encoded
        (the scratch root only shows that the name is well-formed)."""
        if self.stage is not None:
            self.stage.check_output(output, overwrite=self.overwrite, own=self.replaces_own_outputs)

    def scratch(self, beside: Path, suffix: str) -> Path:
        if len(os.fsencode(suffix)) > paths.SCRATCH_SUFFIX_MAX_BYTES:
            # The submit-time name rule only leaves this much room (paths.check_output_name).
            raise ValueError(f"scratch suffix {suffix!r} is longer than {paths.SCRATCH_SUFFIX_MAX_BYTES} bytes")
        self.sweep_predecessors(beside.parent)
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

    def describe(self, output: Output, path: Path | None = None, *, beats: Beats | None = None) -> dict:
        """The result entry of an output, read from its temp name (or ``path``)."""
        path = path or output.temp
        described = path / output.entry if output.entry else path
        if self.remaining_s() <= 0:
            raise self.timed_out()
        # A file output probed as inputs are is remembered once placed: a later job that
        # reads it (a thumbnail of a transcode, a merge of them) need not probe it again.
        size = outputs.size_bytes(path)
        plain_file = not output.is_dir and output.formats == INPUT_FORMATS
        # An MP4/MOV header says all the summary needs, exactly as ffprobe would: no process.
        if plain_file and described.suffix.lower() in isobmff.SUFFIXES:
            header = isobmff.probe(described)
            if header is not None:
                return media.output_summary(output.described_user_path, header, size)
        before = _identity(described) if plain_file else None
        try:
            probe = process.ffprobe(str(described), timeout_s=self.remaining_s(), formats=output.formats,
                                    stop=beats.stop if beats else None)
        except process.ProbeFailed as exc:
            self.raise_if_not_about_the_file(exc, beats)
            raise RunFailure("ffmpeg_failed", f"ffmpeg wrote an output that ffprobe cannot read: "
                                              f"{output.described_user_path!r}", stderr_tail=exc.stderr_tail) from None
        if before is not None and _identity(described) == before:
            self.described_probes.append((output, before, probe))
        return media.output_summary(output.described_user_path, probe, size)

    def predecessors_result(self) -> dict | None:
        """The result an earlier attempt recorded as it placed its outputs, if every one of
        those outputs is still in place and intact (same size, readable, same description):
        then the encode finished and only its completion was lost, and it is not run again."""
        if self.stage is not None:
            # Object storage: the earlier attempt's outputs are objects, not files in this run's
            # scratch directory. Encoding again (and replacing them, they are the job's own) is
            # simpler to get right than downloading and describing each of them.
            return None
        placed_by, stored = self.job.get("outputs_placed_attempt"), self.job.get("result")
        if placed_by is None or placed_by >= self.token or not self.outputs or not isinstance(stored, dict):
            return None
        described = stored.get("outputs")
        if not isinstance(described, list) or len(described) != len(self.outputs):
            return None
        with self.heartbeating() as beats:
            for output, entry in zip(self.outputs, described):
                final = output.final
                if final.is_symlink() or final.is_dir() != output.is_dir or not final.exists():
                    return None
                try:
                    if self.describe(output, final, beats=beats) != entry:
                        return None
                except RunFailure as failure:
                    if failure.code == "timeout":
                        raise
                    return None
        return stored

    def raise_if_not_about_the_file(self, exc: process.ProbeFailed, beats: Beats | None) -> None:
        """A probe ended by the job's deadline or by a stop says nothing about the file:
        the run fails with timeout, or stops for the reason its heartbeat saw."""
        if exc.timed_out:
            raise self.timed_out(exc.stderr_tail) from None
        if exc.stopped:
            raise RunStopped(beats.reason if beats and beats.reason else "cancelled") from None

    def discard_outputs(self) -> None:
        """Remove this run's temp outputs (never the placed ones); a failure to is logged, not raised."""
        if not self.published:
            self.quietly("discard_outputs", lambda: outputs.discard(self.outputs))

    def cleanup(self) -> None:
        self.discard_outputs()
        for path in self.scratch_files:
            self.quietly("remove_scratch", lambda: outputs.remove(path))
        if self.scratch_dir is not None:
            self.quietly("remove_downloads", lambda: outputs.remove(self.scratch_dir))
        if self.stage is not None:
            self.quietly("remove_stage", self.stage.remove)

    def sweep_predecessors(self, directory: Path) -> None:
        """Remove what earlier attempts of this job left beside our outputs (a killed
        run's partial files): nobody else may see them for the hour the orphan cleanup waits."""
        if self.token <= 1 or directory in self.swept_dirs:
            return
        self.swept_dirs.add(directory)
        for name in os.listdir(directory):
            owner = paths.parse_temp_name(name)
            if owner is not None and owner[0] == str(self.job_id) and owner[1] < self.token:
                outputs.remove(directory / name)
                self.log("predecessor_temp_removed", attempt_of=owner[1])

    def quietly(self, what: str, action) -> None:
        try:
            action()
        except Exception as exc:
            log.warning("job=%s attempt=%s event=cleanup_failed step=%s error=%s",
                        self.job_id, self.token, what, type(exc).__name__, exc_info=True)

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())
