"""The dashboard at ``/ui/``: server-rendered pages (Jinja), a little plain JavaScript for
live updates, sign-in with a tenant API key or an operator key. See docs/dashboard.md."""
from __future__ import annotations

from flask import Blueprint, Flask

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="../templates",
               static_folder="../static/ui", static_url_path="/static")


def init_app(app: Flask) -> None:
    from ffworker.ui import views  # noqa: F401  (registers the routes on bp)

    app.register_blueprint(bp)
