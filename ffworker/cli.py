"""``manage.py``: operate ffworker (database, tenants) and use it (submit, jobs, demo)."""
from __future__ import annotations

import json
import sys
from functools import cached_property
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ffworker import kinds
from ffworker.client import Client
from ffworker.config import settings_or_exit
from ffworker.terminal import api_call, console, err_console, follow

ROOT = Path(__file__).resolve().parent.parent


class Context:
    """Lazily built settings, app and services: `submit` and `jobs` need none of them.

    The commands that do need them check the settings first: an invalid one ends
    the command with one line naming the variable, before anything is done.
    """

    @cached_property
    def settings(self):
        return settings_or_exit()

    @cached_property
    def app(self):
        from ffworker.app import create_app

        return create_app({"FFWORKER_SETTINGS": self.settings})

    @property
    def services(self):
        return self.app.extensions["ffworker"]


pass_context = click.make_pass_decorator(Context, ensure=True)


@click.group()
def cli() -> None:
    """ffworker: media jobs over a REST API, a PostgreSQL ledger and Celery workers."""


# -- database ---------------------------------------------------------------


@cli.group()
def db() -> None:
    """Schema migrations."""


def alembic_config(database_url: str | None = None):
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    if database_url:
        config.attributes["database_url"] = database_url
    return config


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_context
def db_upgrade(ctx: Context, revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from alembic import command

    command.upgrade(alembic_config(ctx.settings.database_url), revision)
    click.echo(f"database at {revision}")


# -- tenants ----------------------------------------------------------------


@cli.group()
def tenants() -> None:
    """Tenants and API keys."""


@tenants.command("create")
@click.argument("name")
@pass_context
def tenants_create(ctx: Context, name: str) -> None:
    """Create tenant NAME; prints a new API key alone on the last line."""
    from ffworker.tenants import TenantError, create_tenant

    try:
        tenant, key = create_tenant(ctx.services.engine, name, ctx.services.settings.media_root)
    except TenantError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"created tenant {tenant.name}; media directory {ctx.services.settings.media_root / tenant.name}")
    click.echo("API key (shown once):", err=True)
    click.echo(key)


@tenants.command("issue-key")
@click.argument("name")
@pass_context
def tenants_issue_key(ctx: Context, name: str) -> None:
    """Issue another API key for tenant NAME (printed alone on the last line)."""
    from ffworker.tenants import TenantError, issue_key

    try:
        click.echo(issue_key(ctx.services.engine, name))
    except TenantError as exc:
        raise click.ClickException(str(exc))


@tenants.command("webhook-secret")
@click.argument("name")
@click.option("--rotate", is_flag=True, help="make a new secret; the previous one keeps signing for 24 h")
@pass_context
def tenants_webhook_secret(ctx: Context, name: str, rotate: bool) -> None:
    """Print tenant NAME's webhook signing secret alone on the last line (created if it has none)."""
    from ffworker import webhooks

    try:
        tenant_id = webhooks.tenant_id_by_name(ctx.services.engine, name)
    except webhooks.NotFound as exc:
        raise click.ClickException(str(exc))
    if rotate:
        rotated = webhooks.rotate_secret(ctx.services.engine, tenant_id)
        if rotated["previous_expires_at"] is not None:
            click.echo(f"rotated; the previous secret also signs until {_time(rotated['previous_expires_at'])}",
                       err=True)
        click.echo(rotated["secret"])
    else:
        click.echo(webhooks.current_secret(ctx.services.engine, tenant_id))


@tenants.command("list")
@pass_context
def tenants_list(ctx: Context) -> None:
    """Tenants and their keys (prefix only)."""
    from ffworker.tenants import list_tenants

    default_slots = ctx.settings.tenant_max_slots
    table = Table("tenant", "created", "slots", "rate", "key prefix", "key created", "revoked")
    for row in list_tenants(ctx.services.engine):
        slots = str(row["max_slots"]) if row["max_slots"] is not None else f"{default_slots} (default)"
        rate = f"{row['rate_per_min']}/min" if row["rate_per_min"] is not None else "-"
        table.add_row(
            row["name"], _time(row["created_at"]), slots, rate, row["prefix"] or "-",
            _time(row["key_created_at"]), _time(row["revoked_at"]),
        )
    console.print(table)


@tenants.command("set-limits")
@click.argument("name")
@click.option("--slots", type=str, default=None,
              help="running slots (a probe costs 1, a transcode 2, HLS 3); 'default' for FFWORKER_TENANT_MAX_SLOTS")
@click.option("--rate", type=str, default=None, help="jobs started per sliding minute, as N/min; 'none' for no limit")
@pass_context
def tenants_set_limits(ctx: Context, name: str, slots: str | None, rate: str | None) -> None:
    """Set a tenant's fair-share limits (shown by `tenants list`)."""
    from ffworker.tenants import TenantError, parse_rate, set_limits

    changes = {}
    try:
        if slots is not None:
            if slots.strip().lower() == "default":
                changes["slots"] = None
            elif slots.strip().isdigit():
                changes["slots"] = int(slots)
            else:
                raise TenantError(f"--slots {slots!r}: give a whole number ≥ 1, or default")
        if rate is not None:
            changes["rate"] = parse_rate(rate)
        row = set_limits(ctx.services.engine, name, **changes)
    except TenantError as exc:
        raise click.ClickException(str(exc)) from None
    slots_shown = row["max_slots"] if row["max_slots"] is not None else f"{ctx.settings.tenant_max_slots} (default)"
    rate_shown = f"{row['rate_per_min']}/min" if row["rate_per_min"] is not None else "none"
    click.echo(f"{name}: slots {slots_shown}, rate {rate_shown}")


