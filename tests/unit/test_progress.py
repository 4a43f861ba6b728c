import pytest

from ffworker.progress import Progress, ProgressParser

# Captured from `ffmpeg -progress pipe:1 -nostats` encoding a 4 s clip; the
# first block carries the start-up sentinel that ffmpeg prints before any output.
CAPTURE = """\
frame=0
fps=0.00
stream_0_0_q=0.0
bitrate=N/A
total_size=48
out_time_us=-9223372036854775807
out_time_ms=-9223372036854775807
out_time=-577014:32:22.775808
dup_frames=0
drop_frames=0
speed=N/A
progress=continue
frame=26
fps=25.81
stream_0_0_q=2.0
bitrate=   0.4kbits/s
total_size=44
out_time_us=1000000
out_time_ms=1000000
out_time=00:00:01.000000
dup_frames=0
drop_frames=0
speed=0.996x
progress=continue
frame=75
fps=37.20
stream_0_0_q=2.0
bitrate= 211.3kbits/s
total_size=79012
out_time_us=3000000
out_time_ms=3000000
out_time=00:00:03.000000
dup_frames=0
drop_frames=0
speed=1.5x
progress=continue
frame=100
fps=39.80
stream_0_0_q=-1.0
bitrate= 220.0kbits/s
total_size=110000
out_time_us=4000000
out_time_ms=4000000
out_time=00:00:04.000000
dup_frames=0
drop_frames=0
speed=1.59x
progress=end
"""


def feed(parser: ProgressParser, text: str) -> list[Progress]:
    snapshots = (parser.feed_line(line) for line in text.splitlines())
    return [s for s in snapshots if s is not None]


def block(**fields: str) -> str:
    closing = fields.pop("progress", "continue")
    lines = [f"{key}={value}" for key, value in fields.items()]
    return "\n".join([*lines, f"progress={closing}"]) + "\n"


def test_capture_yields_one_snapshot_per_block():
    snapshots = feed(ProgressParser(duration_s=4.0), CAPTURE)

    assert [s.ended for s in snapshots] == [False, False, False, True]
    assert [s.frame for s in snapshots] == [0, 26, 75, 100]
    assert [s.out_time_s for s in snapshots] == [None, 1.0, 3.0, 4.0]
    assert [s.percent for s in snapshots] == [None, 25.0, 75.0, 100.0]


def test_mid_run_snapshot_has_rates_and_eta():
    middle = feed(ProgressParser(duration_s=4.0), CAPTURE)[2]

    assert middle.fps == pytest.approx(37.2)
    assert middle.speed == pytest.approx(1.5)
    assert middle.eta_s == pytest.approx((4.0 - 3.0) / 1.5)


def test_negative_sentinel_is_unknown():
    first = feed(ProgressParser(duration_s=4.0), CAPTURE)[0]

    assert first.out_time_s is None
    assert first.percent is None
    assert first.eta_s is None
    assert first.speed is None


def test_end_block_is_complete():
    last = feed(ProgressParser(duration_s=4.0), CAPTURE)[-1]

    assert last.ended is True
    assert last.percent == 100.0
    assert last.eta_s == 0.0


def test_end_reports_100_even_when_output_stops_short_of_duration():
    parser = ProgressParser(duration_s=10.0)

    last = feed(parser, block(out_time_us="9960000", speed="2x", progress="end"))[0]

    assert last.percent == 100.0
    assert last.eta_s == 0.0


def test_end_without_duration_has_no_percent():
    last = feed(ProgressParser(duration_s=None), block(out_time_us="1000000", progress="end"))[0]

    assert last.ended is True
    assert last.percent is None
    assert last.eta_s == 0.0


@pytest.mark.parametrize("duration", [None, 0, 0.0, -5.0])
def test_unknown_duration_gives_no_percent_or_eta(duration):
    snapshots = feed(ProgressParser(duration_s=duration), CAPTURE)

    assert all(s.percent is None for s in snapshots)
    assert all(s.eta_s is None for s in snapshots if not s.ended)
    assert snapshots[2].out_time_s == 3.0


def test_out_time_ms_is_microseconds():
    snapshot = feed(ProgressParser(duration_s=10.0), block(out_time_ms="2500000"))[0]

    assert snapshot.out_time_s == 2.5
    assert snapshot.percent == 25.0


def test_out_time_clock_is_used_when_counters_are_missing():
    snapshot = feed(ProgressParser(duration_s=7200.0), block(out_time="01:30:00.500000"))[0]

    assert snapshot.out_time_s == pytest.approx(5400.5)
    assert snapshot.percent == pytest.approx(75.0, abs=0.01)


