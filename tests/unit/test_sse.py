"""Pure parts of the event stream: event ids, what a client is owed, SSE parsing."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from ffworker.client import _parse_sse
from ffworker.sse import Cursor, format_event, is_finished, micros, pending_items

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
JOB_ID = uuid.UUID("5f0c1d9e-8a43-4a7e-9a57-0c2b3e4d5f60")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def event(id_, seconds, source, target, attempt, reason="x"):
    return {"id": id_, "at": at(seconds), "from_status": source, "to_status": target, "attempt": attempt,
            "reason": reason, "worker": "host:1"}


def job(status="running", progress_s=None, percent=None):
    row = {"id": JOB_ID, "status": status, "progress_at": at(progress_s) if progress_s is not None else None}
    for key in ("percent", "frame", "fps", "speed", "out_time_s", "eta_s"):
        row[f"progress_{key}"] = None
    row["progress_percent"] = percent
    return row


def present(row):
    return {"id": row["id"], "status": row["status"]}


HISTORY = [event(10, 0, None, "queued", 0), event(11, 1, "queued", "running", 1),
           event(12, 5, "running", "queued", 1, "io_error: EIO"), event(13, 9, "queued", "running", 2)]


def kinds(items):
    return [(i.event, i.data.get("status", i.data.get("percent"))) for i in items]


def test_a_new_client_gets_every_transition_and_the_progress_in_time_order():
    items = pending_items(job(progress_s=3, percent=40.0), HISTORY, Cursor(), present)
    assert kinds(items) == [("status", "queued"), ("status", "running"), ("progress", 40.0),
                            ("status", "queued"), ("status", "running")]
    assert items[2].data["attempt"] == 1  # written by the first run
    assert [str(i.cursor) for i in items] == [
        "10-0", "11-0", f"11-{micros(at(3))}", f"12-{micros(at(3))}", f"13-{micros(at(3))}"]


def test_a_resumed_client_gets_only_what_is_newer_than_its_cursor():
    row = job(progress_s=11, percent=70.0)
    seen = pending_items(row, HISTORY[:2], Cursor(), present)
    assert kinds(seen) == [("status", "queued"), ("status", "running"), ("progress", 70.0)]
    assert kinds(pending_items(row, HISTORY, seen[1].cursor, present)) == [
        ("status", "queued"), ("status", "running"), ("progress", 70.0)]
    everything = pending_items(row, HISTORY, Cursor(), present)
    assert pending_items(row, HISTORY, everything[-1].cursor, present) == []
    # progress already sent is not sent again, even when it is the only thing
    assert pending_items(row, HISTORY, Cursor(13, micros(at(11))), present) == []
    assert kinds(pending_items(row, HISTORY, Cursor(13, micros(at(10))), present)) == [("progress", 70.0)]


def test_the_terminal_status_carries_the_job_and_ends_the_stream():
    history = [*HISTORY, event(14, 20, "running", "completed", 2)]
    row = job(status="completed", progress_s=19, percent=100.0)
    items = pending_items(row, history, Cursor(13, 0), present)
    assert kinds(items) == [("progress", 100.0), ("status", "completed")]
    assert items[-1].data["job"] == {"id": str(JOB_ID), "status": "completed"}
    assert "job" not in items[0].data
    assert is_finished(row, history) and not is_finished(job(), HISTORY) and is_finished(None, [])


def test_event_ids_round_trip_and_garbage_is_ignored():
    assert Cursor.parse("12-1893456000000000") == Cursor(12, 1893456000000000)
    assert Cursor.parse(" 7-0 ") == Cursor(7, 0)
    for bad in (None, "", "abc", "1-2-3", "-1-0", "1-", "9" * 25 + "-1", "1\n-2"):
        assert Cursor.parse(bad) is None, bad
    item = pending_items(job(), HISTORY[:1], Cursor(), present)[0]
    assert format_event(item) == (b'id: 10-0\nevent: status\ndata: {"job_id":"5f0c1d9e-8a43-4a7e-9a57-0c2b3e4d5f60",'
                                  b'"status":"queued","previous_status":null,"attempt":0,'
                                  b'"at":"2030-01-01T00:00:00+00:00","reason":"x"}\n\n')


class FakeRaw:
    def __init__(self, chunks):
        self.chunks = list(chunks)

    def read1(self, _size):
        return self.chunks.pop(0) if self.chunks else b""


class FakeResponse:
    def __init__(self, chunks):
        self.raw = FakeRaw(chunks)


def test_the_sse_parser_handles_split_chunks_crlf_comments_and_multiline_data():
    chunks = [b"retry: 2000\n\n: keep-alive\n\nid: 1-0\nev", b"ent: status\ndata: {\"status\":", b" \"queued\"}\r",
              b"\n\r\nid: 2-5\r\nevent: progress\r\ndata: {\"percent\":\r\ndata: 5.0}\r\r",
              "id: 3-5\nevent: status\ndata: {\"reason\": \"caf\u00e9\"}\n\n".encode()[:-5],
              "id: 3-5\nevent: status\ndata: {\"reason\": \"caf\u00e9\"}\n\n".encode()[-5:],
              b"id: 4-5\nevent: status\ndata: {\"never\": \"finished\"}\n"]
    events = list(_parse_sse(FakeResponse(chunks)))
    assert [(e.id, e.event, e.data) for e in events] == [
        ("1-0", "status", {"status": "queued"}),
        ("2-5", "progress", {"percent": 5.0}),
        ("3-5", "status", {"reason": "caf\u00e9"}),
    ]
