"""Settings: every variable parsed and checked once, each rule naming its variable."""
from __future__ import annotations

from pathlib import Path

import pytest

from ffworker.config import ConfigError, Settings, settings_or_exit
from tests.helpers import environment_of


def test_settings_reach_child_processes_unchanged_through_the_environment():
    settings = Settings(progress_interval_s=0.25, allow_raw_commands=True, media_root=Path("/m"))
    assert Settings.from_env(environment_of(settings)) == settings
    assert Settings.from_env({}) == Settings()


def test_every_variable_is_read_under_its_documented_name():
    environ = {
        "FFWORKER_DATABASE_URL": "postgresql+psycopg://u@db/x", "FFWORKER_BROKER_URL": "amqp://guest@mq//",
        "FFWORKER_MEDIA_ROOT": "/srv/media", "FFWORKER_STALE_AFTER_S": "90", "FFWORKER_REAPER_GRACE_S": "200",
        "FFWORKER_PROGRESS_INTERVAL_S": "0.5", "FFWORKER_JOB_TIMEOUT_S": "60", "FFWORKER_MAX_ATTEMPTS": "5",
        "FFWORKER_RETENTION_DAYS": "7", "FFWORKER_MAINTENANCE_INTERVAL_S": "20", "FFWORKER_ALLOW_RAW_COMMANDS": "yes",
        "FFWORKER_ALLOW_PRIVATE_URLS": "on", "FFWORKER_REDISPATCH_AFTER_S": "30", "FFWORKER_TASK_QUEUE": "media", "FFWORKER_FFMPEG": "/opt/ff/ffmpeg",
        "FFWORKER_FFPROBE": "/opt/ff/ffprobe", "FFWORKER_SSE_MAX_STREAMS": "0", "FFWORKER_SSE_KEEPALIVE_S": "5",
        "FFWORKER_SSE_MAX_DURATION_S": "60", "FFWORKER_WEB_THREADS": "8", "WEB_CONCURRENCY": "2", "PORT": "9000",
        "FFWORKER_TRUST_PROXY": "on", "FFWORKER_MAX_UPLOAD_BYTES": "1048576",
        "FFWORKER_ALLOW_URL_INPUTS": "1", "FFWORKER_ALLOW_HTTP_INPUTS": "true",
        "FFWORKER_TRUST_PROXY": "on", "FFWORKER_TENANT_MAX_SLOTS": "8", "FFWORKER_MAX_RUNNING": "40",
    }
    settings = Settings.from_env(environ)
    assert settings == Settings(
        database_url="postgresql+psycopg://u@db/x", broker_url="amqp://guest@mq//", media_root=Path("/srv/media"),
        stale_after_s=90, reaper_grace_s=200, progress_interval_s=0.5, job_timeout_s=60, max_attempts=5,
        retention_days=7, maintenance_interval_s=20, allow_raw_commands=True, allow_private_urls=True, redispatch_after_s=30,
        task_queue="media", ffmpeg="/opt/ff/ffmpeg", ffprobe="/opt/ff/ffprobe", sse_max_streams=0,
        sse_keepalive_s=5, sse_max_duration_s=60, web_threads=8, web_concurrency=2, port=9000, trust_proxy=True,
        max_upload_bytes=1048576, allow_url_inputs=True, allow_http_inputs=True,
        tenant_max_slots=8, max_running=40,
    )


def test_an_empty_variable_means_its_default():
    assert Settings.from_env({"FFWORKER_MAX_ATTEMPTS": "", "PORT": " ", "FFWORKER_TASK_QUEUE": "\t"}) == Settings()


