"""The kinds registry: every list of kinds is the registry's, and the ledger's constraint agrees."""
from __future__ import annotations

from pathlib import Path

import pytest
from marshmallow import ValidationError

from ffworker import kinds, models
from ffworker.cli import submit
from ffworker.config import Settings
from ffworker.kinds import command
from ffworker.kinds.request import JobCommonSchema
from ffworker.schemas import JobListArgsSchema, JobRequestSchema, split_request


def test_the_ledger_check_constraint_lists_the_registered_kinds():
    # models.JOB_KINDS feeds the jobs.kind CHECK constraint: a new kind needs a migration too.
    assert models.JOB_KINDS == kinds.names()


def test_each_kind_is_registered_under_its_own_name():
    for name, kind in kinds.KINDS.items():
        assert kind.name == name
        assert issubclass(kind.schema, JobCommonSchema)
        assert callable(kind.check) and callable(kind.plan)
    assert kinds.get("explode") is None


def test_the_request_schema_and_the_openapi_enum_come_from_the_registry():
    assert JobRequestSchema().fields["kind"].metadata["enum"] == list(kinds.names())
    with pytest.raises(ValidationError) as info:
        JobRequestSchema().load({"kind": "explode"})
    assert info.value.messages == {"kind": [f"must be one of: {', '.join(kinds.names())}"]}
    assert JobListArgsSchema().load({"kind": "hls"}) == {"kind": "hls", "limit": 50}
    with pytest.raises(ValidationError):
        JobListArgsSchema().load({"kind": "explode"})


def test_the_cli_offers_the_registered_kinds():
    (kind_argument,) = [param for param in submit.params if param.name == "kind"]
    assert tuple(kind_argument.type.choices) == kinds.names()


def test_only_the_command_kind_depends_on_a_setting():
    off, on = Settings(allow_raw_commands=False), Settings(allow_raw_commands=True)
    for name, kind in kinds.KINDS.items():
        assert kind.unavailable(on) is None
        assert (kind.unavailable(off) is not None) == (name == "command")
    assert command.SETTING in kinds.get("command").unavailable(off)
    # With object storage the argv's files could not be fetched or uploaded: never.
    bucket = Settings(allow_raw_commands=True, storage_url="s3://media-bucket/ffworker")
    for name, kind in kinds.KINDS.items():
        assert (kind.unavailable(bucket) is not None) == (name == "command")
    assert "FFWORKER_STORAGE_URL" in kinds.get("command").unavailable(bucket)


def test_field_checks_report_each_field_and_an_output_that_is_an_input(tmp_path: Path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    concat = kinds.get("concat")
    assert concat.check(tmp_path, {"inputs": ["a.mp4", "a.mp4"], "output": "b.mp4"}) == {}
    errors = concat.check(tmp_path, {"inputs": ["a.mp4", "../b.mp4"], "output": "a.mp4", "overwrite": True})
    assert set(errors) == {"inputs", "output"}
    assert errors["output"] == ["the output must not be one of the inputs"]
    assert kinds.get("probe").check(tmp_path, {"input": "missing.mp4"}) == {
        "input": ["input 'missing.mp4' does not exist"]}



def test_every_kind_takes_the_common_webhook_url_and_keeps_it_out_of_the_spec():
    for name, kind in kinds.KINDS.items():
        assert "webhook_url" in kind.schema._declared_fields, name
    loaded = JobRequestSchema().load({"kind": "probe", "input": "a.mp4", "webhook_url": "https://hooks.example.com/x"})
    common, spec = split_request(loaded)
    assert common["webhook_url"] == "https://hooks.example.com/x" and spec == {"input": "a.mp4", "overwrite": False}
