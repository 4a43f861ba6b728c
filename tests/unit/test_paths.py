import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ffworker.paths import (
    TEMP_MARKER,
    UnsafePath,
    confine,
    input_path,
    object_name,
    output_dir_path,
    output_path,
    parse_temp_name,
    temp_path_for,
    tenant_root,
)

def short_id(path: str) -> str:
    shown = repr(path)
    return shown if len(shown) <= 40 else f"{shown[:30]}...({len(path)} chars)"


HOSTILE_PATHS = [
    "..",
    "../secret.mp4",
    "../../etc/passwd",
    "a/../../b.mp4",
    "a/b/../../../c.mp4",
    "videos/..",
    "./../x.mp4",
    "a/./../..",
    "/etc/passwd",
    "//etc/passwd",
    "/",
    "http://evil.example/a.mp4",
    "https://evil.example/a.mp4",
    "file:/etc/passwd",
    "file:clip.mp4",
    "concat:a.mp4|/etc/passwd",
    "pipe:1",
    "data:text/plain;base64,AAAA",
    "subfile:,start,0,end,10,:/etc/passwd",
    "tcp://127.0.0.1:22",
    "C:clip.mp4",
    "c:/windows/win.ini",
    "srt+udp://x",
    "clip.mp4\x00.txt",
    "clip\nname.mp4",
    "clip\rname.mp4",
    "tab\there.mp4",
    "esc\x1b[31m.mp4",
    "del\x7f.mp4",
    "-i.mp4",
    "-y",
    "dir/-filter_complex.mp4",
    "~/clip.mp4",
    "~root/clip.mp4",
    ".",
    "./",
    "./.",
    "a/..",
    f"{TEMP_MARKER}job1.0.out.mp4",
    f"dir/{TEMP_MARKER}x/clip.mp4",
    "a" * 1025,
    "d/" * 510 + "long.mp4",
    "x" * 256 + ".mp4",
    "lone\ud800surrogate.mp4",
    "",
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "tenant"
    media.mkdir()
    return media


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.mp4").write_bytes(b"secret")
    return elsewhere


def rejection(root: Path, call, *args, **kwargs) -> UnsafePath:
    with pytest.raises(UnsafePath) as caught:
        call(root, *args, **kwargs)
    message = caught.value.message
    assert message == str(caught.value)
    assert str(root.parent) not in message
    assert os.path.realpath(root.parent) not in message
    return caught.value


@pytest.mark.parametrize("hostile", HOSTILE_PATHS, ids=short_id)
def test_hostile_paths_are_rejected(root, hostile):
    rejection(root, confine, hostile)


@pytest.mark.parametrize("hostile", HOSTILE_PATHS, ids=short_id)
def test_hostile_paths_are_rejected_as_outputs(root, hostile):
    rejection(root, output_path, hostile, overwrite=True)


@pytest.mark.parametrize("hostile", HOSTILE_PATHS, ids=short_id)
def test_hostile_paths_are_rejected_as_object_names(root, hostile):
    with pytest.raises(UnsafePath):
        object_name(hostile)


def test_an_object_name_is_the_path_as_resolving_it_would_spell_it():
    assert object_name("in/clip.mp4") == "in/clip.mp4"
    assert object_name("./in//./clip.mp4") == "in/clip.mp4"
    assert object_name("out/ladder/") == "out/ladder"


@pytest.mark.parametrize("not_a_string", [None, 42, b"clip.mp4", Path("clip.mp4"), ["clip.mp4"]])
def test_non_strings_are_rejected(root, not_a_string):
    rejection(root, confine, not_a_string)


def test_messages_echo_only_the_relative_path(root):
    error = rejection(root, confine, "../../etc/passwd")

    assert "'../../etc/passwd'" in error.message


def test_messages_escape_control_characters(root):
    error = rejection(root, confine, "bad\nname.mp4")

    assert "\n" not in error.message
    assert "bad\\nname.mp4" in error.message


def test_messages_truncate_long_paths(root):
    error = rejection(root, confine, "a" * 5000)

    assert len(error.message) < 200


def test_symlinked_file_pointing_outside_is_rejected(root, outside):
    (root / "innocent.mp4").symlink_to(outside / "secret.mp4")

    rejection(root, confine, "innocent.mp4")
    rejection(root, input_path, "innocent.mp4")


def test_symlinked_directory_pointing_outside_is_rejected(root, outside):
    (root / "shared").symlink_to(outside, target_is_directory=True)

    rejection(root, confine, "shared/secret.mp4")
    rejection(root, output_path, "shared/new.mp4", overwrite=True)
    rejection(root, output_dir_path, "shared/hls", overwrite=True)


def test_symlink_chain_leading_outside_is_rejected(root, outside):
    (root / "hop3").symlink_to(outside / "secret.mp4")
    (root / "hop2").symlink_to("hop3")
    (root / "hop1.mp4").symlink_to(root / "hop2")

    rejection(root, input_path, "hop1.mp4")


def test_symlink_to_root_itself_is_rejected(root):
    (root / "self").symlink_to(root, target_is_directory=True)

    rejection(root, confine, "self")
    rejection(root, confine, "self/")


def test_dangling_symlink_pointing_outside_is_rejected(root, tmp_path):
    (root / "later.mp4").symlink_to(tmp_path / "not-yet-created.mp4")

    rejection(root, output_path, "later.mp4", overwrite=True)


def test_symlink_loop_is_rejected(root):
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")

    rejection(root, output_path, "loop_a", overwrite=True)
    rejection(root, output_path, "loop_a/clip.mp4", overwrite=True)


def test_symlink_to_reserved_temp_name_is_rejected(root):
    (root / f"{TEMP_MARKER}job.0.out.mp4").write_bytes(b"partial")
    (root / "peek.mp4").symlink_to(f"{TEMP_MARKER}job.0.out.mp4")

    rejection(root, input_path, "peek.mp4")


LEGIT_PATHS = [
    "clip.mp4",
    "a/b/c/deep.mkv",
    "my holiday video.mp4",
    "it's \"quoted\".mov",
    "clip%20name%d.mp4",
    "frames/img%03d.png",
    "vidéo/日本語/клип.webm",
    ".hidden.mp4",
    "./clip.mp4",
    "dir//double-slash.mp4",
    "dir/trailing-slash/",
    "name with trailing space .mp4",
    "semi;colon&amp.mp4",
    "2024-01-01 12:00:00.mp4",
    "tilde~middle.mp4",
    "dir/~tilde.mp4",
    "dir/not-leading-dash-.mp4",
    "x" * 255,
]


@pytest.mark.parametrize("legit", LEGIT_PATHS, ids=short_id)
def test_legit_paths_resolve_inside_root(root, legit):
    resolved = confine(root, legit)

    real_root = Path(os.path.realpath(root))
    assert resolved.is_absolute()
    assert resolved != real_root
    assert real_root in resolved.parents
    assert resolved == real_root / os.path.normpath(legit)


def test_root_is_resolved_through_symlinks(tmp_path, root):
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)

    assert confine(alias, "clip.mp4") == Path(os.path.realpath(root)) / "clip.mp4"


