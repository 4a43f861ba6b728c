"""Celery settings for ffworker's workers and beat.

The broker and the default queue are ffworker's own settings
(``FFWORKER_BROKER_URL``, ``FFWORKER_TASK_QUEUE``, read and checked by
``ffworker.config``); everything else here is fixed on purpose.

Long ffmpeg tasks shape these choices:

* Early acknowledgement (``task_acks_late = False``). The broker is not what
  guarantees a job runs: the ledger is. An unacknowledged message on Redis is
  re-delivered after ``visibility_timeout`` (default one hour) to a second
  worker while the first still encodes, and RabbitMQ closes the channel of a
  consumer that holds an unacked message past ``consumer_timeout`` (default 30
  minutes). With early acks a lost worker is detected by its stale heartbeat
  in the ledger and its job re-dispatched by beat instead.
* One message at a time per process (prefetch multiplier 1, fair scheduling),
  so a long encode never holds back messages another process could run.
* Messages carry the job id only; a duplicate finds the job not queued and
  does nothing.
"""

from ffworker.config import settings_or_exit

_settings = settings_or_exit()

broker_url = _settings.broker_url
task_default_queue = _settings.task_queue
task_acks_late = False
task_reject_on_worker_lost = False
worker_prefetch_multiplier = 1
task_ignore_result = True
task_serializer = "json"
accept_content = ["json"]
result_backend = None
broker_connection_retry_on_startup = True
worker_hijack_root_logger = False
worker_send_task_events = False
task_send_sent_event = False
# Publishing happens in web requests: fail fast and let beat's re-dispatch
# pick the job up, rather than hold the request while the broker is away.
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
broker_transport_options = {"visibility_timeout": 4 * 3600}
