"""The only code of ffworker that starts subprocesses: ffmpeg and ffprobe for jobs,
and the demo's test clip and stack processes (``generate_clip``, ``start_service``).

Each child gets a process group of its own, so that cancel and timeout can
kill ffmpeg together with anything it spawned, and dies with its parent
(``PR_SET_PDEATHSIG``): a worker killed with SIGKILL never leaves an orphan
ffmpeg encoding on, nor a killed demo a web or worker process. Arguments are
always an argv list, never a shell string. (The test suite and the benchmark
scripts start processes of their own; they are not part of the service.)
"""
from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ffworker.progress import Progress, ProgressParser

#: The binaries this process runs: FFWORKER_FFMPEG / FFWORKER_FFPROBE, set by ``configure``.
FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
STDERR_TAIL_BYTES = 8192
PROBE_PARALLELISM = min(8, os.cpu_count() or 2)
_PR_SET_PDEATHSIG = 1


class ProbeFailed(Exception):
    """ffprobe could not read the file (missing, unreadable or not media)."""

    def __init__(self, message: str, stderr_tail: str = "", index: int = 0, *, timed_out: bool = False,
                 stopped: bool = False) -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail
        self.index = index  # which of the paths given to ffprobe_many
        # Killed at its timeout, or because ``stop`` was set: either says nothing about the file.
        self.timed_out = timed_out
        self.stopped = stopped


def configure(settings) -> None:
    """Run the settings' ffmpeg and ffprobe in this process (``init_app`` calls it)."""
    global FFMPEG, FFPROBE
    FFMPEG, FFPROBE = settings.ffmpeg, settings.ffprobe


