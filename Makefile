# ffworker developer tasks.
#
#   make setup       install system packages, start PostgreSQL and Redis,
#                    build .venv and migrate the database (scripts/bootstrap.sh)
#   make demo        setup, then run the end-to-end demo (manage.py demo)
#   make test        setup, then run the test suite; extra pytest arguments
#                    go in PYTEST_ARGS, e.g. make test PYTEST_ARGS='-m "not e2e"'
#   make bench       setup, then run every executable bench/* script in order
#   make run-web     the HTTP API under gunicorn on 127.0.0.1:$PORT (default 8000)
#   make run-worker  a Celery worker (jobs)
#   make run-maintenance  the Celery worker of the maintenance queue
#   make run-webhooks     the Celery worker of the webhook deliveries
#   make run-beat    the Celery beat scheduler
#   make clean       remove .venv and var/ (media and other local state)
#
# The run-* targets bootstrap only when .venv has never been installed, so
# several of them can be started side by side once `make setup` has run.

SHELL := /bin/bash

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ffworker-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help setup demo test bench run-web run-worker run-maintenance run-webhooks run-beat clean

# Print the list of targets above.
help:
	@sed -n '3,14s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# Install and start everything needed, migrate the database.
setup:
	bash scripts/bootstrap.sh

# Run the demo against the local services.
demo: setup
	$(BIN)/python manage.py demo

# Run the test suite.
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Run each executable bench/* script, stopping at the first failure.
bench: setup
	@set -e; found=0; \
	for script in bench/*; do \
		[ -f "$$script" ] && [ -x "$$script" ] || continue; \
		found=1; \
		echo "==> $$script"; \
		PATH="$(CURDIR)/$(BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)" "./$$script"; \
	done; \
	[ "$$found" = 1 ] || echo "==> no executable scripts in bench/"

# First-time bootstrap for the run-* targets.
$(STAMP):
	bash scripts/bootstrap.sh

# HTTP API (Procfile: web).
run-web: | $(STAMP)
	$(BIN)/gunicorn -c ffworker/gunicorn_conf.py --bind "127.0.0.1:$${PORT:-8000}" 'ffworker.app:create_app()'

# Celery worker (Procfile: worker).
run-worker: | $(STAMP)
	$(BIN)/celery -A ffworker.celery_app worker -Q $${FFWORKER_TASK_QUEUE:-ffworker} -O fair --prefetch-multiplier 1 --loglevel INFO

# Celery worker of the maintenance queue (Procfile: maintenance).
run-maintenance: | $(STAMP)
	$(BIN)/celery -A ffworker.celery_app worker -Q $${FFWORKER_TASK_QUEUE:-ffworker}.maintenance --concurrency 2 --prefetch-multiplier 1 --loglevel INFO

# Celery worker of the webhook deliveries (Procfile: webhooks).
run-webhooks: | $(STAMP)
	$(BIN)/celery -A ffworker.celery_app worker -Q $${FFWORKER_TASK_QUEUE:-ffworker}.webhooks --concurrency 4 --prefetch-multiplier 1 --loglevel INFO

# Celery beat scheduler (Procfile: beat).
run-beat: | $(STAMP)
	$(BIN)/celery -A ffworker.celery_app beat --loglevel INFO

# Remove the virtualenv and local state.
clean:
	rm -rf $(VENV) var
