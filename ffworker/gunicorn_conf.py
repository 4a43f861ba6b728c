"""gunicorn settings for the `web` process (Procfile).

Threads: an open event stream (``GET /v1/jobs/{id}/events``) or long-poll
(``?wait=``) holds one thread of its process for as long as it lasts, so each
process admits at most ``threads − max(4, threads // 4)`` of them at once and
answers 503 + Retry-After beyond that (``ffworker.stream_slots``): the other threads
always serve ordinary requests. With the defaults, 32 threads per process: 24
streams and 8 threads for everything else; 4 processes hold 96 open streams.
Idle streams cost a sleeping thread and a socket each; the database is read
once per change of a watched job, not per stream per second.

gunicorn reads this file in the master before any worker starts, so invalid
settings stop the server here with one line, instead of every worker failing
to boot in turn.
"""
import logging

from ffworker.config import settings_or_exit

_settings = settings_or_exit()

bind = f"0.0.0.0:{_settings.port}"
# Threaded workers: requests mostly wait on PostgreSQL and the broker, streams on notifications.
worker_class = "gthread"
workers = _settings.web_processes()
threads = _settings.web_threads
# gthread's heartbeat comes from the main loop, not from request threads: long
# streams do not trip this timeout.
timeout = 60
# On SIGTERM open streams end at once (post_worker_init); other requests get this long.
graceful_timeout = 30
keepalive = 5
accesslog = "-"


def post_worker_init(worker):
    """Tell the app how many threads this process really has (``--threads`` may override the
    above), and end its event streams as soon as it is asked to stop."""
    import signal
    import threading

    from ffworker import listener, stream_slots

    stream_slots.set_server_threads(worker.cfg.threads)

    graceful_exit = signal.getsignal(signal.SIGTERM)

    def drain_then_exit(signum, frame):
        # Streams would otherwise hold the graceful shutdown for graceful_timeout and then be cut;
        # ended now, their clients resume on another process with Last-Event-ID.
        threading.Thread(target=listener.drain, name="ffworker-drain", daemon=True).start()
        if callable(graceful_exit):
            graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)
    limits = stream_slots.StreamLimits.from_settings(_settings, threads=worker.cfg.threads)
    if limits.max_streams == 0:
        logging.getLogger("ffworker.stream_slots").warning(
            "event=sse_disabled threads=%s: every event stream and long-poll will get 503; "
            "run with at least 5 threads", worker.cfg.threads)