def test_symlink_that_stays_inside_is_followed(root):
    (root / "library").mkdir()
    (root / "library" / "master.mov").write_bytes(b"media")
    (root / "latest.mov").symlink_to("library/master.mov")
    (root / "shortcut").symlink_to(root / "library", target_is_directory=True)

    real_root = Path(os.path.realpath(root))
    assert input_path(root, "latest.mov") == real_root / "library" / "master.mov"
    assert input_path(root, "shortcut/master.mov") == real_root / "library" / "master.mov"


def test_input_must_exist(root):
    error = rejection(root, input_path, "missing/clip.mp4")

    assert error.message == "input 'missing/clip.mp4' does not exist"


def test_input_must_be_a_regular_file(root):
    (root / "folder").mkdir()

    error = rejection(root, input_path, "folder")

    assert "not a regular file" in error.message


def test_input_accepts_an_existing_file(root):
    (root / "in").mkdir()
    (root / "in" / "clip.mp4").write_bytes(b"media")

    assert input_path(root, "in/clip.mp4") == Path(os.path.realpath(root)) / "in" / "clip.mp4"


def test_output_to_a_new_file_is_accepted(root):
    assert output_path(root, "renders/new.mp4", overwrite=False).name == "new.mp4"


def test_existing_output_needs_overwrite(root):
    (root / "out.mp4").write_bytes(b"old")

    error = rejection(root, output_path, "out.mp4", overwrite=False)

    assert error.message == "output 'out.mp4' already exists; set overwrite to replace it"
    assert output_path(root, "out.mp4", overwrite=True).name == "out.mp4"


def test_existing_directory_is_never_an_output_file(root):
    (root / "out.mp4").mkdir()

    rejection(root, output_path, "out.mp4", overwrite=False)
    rejection(root, output_path, "out.mp4", overwrite=True)


def test_fifo_is_never_an_output_file(root):
    os.mkfifo(root / "pipe.mp4")

    rejection(root, output_path, "pipe.mp4", overwrite=True)


SUFFIXES = frozenset({".mp4", ".mkv"})


@pytest.mark.parametrize("name", ["out.mp4", "OUT.MP4", "dir/out.Mkv", "a.b.c.mp4"])
def test_allowed_suffixes_are_accepted(root, name):
    assert output_path(root, name, overwrite=False, suffixes=SUFFIXES)


@pytest.mark.parametrize("name", ["out.mp3", "out", "out.mp4.sh", "out.", "mp4"])
def test_other_suffixes_are_rejected_with_the_allowed_list(root, name):
    error = rejection(root, output_path, name, overwrite=True, suffixes=SUFFIXES)

    assert ".mkv, .mp4" in error.message


