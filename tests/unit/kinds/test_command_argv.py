"""Raw ffmpeg argv: what is accepted, what is refused (and why), and the argv the worker runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ffworker import paths
from ffworker.config import Settings
from ffworker.kinds import command
from ffworker.kinds.base import INPUT_FORMATS, Output, PlanError
from ffworker.kinds.command import CommandRefused, check_filtergraph, filter_options, get_token, parse, parse_filtergraph

LEGITIMATE = [
    (["-i", "in.mp4", "-vf", "scale=160:-2", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
      "out/small.mp4"], ["out/small.mp4"]),
    (["-y", "-ss", "1.5", "-i", "in.mp4", "-t", "2", "-filter_complex",
      "[0:v]fps=10,scale=320:-1:flags=lanczos,split[a][b];[a]palettegen[p];"
      "[b][p]paletteuse=dither=bayer:bayer_scale=3", "-an", "clip.gif"], ["clip.gif"]),
    (["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=1", "-f", "lavfi", "-i", "sine=frequency=1000",
      "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "96k", "bars.mp4"], ["bars.mp4"]),
    (["-i", "a.mp4", "-i", "b.mp4", "-filter_complex", "[0:v][1:v]hstack=inputs=2[v];[0:a][1:a]amix=inputs=2[a]",
      "-map", "[v]", "-map", "[a]", "-metadata", "title=Side by side", "-metadata:s:a:0", "language=eng",
      "side.mkv"], ["side.mkv"]),
    (["-i", "in.mp4", "-map", "0:v:0", "-map", "0:a:0?", "-c", "copy", "-movflags", "+faststart", "remux.mp4",
      "-map", "0:a:0", "-vn", "-c:a", "libmp3lame", "-q:a", "2", "audio.mp3"], ["remux.mp4", "audio.mp3"]),
    (["-i", "in.mkv", "-attach", "fonts/DejaVuSans.ttf", "-metadata:s:t", "mimetype=application/x-truetype-font",
      "-c", "copy", "with-font.mkv"], ["with-font.mkv"]),
    (["-i", "in.mp4", "-c:v", "libx264", "-crf", "23", "-force_key_frames", "expr:gte(t,n_forced*2)",
      "-c:a", "aac", "-bsf:a", "aac_adtstoasc", "keys.mp4"], ["keys.mp4"]),
]


@pytest.mark.parametrize("args, outputs", LEGITIMATE, ids=lambda v: v[-1] if isinstance(v, list) else "")
def test_legitimate_argv_is_accepted(args, outputs):
    assert parse(args).paths("output") == outputs


HOSTILE = [
    # paths outside the media directory, and protocols
    (["-i", "../other-tenant/in.mp4", "o.mp4"], "must not contain '..'"),
    (["-i", "/etc/passwd", "o.mp4"], "must be relative"),
    (["-i", "in.mp4", "/tmp/o.mp4"], "must be relative"),
    (["-i", "in.mp4", "../../o.mp4"], "must not contain '..'"),
    (["-i", "in.mp4", "~/o.mp4"], "'~'"),
    (["-i", "http://169.254.169.254/latest/meta-data", "o.mp4"], "protocol"),
    (["-i", "concat:in.mp4|/etc/passwd", "o.mp4"], "protocol"),
    (["-i", "file:/etc/passwd", "o.mp4"], "protocol"),
    (["-i", "subfile:,start,0,end,0,:/etc/passwd", "o.mp4"], "protocol"),
    (["-i", "in.mp4", "pipe:1.mp4"], "protocol"),
    (["-i", "in.mp4", "tcp://10.0.0.1:9000.mp4"], "protocol"),
    (["-i", "in.mp4", "-"], "'-'"),
    (["-i", "-", "o.mp4"], "'-'"),
    (["-i", "in.mp4", "-attach", "/etc/passwd", "o.mkv"], "must be relative"),
    # demuxers and muxers that open or write other files
    (["-f", "concat", "-i", "list.txt", "o.mp4"], "format 'concat' is not allowed"),
    (["-f", "concat", "-safe", "0", "-i", "list.txt", "o.mp4"], "concat demuxer"),
    (["-f", "hls", "-i", "in.m3u8", "o.mp4"], "format 'hls' is not allowed"),
    (["-i", "in.mp4", "-f", "tee", "o.mp4"], "format 'tee' is not allowed"),
    (["-i", "in.mp4", "-f", "segment", "o.mp4"], "format 'segment' is not allowed"),
    (["-i", "in.mp4", "o.m3u8"], "must end in one of"),
    (["-i", "in.mp4", "frames-%03d.png"], "'%'"),
    # lavfi sources and filters that read files, sockets, libraries
    (["-f", "lavfi", "-i", "movie=/etc/passwd", "o.mp4"], "filter 'movie' is not allowed"),
    (["-f", "lavfi", "-i", "amovie=../globex/secret.mp3", "o.mp3"], "filter 'amovie' is not allowed"),
    (["-f", "lavfi", "-i", "sine,amovie=x.mp3", "o.mp3"], "filter 'amovie' is not allowed"),
    (["-i", "in.mp4", "-filter_complex", "movie=/etc/passwd[m];[0:v][m]overlay", "o.mp4"], "'movie'"),
    (["-i", "in.mp4", "-vf", "null,movie=secret.mp4[m];[in][m]overlay", "o.mp4"], "'movie'"),
    (["-i", "in.mp4", "-vf", "mov\\ie=/etc/passwd", "o.mp4"], "not a plain filter name"),
    (["-i", "in.mp4", "-vf", "'movie'=/etc/passwd", "o.mp4"], "not a plain filter name"),
    (["-i", "in.mp4", "-vf", "[in] movie = x [out]", "o.mp4"], "'movie'"),
    (["-i", "in.mp4", "-vf", "drawtext=textfile=/etc/passwd", "o.mp4"], "'drawtext'"),
    (["-i", "in.mp4", "-vf", "subtitles=/etc/passwd", "o.mp4"], "'subtitles'"),
    (["-i", "in.mp4", "-vf", "sendcmd=f=/etc/passwd,scale", "o.mp4"], "'sendcmd'"),
    (["-i", "in.mp4", "-af", "azmq", "o.mp4"], "'azmq'"),
    (["-i", "in.mp4", "-af", "ladspa=file=/tmp/evil.so", "o.mp4"], "'ladspa'"),
    (["-i", "in.mp4", "-vf", "frei0r=/tmp/evil.so", "o.mp4"], "'frei0r'"),
    (["-i", "in.mp4", "-vf", "metadata=mode=print:file=/tmp/leak", "o.mp4"], "'metadata'"),
    (["-i", "in.mp4", "-vf", "paletteuse=debug_kdtree=/tmp/x", "o.gif"], "'paletteuse' takes only"),
    (["-i", "in.mp4", "-vf", "paletteuse=bayer:2:0:0:128:0:/tmp/x", "o.gif"], "'paletteuse' takes only"),
    (["-i", "in.mp4", "-vf", "scale=w=2:/h=/etc/passwd", "o.mp4"], "option '/h'"),
    (["-i", "in.mp4", "-vf", "scale", "-vf", "scale,", "o.mp4"], "not a plain filter name"),
    (["-i", "in.mp4", "-vf", "scale[", "o.mp4"], "unmatched '['"),
    # options that read or write files of their own
    (["-i", "in.mp4", "-filter_complex_script", "graph.txt", "o.mp4"], "reads a filter graph from a file"),
    (["-i", "in.mp4", "-filter_script:v", "graph.txt", "o.mp4"], "reads a filter graph from a file"),
    (["-i", "in.mp4", "-/filter_complex", "graph.txt", "o.mp4"], "loads the option's value from a file"),
    (["-dump_attachment:t", "", "-i", "in.mkv", "o.mp4"], "writes attachments"),
    (["-i", "in.mp4", "-c:v", "libx264", "-pass", "1", "o.mp4"], "two-pass"),
    (["-i", "in.mp4", "-passlogfile", "/tmp/stats", "o.mp4"], "writes a file"),
    (["-report", "-i", "in.mp4", "o.mp4"], "writes a file"),
    (["-i", "in.mp4", "-vstats_file", "/tmp/v.log", "o.mp4"], "writes a file"),
    (["-progress", "http://evil/", "-i", "in.mp4", "o.mp4"], "writes progress"),
    (["-i", "in.mp4", "-x264-params", "stats=/tmp/x:dump-yuv=/tmp/y", "o.mp4"], "encoder options"),
    (["-protocol_whitelist", "file,http,tcp", "-i", "in.mp4", "o.mp4"], "ffworker sets it"),
    (["-loglevel", "debug", "-i", "in.mp4", "o.mp4"], "ffworker sets it"),
    (["-pattern_type", "glob", "-i", "*.png", "o.mp4"], "glob"),
    (["-hwaccel", "cuda", "-i", "in.mp4", "o.mp4"], "hardware"),
    (["-i", "in.mp4", "-some_future_option", "1", "o.mp4"], "only the ffmpeg options it knows"),
    (["-i", "in.mp4", "-bsf:v", "noise=amount=1", "o.mp4"], "bitstream filter"),
    # structure
    ([], "non-empty list"),
    (["-i", "in.mp4"], "no output file"),
    (["-i", "in.mp4", "o.mp4", "-c:v", "copy"], "apply to nothing"),
    (["-i", "in.mp4", "-c:v"], "needs a value"),
    (["-i", "in.mp4", "o.mp4", "o.mp4"], "named twice"),
    (["-i", "in.mp4", "in.mp4"], "one of the inputs"),
    (["-i", "in.mp4", "-shortest", "-ss", "1", "-i", "b.mp4", "o.mp4"], "not allowed before an input"),
    (["-re", "-i", "in.mp4", "-re", "o.mp4"], "not allowed before an output"),
    (["-i", "in.mp4", "-an:v", "o.mp4"], "takes no stream specifier"),
    (["-i", "in.mp4", "-metadata", "a\x00b", "o.mp4"], "NUL"),
]


@pytest.mark.parametrize("args, words", HOSTILE, ids=lambda v: repr(v)[:60] if isinstance(v, list) else "")
def test_hostile_argv_is_refused_with_a_reason(args, words):
    with pytest.raises(CommandRefused) as raised:
        parse(args)
    assert words in raised.value.message


def test_y_and_n_are_accepted_and_left_out():
    parsed = parse(["-y", "-n", "-hide_banner", "-i", "in.mp4", "o.mp4"])
    assert parsed.items == [("input", "in.mp4"), ("output", "o.mp4")]


# -- the filter graph tokenizer follows libavfilter -----------------------------------------


@pytest.mark.parametrize("text, terminators, token, rest", [
    ("abc,def", ",", "abc", ",def"),
    ("  a b  ,x", ",", "a b", ",x"),
    ("a\\,b,c", ",", "a,b", ",c"),
    ("'a,b',c", ",", "a,b", ",c"),
    ("a'b,c'd,e", ",", "ab,cd", ",e"),
    ("a\\ ,b", ",", "a ", ",b"),
    ("'a  '  ,b", ",", "a  ", ",b"),
    ("x\\", ",", "x\\", ""),
])
def test_get_token_matches_av_get_token(text, terminators, token, rest):
    value, index = get_token(text, 0, terminators)
    assert (value, text[index:]) == (token, rest)


def test_parse_filtergraph_names_every_filter():
    graph = ("sws_flags=bicubic;[0:v] split = 2 [a][b] ; [a]scale=w=iw/2:h=-2,format=yuv420p[c];"
             "[b][c]overlay=x='if(gte(t,1),10,0)':y=0 [out]")
    assert [name for name, _ in parse_filtergraph(graph)] == ["split", "scale", "format", "overlay"]
    assert dict(parse_filtergraph(graph))["overlay"] == "x=if(gte(t,1),10,0):y=0"


def test_quoted_separators_do_not_hide_a_filter():
    # ffmpeg reads a single filter "scale" whose argument contains ",movie"; nothing else.
    assert parse_filtergraph("scale='1,movie=x'") == [("scale", "1,movie=x")]
    # Escaping the quote ends the argument at the comma: movie is a filter of its own.
    with pytest.raises(CommandRefused, match="movie"):
        check_filtergraph("scale=\\'1,movie=x'")


def test_filter_options_split_like_av_opt_get_key_value():
    assert filter_options("320:-2:flags=lanczos") == [(None, "320"), (None, "-2"), ("flags", "lanczos")]
    assert filter_options("w=iw/2:h='a:b'") == [("w", "iw/2"), ("h", "a:b")]
    assert filter_options("x=1:\\/y=2") == [("x", "1"), (None, "/y=2")]


# -- submit-time paths ---------------------------------------------------------------------


@pytest.fixture
def media(tmp_path):
    root = tmp_path / "acme"
    root.mkdir()
    (root / "in.mp4").write_bytes(b"x")
    (root / "done.mp4").write_bytes(b"x")
    secret = tmp_path / "globex" / "secret.mp4"
    secret.parent.mkdir()
    secret.write_bytes(b"x")
    os.symlink(secret, root / "escape.mp4")
    os.symlink(tmp_path / "globex", root / "escape_dir")
    return root


@pytest.mark.parametrize("args, words", [
    (["-i", "escape.mp4", "o.mp4"], "outside the media directory"),
    (["-i", "missing.mp4", "o.mp4"], "does not exist"),
    (["-i", "in.mp4", "escape_dir/o.mp4"], "outside the media directory"),
    (["-i", "in.mp4", "done.mp4"], "already exists"),
    (["-i", "in.mp4", "-attach", "escape.mp4", "o.mkv"], "outside the media directory"),
    (["-i", "in.mp4", "./in.mp4"], "is also an input"),
])
def test_check_confines_every_path(media, args, words):
    errors = command.check(media, {"args": args, "overwrite": "done.mp4" not in args})
    assert any(words in message for message in errors["args"]), errors
    assert not any(str(media.parent) in message for message in errors["args"])


def test_check_accepts_confined_paths(media):
    assert command.check(media, {"args": ["-i", "in.mp4", "sub/o.mp4"]}) == {}
    assert command.check(media, {"args": ["-i", "in.mp4", "done.mp4"], "overwrite": True}) == {}


# -- the argv the worker runs ----------------------------------------------------------------


class FakeRun:
    def __init__(self, root: Path, args: list[str], allow: bool = True) -> None:
        self.root = root
        self.spec = {"args": args}
        self.settings = Settings(allow_raw_commands=allow)
        self.outputs: list[Output] = []

    def input(self, user_path):
        return paths.input_path(self.root, user_path)

    def output(self, user_path, suffixes=None):
        final = paths.output_path(self.root, user_path, overwrite=False, suffixes=suffixes)
        output = Output(user_path, final, paths.temp_path_for(final, "job", 1))
        self.outputs.append(output)
        return output


def test_plan_confines_inputs_whitelists_formats_and_writes_temp_outputs(media):
    run = FakeRun(media, ["-n", "-ss", "1", "-i", "in.mp4", "-f", "lavfi", "-i", "anullsrc", "-map", "0:v",
                          "-map", "1:a", "-shortest", "-c:v", "copy", "out/o.mp4"])
    plan = command.plan_job(run)
    temp = media / "out" / ".ffwtmp.job.1.o.mp4"
    assert plan.args == [
        "-y", "-ss", "1", "-format_whitelist", INPUT_FORMATS, "-i", str(media / "in.mp4"),
        "-f", "lavfi", "-format_whitelist", "lavfi", "-i", "anullsrc",
        "-map", "0:v", "-map", "1:a", "-shortest", "-c:v", "copy", str(temp),
    ]
    assert plan.duration_s is None
    assert [o.final for o in run.outputs] == [media / "out" / "o.mp4"]


def test_a_worker_without_the_setting_refuses_to_run_a_command(media):
    with pytest.raises(PlanError) as raised:
        command.plan_job(FakeRun(media, ["-i", "in.mp4", "o.mp4"], allow=False))
    assert raised.value.code == "command_disabled" and "FFWORKER_ALLOW_RAW_COMMANDS" in str(raised.value)


def test_a_worker_on_object_storage_refuses_to_run_a_command(media):
    run = FakeRun(media, ["-i", "in.mp4", "o.mp4"])
    run.settings = Settings(allow_raw_commands=True, storage_url="s3://media-bucket/ffworker")
    with pytest.raises(PlanError) as raised:
        command.plan_job(run)
    assert raised.value.code == "command_disabled" and "FFWORKER_STORAGE_URL" in str(raised.value)


def test_the_worker_parses_the_argv_again(media):
    with pytest.raises(PlanError) as raised:
        command.plan_job(FakeRun(media, ["-i", "in.mp4", "-vf", "movie=x", "o.mp4"]))
    assert raised.value.code == "invalid_request"
