"""Entry point of ``celery -A ffworker.celery_app worker`` and ``… beat`` (wiring: ``ffworker.celery_wiring``)."""
from ffworker.app import create_app

flask_app = create_app()
celery = flask_app.extensions["celery"]