@tenants.command("revoke-key")
@click.argument("key_or_prefix")
@pass_context
def tenants_revoke_key(ctx: Context, key_or_prefix: str) -> None:
    """Revoke a key, given whole or by the prefix `tenants list` shows."""
    from ffworker.tenants import TenantError, revoke_key

    try:
        count = revoke_key(ctx.services.engine, key_or_prefix)
    except TenantError as exc:
        raise click.ClickException(str(exc))
    if count == 0:
        raise click.ClickException("no active key matches")
    click.echo(f"revoked {count} key(s)")


def _time(value) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


# -- client commands ------------------------------------------------------


api_options = [
    click.option("--api", "api_url", envvar="FFWORKER_API_URL", default="http://127.0.0.1:8000", show_default=True,
                 help="Base URL of the web process."),
    click.option("--key", "api_key", envvar="FFWORKER_API_KEY", help="API key (or FFWORKER_API_KEY)."),
]


def with_api(command):
    for option in reversed(api_options):
        command = option(command)
    return command


def _client(api_url: str, api_key: str | None) -> Client:
    if not api_key:
        raise click.UsageError("an API key is needed: --key or FFWORKER_API_KEY (see `tenants create`)")
    return Client(api_url, api_key)


@cli.command()
@click.argument("kind", type=click.Choice(kinds.names()))
@click.option("--input", "input_", help="Input path, relative to the tenant's media directory.")
@click.option("--inputs", multiple=True, help="Inputs of a concat job (repeat).")
@click.option("--output", help="Output path (output_dir for hls).")
@click.option("--preset", help="Transcode preset, e.g. h264-720p.")
@click.option("--set", "fields", multiple=True, metavar="FIELD=JSON",
              help="Any other request field, its value as JSON (e.g. --set at_s=2.5 --set 'video={\"codec\":\"vp9\"}').")
@click.option("--workspace", default=None)
@click.option("--idempotency-key", default=None)
@click.option("--wait", is_flag=True, help="Show a progress bar until the job ends.")
@with_api
def submit(kind, input_, inputs, output, preset, fields, workspace, idempotency_key, wait, api_url, api_key):
    """Submit a KIND job through the REST API."""
    request: dict = {"kind": kind}
    for name, value in (("input", input_), ("preset", preset), ("workspace", workspace)):
        if value is not None:
            request[name] = value
    if inputs:
        request["inputs"] = list(inputs)
    if output is not None:
        request["output_dir" if kind == "hls" else "output"] = output
    for item in fields:
        name, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not FIELD=JSON", param_hint="--set")
        try:
            request[name] = json.loads(raw)
        except ValueError:
            request[name] = raw
    client = _client(api_url, api_key)
    job = api_call(lambda: client.submit(request, idempotency_key))
    err_console.print(f"submitted job [bold]{job['id']}[/] ({job['status']})")
    if wait:
        job = follow(client, job["id"])
        console.print_json(data=job)
        if job["status"] != "completed":
            sys.exit(1)
    else:
        click.echo(job["id"])


@cli.group()
def jobs() -> None:
    """List, show, watch and cancel jobs (through the REST API)."""


@jobs.command("list")
@click.option("--status")
@click.option("--kind")
@click.option("--workspace")
@click.option("--limit", default=20, show_default=True)
@with_api
def jobs_list(status, kind, workspace, limit, api_url, api_key):
    """The newest jobs."""
    page = api_call(lambda: _client(api_url, api_key).list(status=status, kind=kind, workspace=workspace, limit=limit))
    table = Table("id", "kind", "status", "progress", "workspace", "created")
    for job in page["jobs"]:
        percent = (job.get("progress") or {}).get("percent")
        table.add_row(job["id"], job["kind"], job["status"], f"{percent:.1f}%" if percent is not None else "-",
                      job["workspace"], job["created_at"])
    console.print(table)


@jobs.command("show")
@click.argument("job_id")
@with_api
def jobs_show(job_id, api_url, api_key):
    """One job as JSON."""
    console.print_json(data=api_call(lambda: _client(api_url, api_key).get(job_id)))


@jobs.command("watch")
@click.argument("job_id")
@with_api
def jobs_watch(job_id, api_url, api_key):
    """Follow a job's progress until it ends."""
    console.print_json(data=follow(_client(api_url, api_key), job_id))


@jobs.command("cancel")
@click.argument("job_id")
@with_api
def jobs_cancel(job_id, api_url, api_key):
    """Cancel a queued or running job."""
    job = api_call(lambda: _client(api_url, api_key).cancel(job_id))
    click.echo(f"{job['id']}: {job['status']}" + (" (cancel requested)" if job["status"] == "running" else ""))


