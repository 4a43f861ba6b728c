"""gunicorn settings for the `web` process (Procfile).

Threads: an open event stream (``GET /v1/jobs/{id}/events``) or long-poll
(``?wait=``) holds one thread of its process for as long as it lasts, so each
process admits at most ``threads − max(4, threads // 4)`` of them at once and
answers 503 + Retry-After beyond that (``ffworker.events``): the other threads
always serve ordinary requests. With the defaults, 32 threads per process: 24
streams and 8 threads for everything else; 4 processes hold 96 open streams.
Idle streams cost a sleeping thread and a socket each; the database is read
once per change of a watched job, not per stream per second.
"""
import logging
import multiprocessing
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Threaded workers: requests mostly wait on PostgreSQL and the broker, streams on notifications.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count() + 1)))
threads = int(os.environ.get("FFWORKER_WEB_THREADS", 32))
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

    from ffworker import events

    events.set_server_threads(worker.cfg.threads)

    graceful_exit = signal.getsignal(signal.SIGTERM)

    def drain_then_exit(signum, frame):
        # Streams would otherwise hold the graceful shutdown for graceful_timeout and then be cut;
        # ended now, their clients resume on another process with Last-Event-ID.
        threading.Thread(target=events.drain, name="ffworker-drain", daemon=True).start()
        if callable(graceful_exit):
            graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)
    limits = events.StreamLimits.from_env(threads=worker.cfg.threads)
    if limits.max_streams == 0:
        logging.getLogger("ffworker.events").warning(
            "event=sse_disabled threads=%s: every event stream and long-poll will get 503; "
            "run with at least 5 threads", worker.cfg.threads)
