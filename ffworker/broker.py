"""Celery, wired the Flask way: ``celery_init_app(app)``, and tasks run in an app context."""
from __future__ import annotations

import logging

from celery import Celery, Task
from celery.signals import worker_process_init, worker_ready
from flask import Flask

from ffworker import db


def celery_init_app(app: Flask) -> Celery:
    settings = app.extensions["ffworker"].settings

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask, include=[
        "ffworker.tasks", "ffworker.maintenance", "ffworker.delivery", "ffworker.webhook_relay"])
    celery.config_from_object("celeryconfig")
    celery.conf.update(
        broker_url=settings.broker_url,
        task_default_queue=settings.task_queue,
        beat_schedule=beat_schedule(settings),
        task_routes={"ffworker.maintenance.*": {"queue": maintenance_queue(settings)}},
    )
    celery.set_default()
    app.extensions["celery"] = celery
    return celery


def beat_schedule(settings) -> dict:
    from ffworker import webhook_relay

    interval = settings.maintenance_interval_s
    # Expire each run at the next one: a backlog must not replay stale rounds.
    every = lambda seconds: {"expires": seconds}  # noqa: E731
    return {
        "reap-stale-jobs": {"task": "ffworker.maintenance.reap", "schedule": interval, "options": every(interval)},
        "redispatch-lost-messages": {
            "task": "ffworker.maintenance.redispatch", "schedule": interval, "options": every(interval),
        },
        "prune-old-jobs": {"task": "ffworker.maintenance.prune", "schedule": 3600.0, "options": every(3600)},
        **webhook_relay.schedule(settings),
    }


def maintenance_queue(settings) -> str:
    return f"{settings.task_queue}.maintenance"


log = logging.getLogger("ffworker.broker")


def redelivery_risks(conf, job_timeout_s: float) -> list[str]:
    """Broker settings under which a long ffmpeg task could be re-delivered or killed."""
    risks = []
    transport = (conf.broker_url or "").split(":", 1)[0]
    visibility = (conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    if conf.task_acks_late and transport in ("redis", "rediss", "sentinel") and visibility < job_timeout_s:
        risks.append(
            f"task_acks_late is on and Redis visibility_timeout ({visibility} s) is shorter than "
            f"FFWORKER_JOB_TIMEOUT_S ({job_timeout_s:g} s): long jobs would be delivered to a second worker"
        )
    if conf.task_acks_late and transport in ("amqp", "amqps", "pyamqp"):
        risks.append(
            "task_acks_late is on with RabbitMQ: a task running longer than the server's consumer_timeout "
            "(30 min by default) gets its channel closed; keep early acks or raise consumer_timeout"
        )
    if conf.worker_prefetch_multiplier != 1:
        risks.append(f"worker_prefetch_multiplier is {conf.worker_prefetch_multiplier}: messages wait behind long encodes")
    return risks


@worker_ready.connect
def _warn_about_broker_settings(sender=None, **_):
    app = sender.app if sender is not None else None
    if app is None:
        return
    from ffworker.config import get_settings

    for risk in redelivery_risks(app.conf, get_settings().job_timeout_s):
        log.warning("event=broker_guardrail %s (see README: why messages are acknowledged early)", risk)


@worker_process_init.connect
def _fresh_connections_after_fork(**_):
    # Pool connections inherited through fork would be shared with the parent.
    db.dispose_after_fork()