# -- maintenance ------------------------------------------------------------


@cli.command()
@click.option("--dry-run", is_flag=True, help="Show what would be reaped and why; change nothing.")
@pass_context
def reap(ctx: Context, dry_run: bool) -> None:
    """Run one round of the stale-job reaper now (safe beside beat: one reaper acts at a time)."""
    from ffworker.maintenance import reaper

    settings = ctx.services.settings
    report = reaper.reap(ctx.services.ledger, stale_after_s=settings.stale_after_s,
                         grace_s=settings.reaper_grace_s, interval_s=settings.maintenance_interval_s,
                         dry_run=dry_run)
    if report.status == "skipped":
        click.echo("another reaper is running this round; nothing done")
        return
    if report.status == "arming":
        verb = "would arm" if dry_run else "armed"
        click.echo(f"{report.reason}: {verb} the grace period of {settings.reaper_grace_s:g} s; nothing reaped")
        return
    if report.status == "armed":
        click.echo(f"grace period after an outage: reaping resumes at {report.armed_until.isoformat()}")
        return
    table = Table("job", "attempt", "worker", "silent for" if dry_run else "reason", "becomes",
                  title="would reap" if dry_run else "reaped")
    for d in report.decisions:
        detail = str(d["silent_for"]).split(".")[0] if dry_run else d["error_message"]
        table.add_row(str(d["id"]), str(d["attempts"]), d["worker"] or "-", detail, d.get("to_status") or d["status"])
    console.print(table if report.decisions else "no stale jobs")


# -- reporting --------------------------------------------------------------


@cli.command()
@click.option("--since", default="7d", show_default=True,
              help="How far back: 30m, 12h, 7d, 2w (whole UTC days and months that overlap it).")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.option("--view", "view", type=click.Choice(["all", "daily", "usage", "wait", "stuck"]), default="all",
              show_default=True, help="daily counts, monthly usage, stuck jobs, or all three.")
@pass_context
def report(ctx: Context, since: str, tenant: str | None, output_format: str, view: str) -> None:
    """Print the reporting views (docs/ledger.md) straight from the ledger."""
    from ffworker import reporting

    try:
        tables = reporting.run(
            ctx.services.engine, since=reporting.parse_since(since), tenant=tenant,
            views=reporting.VIEWS if view == "all" else (view,),
            stale_after_s=ctx.services.settings.stale_after_s,
        )
    except reporting.ReportError as exc:
        raise click.ClickException(str(exc))
    if output_format == "json":
        click.echo(reporting.to_json(tables))
    elif output_format == "csv":
        click.echo(reporting.to_csv(tables), nl=False)
    else:
        wide = Console(width=max(console.width, 200)) if not console.is_terminal else console
        for table in map(reporting.for_table, tables):
            rendered = Table(*table.columns, title=reporting.TITLES[table.view], title_justify="left")
            for row in table.rows:
                rendered.add_row(*(reporting.cell(value) for value in row))
            wide.print(rendered if table.rows else f"{reporting.TITLES[table.view]}: no rows")


# -- demo -------------------------------------------------------------------


@cli.command()
@click.option("--port", default=lambda: settings_or_exit().port, show_default="$PORT or 8000")
@click.option("--seconds", default=10, show_default=True, help="Length of the generated clip.")
@pass_context
def demo(ctx: Context, port: int, seconds: int) -> None:
    """Transcode a generated 720p clip to 360p through the whole stack and show the ledger row."""
    from ffworker import demo as the_demo

    the_demo.run(ctx.app, port, seconds)


# -- operators (the dashboard) ----------------------------------------------------


@cli.group()
def operators() -> None:
    """Operators: dashboard users who see every tenant."""


@operators.command("create")
@click.argument("name")
@pass_context
def operators_create(ctx: Context, name: str) -> None:
    """Create operator NAME; prints its dashboard key alone on the last line."""
    from ffworker.operators import OperatorError, create_operator

    try:
        operator, key = create_operator(ctx.services.engine, name)
    except OperatorError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"created operator {operator.name}; sign in at /ui/login")
    click.echo("operator key (shown once):", err=True)
    click.echo(key)


@operators.command("list")
@pass_context
def operators_list(ctx: Context) -> None:
    """Operators and their keys (prefix only)."""
    from ffworker.operators import list_operators

    table = Table("operator", "key prefix", "created", "revoked")
    for row in list_operators(ctx.services.engine):
        table.add_row(row["name"], row["prefix"], _time(row["created_at"]), _time(row["revoked_at"]))
    console.print(table)


@operators.command("revoke")
@click.argument("name")
@pass_context
def operators_revoke(ctx: Context, name: str) -> None:
    """Revoke operator NAME's key; its dashboard sessions end at once."""
    from ffworker.operators import revoke_operator

    if revoke_operator(ctx.services.engine, name) == 0:
        raise click.ClickException(f"no active operator named {name!r}")
    click.echo(f"revoked operator {name}")


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    cli(prog_name="manage.py")
