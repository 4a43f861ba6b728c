"""thumbnail: one frame of the input as an image (by default a tenth of the way in)."""
from __future__ import annotations

from pathlib import Path

from marshmallow import fields, validate

from ffworker.kinds.base import Kind, Plan, PlanError, RunContext, field_check, input_args
from ffworker.kinds.request import JobCommonSchema, RelativePath
from ffworker.media import duration_of, first_stream

NAME = "thumbnail"
THUMBNAIL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


class ThumbnailRequestSchema(JobCommonSchema):
    input = RelativePath(required=True)
    output = RelativePath(required=True)
    at_s = fields.Float(validate=validate.Range(min=0))
    width = fields.Integer(validate=validate.Range(16, 7680))


def plan_thumbnail(spec: dict, source: Path, probe: dict, target: Path) -> Plan:
    if first_stream(probe, "video") is None:
        raise PlanError("invalid_input", "the input has no video stream")
    duration = duration_of(probe)
    at_s = spec.get("at_s")
    if at_s is None:
        at_s = round(duration * 0.1, 3) if duration else 0.0
    elif duration is not None and at_s >= duration:
        raise PlanError("invalid_request", f"at_s={at_s} is beyond the input's duration of {duration:.3f} s")
    args = ["-ss", f"{at_s:.3f}", *input_args(source), "-frames:v", "1", "-an"]
    if spec.get("width"):
        args += ["-vf", f"scale={spec['width']}:-2"]
    suffix = target.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        args += ["-q:v", "2"]
    elif suffix == ".webp":
        args += ["-c:v", "libwebp"]
    args += ["-update", "1", "-y", str(target)]
    return Plan(args=args, duration_s=None, result={"at_s": at_s})


def plan_job(ctx: RunContext) -> Plan:
    source = ctx.input(ctx.spec["input"])
    probe = ctx.probe(source)
    target = ctx.output(ctx.spec["output"])
    return plan_thumbnail(ctx.spec, source, probe, target.temp)


check = field_check(inputs=("input",), outputs={"output": THUMBNAIL_SUFFIXES})
KIND = Kind(NAME, ThumbnailRequestSchema, check, plan_job)