def test_output_dir_may_be_new(root):
    assert output_dir_path(root, "hls/stream1", overwrite=False).name == "stream1"


def test_existing_output_dir_needs_overwrite(root):
    (root / "hls").mkdir()

    error = rejection(root, output_dir_path, "hls", overwrite=False)

    assert "set overwrite" in error.message
    assert output_dir_path(root, "hls", overwrite=True).name == "hls"


def test_output_dir_over_an_existing_file_is_rejected(root):
    (root / "hls").write_bytes(b"not a dir")

    rejection(root, output_dir_path, "hls", overwrite=True)


@pytest.mark.parametrize(
    ("name", "job_id", "attempt"),
    [
        ("out.mp4", "42", 0),
        ("out.tar.gz", "0b3c9e1e-7d2a-4c55-9d6f-0e1f2a3b4c5d", 3),
        (".hidden.mkv", "job_7", 12),
        ("name.with.dots.webm", "a", 1),
    ],
)
def test_temp_name_round_trip(tmp_path, name, job_id, attempt):
    final = tmp_path / "renders" / name

    temp = temp_path_for(final, job_id, attempt)

    assert temp.parent == final.parent
    assert temp.name == f"{TEMP_MARKER}{job_id}.{attempt}.{name}"
    assert temp.suffix == final.suffix
    assert parse_temp_name(temp.name) == (job_id, attempt)


def test_temp_names_are_refused_as_user_paths(root):
    temp = temp_path_for(root / "out.mp4", "42", 1)

    rejection(root, confine, temp.name)


@pytest.mark.parametrize(
    "name",
    ["out.mp4", ".ffwtmp.", ".ffwtmp.42.out.mp4", ".ffwtmp.42.x.out.mp4", ".ffwtmp..1.out.mp4",
     "x.ffwtmp.42.1.out.mp4", ".ffwtmp.42.1."],
)
def test_non_temp_names_do_not_parse(name):
    assert parse_temp_name(name) is None


@pytest.mark.parametrize(("job_id", "attempt"), [("a/b", 0), ("a.b", 0), ("", 0), ("ok", -1), ("ok", True)])
def test_temp_path_rejects_ids_that_would_not_round_trip(tmp_path, job_id, attempt):
    with pytest.raises(ValueError):
        temp_path_for(tmp_path / "out.mp4", job_id, attempt)


def test_tenant_root_is_the_resolved_media_root_joined_with_the_tenant(tmp_path):
    (tmp_path / "media").mkdir()
    os.symlink(tmp_path / "media", tmp_path / "link")
    settings = SimpleNamespace(media_root=str(tmp_path / "link"))
    assert tenant_root(settings, "acme") == Path(os.path.realpath(tmp_path / "media")) / "acme"


# -- names that leave room for the in-flight and scratch names --------------------------


def test_the_longest_output_name_leaves_room_for_every_in_flight_name(tmp_path):
    from ffworker import paths

    job_id = "0b7e9c1e-5b1f-4f53-8a9e-2f1d1c1b1a19"
    longest = "a" * (paths.MAX_OUTPUT_NAME_BYTES - 4) + ".mp4"
    final = tmp_path / longest
    paths.check_output_name(final, longest)  # allowed
    attempt = 10 ** paths.MAX_ATTEMPT_DIGITS - 1
    temp = paths.temp_path_for(final, job_id, attempt)
    for suffix in (".ffconcat", ".previous"):  # concat's list, the directory swap's aside name
        name = temp.name + suffix
        assert len(name.encode()) <= paths.MAX_COMPONENT_BYTES
        (tmp_path / name).write_bytes(b"")  # the filesystem takes it


@pytest.mark.parametrize("name", ["a" * 200 + ".mp4", "é" * 100 + ".mp4", "b" * 240])
def test_an_output_name_without_room_for_its_in_flight_name_is_refused(tmp_path, name):
    from ffworker import paths

    with pytest.raises(UnsafePath, match="longer than"):
        paths.check_output_name(tmp_path / name, f"out/{name}")


def test_an_output_below_an_existing_file_is_refused(tmp_path):
    root = tmp_path / "acme"
    (root / "in.mp4").parent.mkdir(parents=True)
    (root / "in.mp4").write_bytes(b"media")
    with pytest.raises(UnsafePath, match="'in.mp4' is a file, not a directory"):
        output_path(root, "in.mp4/out.mp4", overwrite=False)
    with pytest.raises(UnsafePath, match="'in.mp4' is a file"):
        output_path(root, "in.mp4/deeper/out.mp4", overwrite=True)
    with pytest.raises(UnsafePath, match="'in.mp4' is a file"):
        output_dir_path(root, "in.mp4/ladder", overwrite=False)
