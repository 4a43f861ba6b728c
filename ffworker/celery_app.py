"""Entry point of ``celery -A ffworker.celery_app worker`` and ``… beat`` (wiring: ``ffworker.celery_wiring``).

The settings are checked here, on import, so that an invalid one stops the
worker or beat with one line naming the variable, before Celery starts.
"""
from ffworker.app import create_app
from ffworker.config import settings_or_exit

flask_app = create_app({"FFWORKER_SETTINGS": settings_or_exit()})
celery = flask_app.extensions["celery"]
