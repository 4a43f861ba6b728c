"""Celery, wired the Flask way: ``celery_init_app(app)``, and tasks run in an app context.

Only the wiring lives here: queue names and task routes, the beat schedule assembled
from the maintenance duties (``ffworker.maintenance``), and the start-up warning
about broker settings that would re-deliver or kill long tasks.
"""
from __future__ import annotations

import logging

from celery import Celery, Task
from celery.signals import worker_process_init, worker_ready
from flask import Flask

from ffworker import db, delivery, maintenance


def celery_init_app(app: Flask) -> Celery:
    settings = app.extensions["ffworker"].settings

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask,
                    include=["ffworker.tasks", "ffworker.delivery", *maintenance.modules()])
    celery.config_from_object("celeryconfig")
    celery.conf.update(
        broker_url=settings.broker_url,
        task_default_queue=settings.task_queue,
        beat_schedule=beat_schedule(settings),
        task_routes=task_routes(settings),
    )
    celery.set_default()
    celery.flask_app = app  # the start-up guardrail reads this app's settings
    app.extensions["celery"] = celery
    return celery


def beat_schedule(settings) -> dict:
    """One entry per maintenance duty, at the interval the duty chooses."""
    entries = {}
    for duty in maintenance.DUTIES:
        interval = duty.interval_s(settings)
        # Expire each run at the next one: a backlog must not replay stale rounds.
        entries[duty.SCHEDULE_ENTRY] = {"task": duty.TASK, "schedule": interval, "options": {"expires": interval}}
    return entries


def maintenance_queue(settings) -> str:
    return f"{settings.task_queue}.maintenance"


def task_routes(settings) -> dict:
    """Maintenance and webhook deliveries on queues of their own, each consumed by its own
    Procfile process: maintenance never waits behind the job queue's backlog nor for a job process
    to finish an encode, and a slow receiver never holds an encoding slot."""
    routes = {duty.TASK: {"queue": maintenance_queue(settings)} for duty in maintenance.DUTIES}
    routes[delivery.DELIVER_TASK] = {"queue": delivery.webhooks_queue(settings)}
    return routes


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
    flask_app = getattr(app, "flask_app", None)
    if flask_app is None:
        return
    settings = flask_app.extensions["ffworker"].settings
    for risk in redelivery_risks(app.conf, settings.job_timeout_s):
        log.warning("event=broker_guardrail %s (see docs/operations.md: why messages are acknowledged early)", risk)


@worker_process_init.connect
def _fresh_connections_after_fork(**_):
    # Pool connections inherited through fork would be shared with the parent.
    db.dispose_after_fork()
