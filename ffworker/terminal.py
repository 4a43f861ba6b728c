"""What a person sees of a job in the terminal: a live progress bar, and API failures as one line.

Shared by ``manage.py submit --wait`` / ``jobs watch`` and the demo.
"""
from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from ffworker.client import ApiError, Client

console = Console()
err_console = Console(stderr=True)


def api_call(call):
    """A client call, its failures as one-line command errors."""
    try:
        return call()
    except ApiError as exc:
        raise click.ClickException(str(exc))
    except OSError as exc:
        raise click.ClickException(f"cannot reach the API: {exc}")


def follow(client: Client, job_id: str) -> dict:
    """Live progress bar (percent, speed, ETA) from the job's event stream until it ends;
    returns the final job."""
    columns = (
        TextColumn("[bold]{task.fields[status]:>9}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[speed]:>7}"), TextColumn("{task.fields[eta]}"),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task("job", total=100, status="queued", speed="", eta="")

        def update(job: dict) -> None:
            bar.update(task, **progress_fields(job))

        return api_call(lambda: client.wait(job_id, update))


def progress_fields(job: dict) -> dict:
    """What the progress bar shows of a job (or of the stream's latest status and progress)."""
    progress = job.get("progress") or {}
    status = job.get("status") or "queued"
    fields = {"status": status, "speed": "", "eta": ""}
    if progress.get("percent") is not None:
        fields["completed"] = progress["percent"]
    if status == "completed":
        fields["completed"] = 100.0
    if status == "running":
        if progress.get("speed"):
            fields["speed"] = f"{progress['speed']:.2f}x"
        if progress.get("eta_s") is not None:
            fields["eta"] = f"ETA {_duration(progress['eta_s'])}"
    return fields


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
