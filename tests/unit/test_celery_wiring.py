"""Celery wiring: the beat schedule and routes assembled from the maintenance duties, and the
worker's start-up warning about broker settings that re-deliver or kill long tasks."""
from types import SimpleNamespace

from ffworker import maintenance
from ffworker.celery_wiring import beat_schedule, redelivery_risks, task_routes
from ffworker.config import Settings


def conf(**overrides):
    values = dict(broker_url="redis://localhost:6379/0", broker_transport_options={"visibility_timeout": 14400},
                  task_acks_late=False, worker_prefetch_multiplier=1)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_the_shipped_settings_raise_no_warning():
    import celeryconfig

    shipped = conf(task_acks_late=celeryconfig.task_acks_late,
                   broker_transport_options=celeryconfig.broker_transport_options,
                   worker_prefetch_multiplier=celeryconfig.worker_prefetch_multiplier)
    assert redelivery_risks(shipped, 3600) == []


def test_late_acks_with_a_short_redis_visibility_timeout_warn():
    risks = redelivery_risks(conf(task_acks_late=True, broker_transport_options={"visibility_timeout": 600}), 3600)
    assert len(risks) == 1 and "visibility_timeout (600 s)" in risks[0]


def test_late_acks_with_rabbitmq_warn_about_consumer_timeout():
    risks = redelivery_risks(conf(task_acks_late=True, broker_url="amqp://guest@localhost//"), 3600)
    assert len(risks) == 1 and "consumer_timeout" in risks[0]


def test_prefetching_more_than_one_message_warns():
    assert "prefetch" in redelivery_risks(conf(worker_prefetch_multiplier=4), 3600)[0]


def test_beat_runs_reaper_and_redispatch_at_the_maintenance_interval():
    schedule = beat_schedule(Settings(maintenance_interval_s=7))
    assert schedule["reap-stale-jobs"]["schedule"] == 7
    assert schedule["redispatch-lost-messages"]["schedule"] == 7
    assert schedule["prune-old-jobs"]["task"] == "ffworker.maintenance.prune"


def test_every_duty_brings_its_task_its_schedule_entry_and_its_route():
    settings = Settings(maintenance_interval_s=7, task_queue="q")
    schedule = beat_schedule(settings)
    routes = task_routes(settings)
    assert [entry["task"] for entry in schedule.values()] == [
        "ffworker.maintenance.reap", "ffworker.maintenance.redispatch", "ffworker.maintenance.prune",
        "ffworker.maintenance.webhook_relay"]
    assert schedule["prune-old-jobs"]["schedule"] == schedule["prune-old-jobs"]["options"]["expires"] == 3600
    assert routes == {**{entry["task"]: {"queue": "q.maintenance"} for entry in schedule.values()},
                      "ffworker.webhooks.deliver": {"queue": "q.webhooks"}}
    assert maintenance.modules() == [
        "ffworker.maintenance.reaper", "ffworker.maintenance.redispatch", "ffworker.maintenance.prune",
        "ffworker.maintenance.webhook_relay"]


def test_the_celery_app_includes_the_duties_and_knows_their_tasks(app):
    celery = app.extensions["celery"]
    assert {"ffworker.tasks", "ffworker.delivery", *maintenance.modules()} <= set(celery.conf.include)
    celery.loader.import_default_modules()
    assert {duty.TASK for duty in maintenance.DUTIES} | {"ffworker.webhooks.deliver"} <= set(celery.tasks)