def test_out_time_us_wins_over_other_time_keys():
    text = block(out_time="00:00:09.000000", out_time_ms="5000000", out_time_us="2000000")

    assert feed(ProgressParser(duration_s=10.0), text)[0].out_time_s == 2.0


def test_unknown_out_time_us_falls_back_to_out_time_ms():
    text = block(out_time_us="N/A", out_time_ms="3000000")

    assert feed(ProgressParser(duration_s=10.0), text)[0].out_time_s == 3.0


def test_values_carry_over_until_explicitly_unknown():
    parser = ProgressParser(duration_s=10.0)
    feed(parser, block(frame="10", fps="25.0", speed="2.0x", out_time_us="1000000"))

    carried = feed(parser, block(frame="20"))[0]
    assert (carried.fps, carried.speed, carried.out_time_s) == (25.0, 2.0, 1.0)

    reset = feed(parser, block(fps="N/A", speed="N/A", out_time_us="N/A"))[0]
    assert (reset.frame, reset.fps, reset.speed, reset.out_time_s) == (20, None, None, None)
    assert reset.percent is None
    assert reset.eta_s is None


def test_sentinel_after_known_time_resets_it():
    parser = ProgressParser(duration_s=10.0)
    feed(parser, block(out_time_us="4000000"))

    snapshot = feed(parser, block(out_time_us="-9223372036854775807"))[0]

    assert snapshot.out_time_s is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.9x", 1.9),
        (" 783x", 783.0),
        ("0.952x", 0.952),
        ("2", 2.0),
        ("N/A", None),
        ("0x", 0.0),
        ("-1x", None),
    ],
)
def test_speed_parsing(raw, expected):
    snapshot = feed(ProgressParser(duration_s=None), block(speed=raw))[0]

    assert snapshot.speed == expected


def test_zero_speed_gives_no_eta():
    snapshot = feed(ProgressParser(duration_s=10.0), block(out_time_us="1000000", speed="0x"))[0]

    assert snapshot.eta_s is None


def test_percent_is_clamped_to_100():
    # Containers often report a duration slightly shorter than the decoded stream.
    snapshot = feed(ProgressParser(duration_s=4.0), block(out_time_us="4080000", speed="1x"))[0]

    assert snapshot.percent == 100.0
    assert snapshot.eta_s == 0.0


def test_garbage_lines_are_ignored():
    parser = ProgressParser(duration_s=10.0)
    noise = [
        "",
        "   ",
        "\r",
        "no equals sign here",
        "=value without key",
        "frame=not-a-number",
        "fps=inf",
        "out_time=garbage",
        "out_time_us=12abc",
        "progress=maybe",
        "[mp4 @ 0x55d] Starting second pass: moving the moov atom",
    ]

    assert [parser.feed_line(line) for line in noise] == [None] * len(noise)
    snapshot = feed(parser, block(frame="5", out_time_us="1000000"))[0]
    assert snapshot.frame == 5
    assert snapshot.fps is None
    assert snapshot.out_time_s == 1.0


def test_crlf_and_trailing_whitespace_are_tolerated():
    parser = ProgressParser(duration_s=10.0)
    lines = ["frame=12 \r\n", "out_time_us=5000000\r\n", "speed=2.5x  \r\n", "progress=continue\r\n"]

    snapshot = [parser.feed_line(line) for line in lines][-1]

    assert snapshot is not None
    assert (snapshot.frame, snapshot.out_time_s, snapshot.speed) == (12, 5.0, 2.5)
    assert snapshot.percent == 50.0
    assert snapshot.eta_s == 2.0


def test_as_dict_rounds_values():
    snapshot = Progress(
        frame=42,
        fps=29.97003,
        speed=1.23456,
        out_time_s=1.2345678,
        percent=33.33333,
        eta_s=7.0004999,
        ended=False,
    )

    assert snapshot.as_dict() == {
        "percent": 33.3,
        "frame": 42,
        "fps": 29.97,
        "speed": 1.235,
        "out_time_s": 1.235,
        "eta_s": 7.0,
    }


def test_as_dict_keeps_unknowns_as_none():
    first = feed(ProgressParser(duration_s=None), CAPTURE)[0]

    assert first.as_dict() == {
        "percent": None,
        "frame": 0,
        "fps": 0.0,
        "speed": None,
        "out_time_s": None,
        "eta_s": None,
    }
