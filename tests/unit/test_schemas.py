"""Request validation (``JobRequestSchema``) and the API's view of a ledger row (``present``)."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest
from marshmallow import ValidationError

from ffworker.kinds.request import METADATA_MAX_BYTES
from ffworker.schemas import JobRequestSchema, JobSchema, present, split_request
from tests.helpers import field_names

COMMON_DEFAULTS = {"priority": 0, "timeout_s": None, "workspace": "default", "metadata": {}, "overwrite": False,
                   "webhook_url": None}


def load(body):
    return JobRequestSchema().load(body)


error_fields = field_names


def rejected_fields(body) -> set[str]:
    with pytest.raises(ValidationError) as info:
        load(body)
    return error_fields(info.value.messages)


# -- valid bodies ---------------------------------------------------------------


def test_probe_defaults():
    assert load({"kind": "probe", "input": "a.mp4"}) == {"kind": "probe", "input": "a.mp4", **COMMON_DEFAULTS}


def test_transcode_with_a_preset():
    body = {"kind": "transcode", "input": "in/a.mp4", "output": "out/a.mp4", "preset": "h264-720p"}
    assert load(body) == {**body, **COMMON_DEFAULTS}


@pytest.mark.parametrize("preset", ["h264-360p", "h264-480p", "h264-720p", "h264-1080p"])
def test_every_video_preset_loads_for_mp4(preset):
    assert load({"kind": "transcode", "input": "a.mp4", "output": "b.mp4", "preset": preset})["preset"] == preset


def test_audio_preset_loads_for_m4a():
    assert load({"kind": "transcode", "input": "a.mp4", "output": "b.m4a", "preset": "audio-aac"})["preset"] == "audio-aac"


def test_transcode_explicit_settings_fill_codec_defaults():
    loaded = load({
        "kind": "transcode", "input": "a.mp4", "output": "b.mp4",
        "video": {"crf": 20, "height": 720, "preset": "slow", "fps": 30},
        "audio": {"bitrate": "128k"},
    })
    assert loaded["video"] == {"codec": "h264", "crf": 20, "height": 720, "preset": "slow", "fps": 30.0}
    assert loaded["audio"] == {"codec": "aac", "bitrate": "128k"}
    assert "preset" not in loaded and "container" not in loaded


def test_transcode_explicit_webm():
    loaded = load({"kind": "transcode", "input": "a.mp4", "output": "b.webm",
                   "video": {"codec": "vp9", "quality": "480p"}, "audio": {"codec": "opus"}})
    assert loaded["video"] == {"codec": "vp9", "quality": "480p"}
    assert loaded["audio"] == {"codec": "opus"}


def test_container_overrides_the_suffix():
    # .webm could not hold h264, but the explicit container decides.
    loaded = load({"kind": "transcode", "input": "a.mp4", "output": "b.webm", "container": "mkv",
                   "video": {"codec": "h264"}})
    assert loaded["container"] == "mkv"


def test_thumbnail_with_and_without_options():
    assert load({"kind": "thumbnail", "input": "a.mp4", "output": "t.jpg"}) == {
        "kind": "thumbnail", "input": "a.mp4", "output": "t.jpg", **COMMON_DEFAULTS,
    }
    loaded = load({"kind": "thumbnail", "input": "a.mp4", "output": "t.png", "at_s": 2, "width": 320})
    assert loaded["at_s"] == 2.0 and loaded["width"] == 320


def test_common_fields_are_kept():
    loaded = load({"kind": "probe", "input": "a.mp4", "priority": -100, "timeout_s": 5, "workspace": "team.a:b-c_1",
                   "metadata": {"x": [1, {"y": None}]}, "overwrite": True})
    assert loaded["priority"] == -100 and loaded["timeout_s"] == 5 and loaded["workspace"] == "team.a:b-c_1"
    assert loaded["metadata"] == {"x": [1, {"y": None}]} and loaded["overwrite"] is True


def test_metadata_of_exactly_the_limit_loads_and_one_byte_more_does_not():
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    exact = {"k": "x" * (METADATA_MAX_BYTES - overhead)}
    assert load({"kind": "probe", "input": "a.mp4", "metadata": exact})["metadata"] == exact
    over = {"k": "x" * (METADATA_MAX_BYTES - overhead + 1)}
    assert "metadata" in rejected_fields({"kind": "probe", "input": "a.mp4", "metadata": over})


def test_metadata_size_counts_bytes_not_characters():
    # 6000 three-byte characters: 6000 characters, 18000 bytes.
    assert "metadata" in rejected_fields({"kind": "probe", "input": "a.mp4", "metadata": {"k": "€" * 6000}})


def test_non_ascii_metadata_is_measured_in_utf8_bytes():
    metadata = {"k": "€" * 4000}  # 12,008 bytes as UTF-8 JSON: under the limit
    assert len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode()) < METADATA_MAX_BYTES
    assert load({"kind": "probe", "input": "a.mp4", "metadata": metadata})["metadata"] == metadata


def test_split_request_separates_common_fields_from_the_spec():
    loaded = load({"kind": "transcode", "input": "a.mp4", "output": "b.mp4", "preset": "h264-360p",
                   "workspace": "w", "metadata": {"m": 1}, "priority": 3, "timeout_s": 9})
    common, spec = split_request(loaded)
    assert common == {"kind": "transcode", "priority": 3, "timeout_s": 9, "workspace": "w", "metadata": {"m": 1},
                      "webhook_url": None}
    assert spec == {"input": "a.mp4", "output": "b.mp4", "preset": "h264-360p", "overwrite": False}


# -- invalid bodies ------------------------------------------------------------------


INVALID = {
    "no kind": ({"input": "a.mp4"}, "kind"),
    "unknown kind": ({"kind": "explode", "input": "a.mp4"}, "kind"),
    "kind not a string": ({"kind": 3, "input": "a.mp4"}, "kind"),
    "kind of another case": ({"kind": "Probe", "input": "a.mp4"}, "kind"),
    "unknown field": ({"kind": "probe", "input": "a.mp4", "extra": 1}, "extra"),
    "a transcode field on a probe": ({"kind": "probe", "input": "a.mp4", "output": "b.mp4"}, "output"),
    "unknown video field": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"vf": "x"}}, "video.vf"),
    "unknown audio field": ({"kind": "transcode", "input": "a", "output": "b.mp4", "audio": {"af": "x"}}, "audio.af"),
    "missing input": ({"kind": "probe"}, "input"),
    "empty input": ({"kind": "probe", "input": ""}, "input"),
    "input too long": ({"kind": "probe", "input": "a" * 1025}, "input"),
    "input not a string": ({"kind": "probe", "input": 5}, "input"),
    "missing output": ({"kind": "transcode", "input": "a.mp4"}, "output"),
    "thumbnail without output": ({"kind": "thumbnail", "input": "a.mp4"}, "output"),
    "bad preset": ({"kind": "transcode", "input": "a", "output": "b.mp4", "preset": "h264-4k"}, "preset"),
    "crf 52": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"crf": 52}}, "video.crf"),
    "crf -1": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"crf": -1}}, "video.crf"),
    "odd height": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"height": 361}}, "video.height"),
    "height too small": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"height": 8}}, "video.height"),
    "height and quality": (
        {"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"height": 720, "quality": "720p"}},
        "video.quality",
    ),
    "unknown quality": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"quality": "8k"}}, "video.quality"),
    "unknown x264 preset": (
        {"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"preset": "placebo2"}}, "video.preset",
    ),
    "fps zero": ({"kind": "transcode", "input": "a", "output": "b.mp4", "video": {"fps": 0}}, "video.fps"),
    "unknown video codec": ({"kind": "transcode", "input": "a", "output": "b.mkv", "video": {"codec": "x"}}, "video.codec"),
    "unknown audio codec": ({"kind": "transcode", "input": "a", "output": "b.mkv", "audio": {"codec": "x"}}, "audio.codec"),
    "bitrate without k": ({"kind": "transcode", "input": "a", "output": "b.mp4", "audio": {"bitrate": "128"}}, "audio.bitrate"),
    "bitrate with an option": (
        {"kind": "transcode", "input": "a", "output": "b.mp4", "audio": {"bitrate": "128k -f null"}}, "audio.bitrate",
    ),
    "webm with h264": ({"kind": "transcode", "input": "a", "output": "b.webm", "video": {"codec": "h264"}}, "video"),
    "webm with aac": (
        {"kind": "transcode", "input": "a", "output": "b.webm", "video": {"codec": "vp9"}, "audio": {"codec": "aac"}},
        "audio",
    ),
    "mov with vp9": ({"kind": "transcode", "input": "a", "output": "b.mov", "video": {"codec": "vp9"}}, "video"),
    "video preset for m4a": ({"kind": "transcode", "input": "a", "output": "b.m4a", "preset": "h264-360p"}, "video"),
    "video into m4a": ({"kind": "transcode", "input": "a", "output": "b.m4a", "video": {"codec": "h264"}}, "video"),
    "preset and video": (
        {"kind": "transcode", "input": "a", "output": "b.mp4", "preset": "h264-360p", "video": {"crf": 1}}, "preset",
    ),
    "preset and audio": (
        {"kind": "transcode", "input": "a", "output": "b.mp4", "preset": "h264-360p", "audio": {"codec": "aac"}},
        "preset",
    ),
    "unknown container": ({"kind": "transcode", "input": "a", "output": "b.mp4", "container": "avi"}, "container"),
    "priority too high": ({"kind": "probe", "input": "a", "priority": 101}, "priority"),
    "priority too low": ({"kind": "probe", "input": "a", "priority": -101}, "priority"),
    "priority a string": ({"kind": "probe", "input": "a", "priority": "high"}, "priority"),
    "priority a boolean": ({"kind": "probe", "input": "a", "priority": True}, "priority"),
    "timeout zero": ({"kind": "probe", "input": "a", "timeout_s": 0}, "timeout_s"),
    "empty workspace": ({"kind": "probe", "input": "a", "workspace": ""}, "workspace"),
    "workspace with a slash": ({"kind": "probe", "input": "a", "workspace": "a/b"}, "workspace"),
    "workspace starting with a dot": ({"kind": "probe", "input": "a", "workspace": ".hidden"}, "workspace"),
    "workspace too long": ({"kind": "probe", "input": "a", "workspace": "w" * 65}, "workspace"),
    "metadata a list": ({"kind": "probe", "input": "a", "metadata": [1]}, "metadata"),
    "metadata over 16 KiB": ({"kind": "probe", "input": "a", "metadata": {"k": "x" * 16384}}, "metadata"),
    "overwrite a string": ({"kind": "probe", "input": "a", "overwrite": "sometimes"}, "overwrite"),
    "negative at_s": ({"kind": "thumbnail", "input": "a", "output": "t.jpg", "at_s": -0.1}, "at_s"),
    "at_s NaN": ({"kind": "thumbnail", "input": "a", "output": "t.jpg", "at_s": float("nan")}, "at_s"),
    "width too small": ({"kind": "thumbnail", "input": "a", "output": "t.jpg", "width": 15}, "width"),
    "width too large": ({"kind": "thumbnail", "input": "a", "output": "t.jpg", "width": 7681}, "width"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_bodies_name_the_field(case):
    body, field = INVALID[case]
    assert field in rejected_fields(body)


@pytest.mark.parametrize("body", [None, [], [{"kind": "probe", "input": "a"}], "probe", 3, True])
def test_a_body_that_is_not_an_object_is_rejected(body):
    with pytest.raises(ValidationError) as info:
        load(body)
    assert info.value.messages


def test_an_unsupported_output_suffix_is_rejected():
    # The error names the container derived from the suffix.
    fields = rejected_fields({"kind": "transcode", "input": "a.mp4", "output": "b.avi"})
    assert fields & {"output", "container"}


def test_several_errors_are_reported_together():
    fields = rejected_fields({"kind": "probe", "input": "", "priority": 999, "bogus": 1})
    assert {"input", "priority", "bogus"} <= fields


def test_a_workspace_with_a_trailing_newline_is_rejected():
    assert "workspace" in rejected_fields({"kind": "probe", "input": "a", "workspace": "team\n"})


def test_a_bitrate_with_a_trailing_newline_is_rejected():
    body = {"kind": "transcode", "input": "a", "output": "b.mp4", "audio": {"bitrate": "128k\n"}}
    assert "audio.bitrate" in rejected_fields(body)


def test_a_webm_transcode_without_explicit_codecs_loads():
    load({"kind": "transcode", "input": "a.mp4", "output": "b.webm"})


def test_an_mp3_transcode_without_explicit_codecs_loads():
    load({"kind": "transcode", "input": "a.mp4", "output": "b.mp3"})


@pytest.mark.parametrize("output", ["b.mp4", "b.mov", "b.mkv", "b.m4a", "b.ogg", "B.MP4"])
def test_transcode_without_explicit_codecs_loads_for_containers_with_working_defaults(output):
    assert load({"kind": "transcode", "input": "a.mp4", "output": output})["output"] == output


# -- present(): the API's view of a ledger row --------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def ledger_row(**changes) -> dict:
    row = {
        "id": uuid.UUID("6a1d3b8c-1111-4222-8333-944455556666"), "tenant_id": uuid.uuid4(), "tenant_name": "acme",
        "kind": "transcode", "status": "queued", "workspace": "default", "priority": 0,
        "spec": {"input": "a.mp4", "output": "b.mp4", "preset": "h264-360p", "overwrite": False},
        "metadata": {"ref": 7}, "idempotency_key": "k1", "request_sha256": "ab" * 32,
        "attempts": 0, "max_attempts": 3, "timeout_s": 600, "worker": None,
        "created_at": NOW, "updated_at": NOW, "run_after": NOW, "dispatched_at": NOW, "dispatch_count": 1,
        "started_at": None, "heartbeat_at": None, "finished_at": None, "cancel_requested_at": None,
        "progress_at": None, "progress_percent": None, "progress_frame": None, "progress_fps": None,
        "progress_speed": None, "progress_out_time_s": None, "progress_eta_s": None,
        "media_duration_s": None, "result": None, "error_code": None, "error_message": None, "stderr_tail": None,
    }
    row.update(changes)
    return row


PROGRESS = dict(progress_percent=45.2, progress_frame=1234, progress_fps=30.2, progress_speed=1.9,
                progress_out_time_s=83.45, progress_eta_s=12.3)


def test_present_queued_job():
    view = present(ledger_row())
    assert view["id"] == uuid.UUID("6a1d3b8c-1111-4222-8333-944455556666")
    assert view["status"] == "queued" and view["kind"] == "transcode"
    assert view["spec"] == ledger_row()["spec"] and view["metadata"] == {"ref": 7}
    assert view["progress"] is None and view["result"] is None and view["error"] is None
    assert view["timeout_s"] == 600 and view["max_attempts"] == 3


def test_present_hides_internal_columns():
    row = ledger_row(status="failed", worker="w1@host", stderr_tail="/srv/media/acme/a.mp4: boom",
                     error_code="ffmpeg_failed", error_message="boom", heartbeat_at=NOW)
    view = present(row)
    hidden = {"stderr_tail", "worker", "tenant_id", "tenant_name", "idempotency_key", "request_sha256",
              "heartbeat_at", "run_after", "dispatched_at", "dispatch_count", "media_duration_s"}
    assert not hidden & set(view)
    assert not any(key.startswith("progress_") for key in view)
    assert "/srv/media" not in json.dumps(JobSchema().dump(view))


def test_progress_is_null_until_the_first_progress_write():
    # Progress columns without progress_at (e.g. left over) are not shown.
    assert present(ledger_row(status="running", **PROGRESS))["progress"] is None
    view = present(ledger_row(status="running", progress_at=NOW, **PROGRESS))
    assert view["progress"] == {"percent": 45.2, "frame": 1234, "fps": 30.2, "speed": 1.9,
                                "out_time_s": 83.45, "eta_s": 12.3}


def test_progress_percent_may_be_null_when_the_duration_is_unknown():
    view = present(ledger_row(status="running", progress_at=NOW, **{**PROGRESS, "progress_percent": None}))
    assert view["progress"]["percent"] is None and view["progress"]["frame"] == 1234


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_error_is_shown_for_failed_and_cancelled(status):
    view = present(ledger_row(status=status, error_code="timeout", error_message="ran 600 s", finished_at=NOW))
    assert view["error"] == {"code": "timeout", "message": "ran 600 s"}


@pytest.mark.parametrize("status", ["queued", "running", "completed"])
def test_error_is_hidden_for_other_statuses(status):
    # A job re-queued after a transient failure keeps the error columns of its last attempt.
    row = ledger_row(status=status, error_code="ffmpeg_killed", error_message="signal 9",
                     result={"outputs": []} if status == "completed" else None)
    assert present(row)["error"] is None


def test_result_only_for_completed():
    result = {"outputs": [{"path": "b.mp4", "size_bytes": 10}]}
    assert present(ledger_row(status="completed", result=result, finished_at=NOW))["result"] == result
    for status in ("queued", "running", "failed", "cancelled"):
        assert present(ledger_row(status=status, result=result))["result"] is None, status


def test_a_presented_job_serialises_with_job_schema():
    view = present(ledger_row(status="completed", progress_at=NOW, result={"outputs": []}, finished_at=NOW, **PROGRESS))
    dumped = JobSchema().dump(view)
    assert dumped["id"] == "6a1d3b8c-1111-4222-8333-944455556666"
    assert dumped["created_at"].startswith("2026-01-02T03:04:05")
    assert dumped["progress"]["out_time_s"] == 83.45
    assert set(dumped) == set(view)