def _child_setup(parent_pid: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork and prctl: then nobody would kill us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_child_setup(os.getpid()),
        close_fds=True,
        **kwargs,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def probe_argv(*, formats: str | None = None, extradata_hash: bool = False) -> list[str]:
    """ffprobe's command line without the file: also what a cached probe says it was made with."""
    argv = [FFPROBE, "-v", "error", "-protocol_whitelist", "file"]
    if formats is not None:
        argv += ["-format_whitelist", formats]
    if extradata_hash:
        argv += ["-show_data_hash", "sha256"]
    return argv + ["-print_format", "json", "-show_format", "-show_streams"]


def ffprobe(path: str, timeout_s: float = 60.0, *, formats: str | None = None, extradata_hash: bool = False,
            stop: threading.Event | None = None) -> dict:
    """ffprobe's JSON description (format and streams) of a local file.

    ``formats`` restricts the demuxers ffprobe may pick (``-format_whitelist``),
    so a file that is really a playlist or a concat script is refused instead of
    followed; ``extradata_hash`` adds each stream's ``extradata_hash``.
    """
    return ffprobe_many([path], timeout_s, formats=formats, extradata_hash=extradata_hash, stop=stop)[0]


def ffprobe_many(
    paths: list[str], timeout_s: float = 60.0, *, formats: str | None = None, extradata_hash: bool = False,
    parallel: int = PROBE_PARALLELISM, stop: threading.Event | None = None,
) -> list[dict]:
    """``ffprobe`` of several files, up to ``parallel`` processes at a time, in order.

    Starting ffprobe costs far more than reading a file's headers, so a merge
    of many inputs probes them side by side. The first failure raises
    ProbeFailed (its ``index`` says which path) after the others are killed.
    Setting ``stop`` (a cancel seen by the caller's heartbeat) kills them too, within
    ``STOP_POLL_S``: ProbeFailed with ``stopped``.
    """
    argv = probe_argv(formats=formats, extradata_hash=extradata_hash)
    deadline = time.monotonic() + timeout_s
    running: deque[subprocess.Popen] = deque()
    results: list[dict] = []
    try:
        for index in range(len(paths)):
            while len(running) < max(1, parallel) and len(results) + len(running) < len(paths):
                running.append(spawn([*argv, paths[len(results) + len(running)]],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            results.append(_probe_result(running.popleft(), deadline, index, stop))
    finally:
        for proc in running:
            kill_group(proc)
            proc.stdout.close()
            proc.stderr.close()
    return results


STOP_POLL_S = 0.1


def _probe_result(proc: subprocess.Popen, deadline: float, index: int, stop: threading.Event | None = None) -> dict:
    while True:
        wait = max(0.0, deadline - time.monotonic())
        try:
            # communicate() may be called again after a timeout without losing output.
            out, err = proc.communicate(timeout=wait if stop is None else min(wait, STOP_POLL_S))
            break
        except subprocess.TimeoutExpired:
            stopped = stop is not None and stop.is_set()
            if stopped or time.monotonic() >= deadline:
                kill_group(proc)
                proc.communicate()  # collect what is left and close the pipes
                if stopped:
                    raise ProbeFailed("ffprobe stopped", index=index, stopped=True) from None
                raise ProbeFailed("ffprobe timed out", index=index, timed_out=True) from None
    stderr = err.decode("utf-8", "replace")[-STDERR_TAIL_BYTES:]
    if proc.returncode != 0:
        raise ProbeFailed("ffprobe could not read the media", stderr, index=index)
    try:
        return json.loads(out or b"{}")
    except ValueError:
        raise ProbeFailed("ffprobe returned unreadable output", stderr, index=index)


@dataclass(frozen=True)
class FfmpegOutcome:
    returncode: int | None       # negative: killed by that signal (POSIX convention)
    stderr_tail: str
    stopped: str | None = None   # why we killed it: the tick's reason, or "timeout"
    last_progress: Progress | None = None
    progress_blocks: int = 0     # how many progress blocks ffmpeg printed


Tick = Callable[[Progress | None], str | None]


def ffmpeg_argv(args: list[str], progress_period_s: float) -> list[str]:
    """The full ffmpeg command line of a job: quiet, progress blocks on stdout.

    ``-stats_period`` makes ffmpeg print a progress block once per ``progress_period_s``
    instead of every 0.5 s: the run passes on at most one snapshot per heartbeat, so
    more frequent blocks were only parsed to be dropped (and woke the worker for it).
    """
    return [FFMPEG, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
            "-stats_period", f"{progress_period_s:g}", "-progress", "pipe:1", *args]


def run_ffmpeg(
    args: list[str], *, duration_s: float | None, tick: Tick, tick_interval_s: float, timeout_s: float,
) -> FfmpegOutcome:
    """Run ffmpeg with machine-readable progress on stdout.

    ``tick`` is called at most once per ``tick_interval_s`` (whether or not
    ffmpeg printed anything, so it doubles as the heartbeat) with the newest
    progress snapshot not yet passed on, or None. A non-None return value
    stops the run: the process group is killed and that value is reported as
    ``stopped``. Passing ``timeout_s`` kills the run with ``stopped="timeout"``.
    """
    argv = ffmpeg_argv(args, tick_interval_s)
    blocks = 0
    parser = ProgressParser(duration_s)
    stderr_tail: deque[bytes] = deque()
    stderr_size = 0
    pending: Progress | None = None
    last: Progress | None = None
    stdout_buffer = b""

    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
    selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
    started = time.monotonic()
    deadline = started + timeout_s
    next_tick = started + tick_interval_s

    def stop(reason: str) -> FfmpegOutcome:
        kill_group(proc)
        selector.close()
        return FfmpegOutcome(proc.returncode, _tail(stderr_tail), stopped=reason, last_progress=last,
                             progress_blocks=blocks)

    try:
        while selector.get_map():
            now = time.monotonic()
            for key, _ in selector.select(max(0.0, min(next_tick, deadline) - now)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.data == "stderr":
                    stderr_tail.append(chunk)
                    stderr_size += len(chunk)
                    while stderr_size - len(stderr_tail[0]) > STDERR_TAIL_BYTES and len(stderr_tail) > 1:
                        stderr_size -= len(stderr_tail.popleft())
                else:
                    stdout_buffer += chunk
                    *lines, stdout_buffer = stdout_buffer.split(b"\n")
                    for line in lines:
                        snapshot = parser.feed_line(line.decode("utf-8", "replace"))
                        if snapshot is not None:
                            blocks += 1
                            pending = last = snapshot
            now = time.monotonic()
            if now >= deadline:
                return stop("timeout")
            if now >= next_tick:
                next_tick = now + tick_interval_s
                reason = tick(pending)
                pending = None
                if reason is not None:
                    return stop(reason)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return stop("timeout")
    except BaseException:
        kill_group(proc)
        raise
    finally:
        proc.stdout.close()
        proc.stderr.close()
    selector.close()
    return FfmpegOutcome(proc.returncode, _tail(stderr_tail), last_progress=last, progress_blocks=blocks)


def _tail(chunks: deque[bytes]) -> str:
    return b"".join(chunks)[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")


# -- the demo's processes ----------------------------------------------------------


def generate_clip(path: Path, seconds: int) -> None:
    """A 720p test pattern with a tone, ``seconds`` long (raises CalledProcessError)."""
    proc = spawn([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
                  "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:v", "libx264",
                  "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)])
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)


def start_service(argv: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """A long-running process (web, worker) with its output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return spawn(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def stop_service(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL of its whole group after ``timeout_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
