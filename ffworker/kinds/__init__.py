"""The job kinds registry: every list of kinds (API schemas, OpenAPI, worker planners, CLI) derives from it.

A kind is a module here that builds a ``base.Kind``: its name, request schema,
submit-time path check and planner. Adding one means writing that module and
listing it below; the ledger's ``kind`` check constraint (``models.JOB_KINDS``
and a migration) has to agree, which a unit test asserts.
"""
from __future__ import annotations

from ffworker.kinds import command, concat, hls, probe, thumbnail, transcode
from ffworker.kinds.base import Kind

# In the order the API lists them.
KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    probe.KIND,
    transcode.KIND,
    thumbnail.KIND,
    concat.KIND,
    hls.KIND,
    command.KIND,
)}


def names() -> tuple[str, ...]:
    return tuple(KINDS)


def get(name: str) -> Kind | None:
    return KINDS.get(name)
