"""probe: ffprobe's view of one input, summarised; nothing is written."""
from __future__ import annotations

from ffworker import media
from ffworker.kinds.base import Kind, Plan, RunContext, field_check
from ffworker.kinds.request import JobCommonSchema, RelativePath

NAME = "probe"


class ProbeRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)


def plan_job(ctx: RunContext) -> Plan:
    probe = ctx.probe(ctx.input(ctx.spec["input"]))
    return Plan(args=None, duration_s=media.duration_of(probe), result={"media": media.summarize(probe)})


check = field_check(inputs=("input",))
KIND = Kind(NAME, ProbeRequestSchema, check, plan_job)
