"""Per-app services (settings, ledger) wired by ``init_app``."""
from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from ffworker import process
from ffworker.config import Settings
from ffworker.db import get_engine
from ffworker.ledger import Ledger


@dataclass
class Services:
    settings: Settings
    ledger: Ledger

    @property
    def engine(self):
        return self.ledger.engine


def init_app(app: Flask, settings: Settings) -> Services:
    process.configure(settings)  # the binaries are per process, like the app built here
    services = Services(settings=settings, ledger=Ledger(
        get_engine(settings.database_url), tenant_max_slots=settings.tenant_max_slots,
        max_running=settings.max_running))
    app.extensions["ffworker"] = services
    return services


def services() -> Services:
    return current_app.extensions["ffworker"]