@pytest.mark.parametrize("environ, message", [
    ({"FFWORKER_MAX_ATTEMPTS": "three"}, "FFWORKER_MAX_ATTEMPTS=three is not a whole number"),
    ({"FFWORKER_MAX_ATTEMPTS": "2.5"}, "FFWORKER_MAX_ATTEMPTS=2.5 is not a whole number"),
    ({"FFWORKER_STALE_AFTER_S": "soon"}, "FFWORKER_STALE_AFTER_S=soon is not a number"),
    ({"FFWORKER_MAX_ATTEMPTS": "0"}, "FFWORKER_MAX_ATTEMPTS=0 must be a positive number"),
    ({"FFWORKER_JOB_TIMEOUT_S": "-1"}, "FFWORKER_JOB_TIMEOUT_S=-1 must be a positive number"),
    ({"FFWORKER_PROGRESS_INTERVAL_S": "0"}, "FFWORKER_PROGRESS_INTERVAL_S=0 must be a positive number"),
    ({"FFWORKER_PROGRESS_INTERVAL_S": "nan"}, "FFWORKER_PROGRESS_INTERVAL_S=nan must be a positive number"),
    ({"FFWORKER_RETENTION_DAYS": "0"}, "FFWORKER_RETENTION_DAYS=0 must be a positive number"),
    ({"FFWORKER_MAINTENANCE_INTERVAL_S": "inf"}, "FFWORKER_MAINTENANCE_INTERVAL_S=inf must be a positive number"),
    ({"FFWORKER_REDISPATCH_AFTER_S": "0"}, "FFWORKER_REDISPATCH_AFTER_S=0 must be a positive number"),
    ({"FFWORKER_SSE_KEEPALIVE_S": "0"}, "FFWORKER_SSE_KEEPALIVE_S=0 must be a positive number"),
    ({"FFWORKER_SSE_MAX_DURATION_S": "-5"}, "FFWORKER_SSE_MAX_DURATION_S=-5 must be a positive number"),
    ({"FFWORKER_SSE_MAX_STREAMS": "-1"}, "FFWORKER_SSE_MAX_STREAMS=-1 must be 0 or more"),
    ({"FFWORKER_WEB_THREADS": "0"}, "FFWORKER_WEB_THREADS=0 must be a positive number"),
    ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY=0 must be a positive number"),
    ({"FFWORKER_MAX_UPLOAD_BYTES": "0"}, "FFWORKER_MAX_UPLOAD_BYTES=0 must be a positive number"),
    ({"FFWORKER_MAX_UPLOAD_BYTES": "1e9"}, "FFWORKER_MAX_UPLOAD_BYTES=1e9 is not a whole number"),
    ({"FFWORKER_ALLOW_HTTP_INPUTS": "1"}, "FFWORKER_ALLOW_HTTP_INPUTS=1 needs FFWORKER_ALLOW_URL_INPUTS=1"),
    ({"FFWORKER_ALLOW_URL_INPUTS": "https"}, "FFWORKER_ALLOW_URL_INPUTS=https must be one of 1, true"),
    ({"FFWORKER_TENANT_MAX_SLOTS": "0"}, "FFWORKER_TENANT_MAX_SLOTS=0 must be a positive number"),
    ({"FFWORKER_TENANT_MAX_SLOTS": "2.5"}, "FFWORKER_TENANT_MAX_SLOTS=2.5 is not a whole number"),
    ({"FFWORKER_MAX_RUNNING": "-3"}, "FFWORKER_MAX_RUNNING=-3 must be a positive number"),
    ({"PORT": "70000"}, "PORT=70000 must be a TCP port"),
    ({"FFWORKER_ALLOW_RAW_COMMANDS": "maybe"}, "FFWORKER_ALLOW_RAW_COMMANDS=maybe must be one of 1, true, yes"),
    ({"FFWORKER_TRUST_PROXY": "https"}, "FFWORKER_TRUST_PROXY=https must be one of 1, true, yes"),
    ({"FFWORKER_ALLOW_PRIVATE_URLS": "sometimes"}, "FFWORKER_ALLOW_PRIVATE_URLS=sometimes must be one of 1, true"),
    ({"FFWORKER_BROKER_URL": "http://u:secret@mq/"},
     "FFWORKER_BROKER_URL=http://u:***@mq/ must use one of the schemes redis, rediss, sentinel, amqp"),
    ({"FFWORKER_DATABASE_URL": "mysql://u:secret@db/x"}, "FFWORKER_DATABASE_URL=mysql://u:***@db/x must be a PostgreSQL"),
    ({"FFWORKER_DATABASE_URL": "not a url"}, "FFWORKER_DATABASE_URL=not a url is not a database URL"),
    ({"FFWORKER_REAPER_GRACE_S": "10"},
     "FFWORKER_REAPER_GRACE_S=10 must be greater than FFWORKER_MAINTENANCE_INTERVAL_S=15"),
    ({"FFWORKER_REAPER_GRACE_S": "15"},
     "FFWORKER_REAPER_GRACE_S=15 must be greater than FFWORKER_MAINTENANCE_INTERVAL_S=15"),
    ({"FFWORKER_MAINTENANCE_INTERVAL_S": "300"},
     "FFWORKER_REAPER_GRACE_S=120 must be greater than FFWORKER_MAINTENANCE_INTERVAL_S=300"),
    ({"FFWORKER_STALE_AFTER_S": "2"}, "FFWORKER_STALE_AFTER_S=2 must be at least 3 × FFWORKER_PROGRESS_INTERVAL_S=1"),
    ({"FFWORKER_PROGRESS_INTERVAL_S": "20.5"},
     "FFWORKER_STALE_AFTER_S=60 must be at least 3 × FFWORKER_PROGRESS_INTERVAL_S=20.5"),
])
def test_each_rule_names_its_variable(environ, message):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(environ)
    assert str(raised.value).startswith(message)
    assert "secret" not in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("environ", [
    {"FFWORKER_STALE_AFTER_S": "3", "FFWORKER_PROGRESS_INTERVAL_S": "1"},        # exactly 3 heartbeats
    {"FFWORKER_REAPER_GRACE_S": "15.5", "FFWORKER_MAINTENANCE_INTERVAL_S": "15"},
    {"FFWORKER_BROKER_URL": "rediss://:pw@cache:6380/1"},
    {"FFWORKER_BROKER_URL": "pyamqp://guest:guest@mq:5672//"},
    {"FFWORKER_ALLOW_RAW_COMMANDS": "OFF"},
    {"FFWORKER_SSE_MAX_STREAMS": "0"},
])
def test_values_on_the_edge_of_a_rule_are_accepted(environ):
    Settings.from_env(environ)


def test_the_rules_hold_for_settings_built_in_code_too():
    with pytest.raises(ConfigError, match="FFWORKER_REAPER_GRACE_S=5 must be greater"):
        Settings().with_overrides(reaper_grace_s=5)


def test_entry_points_exit_with_one_line():
    with pytest.raises(SystemExit) as raised:
        settings_or_exit({"FFWORKER_REAPER_GRACE_S": "10"})
    assert raised.value.code == ("ffworker: configuration error: FFWORKER_REAPER_GRACE_S=10 must be greater than "
                                 "FFWORKER_MAINTENANCE_INTERVAL_S=15")
