"""fusedlm._io: atomic files and folders, the completion marker, and readers whose errors name the
file and what is wrong with it (DESIGN.md rules 2 and 8)."""
import json
import os
import struct

import pytest
import torch

from fusedlm import _io


def _tree(path) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(path):
        for n in names:
            p = os.path.join(folder, n)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


# ---- one file -----------------------------------------------------------------------------------
def test_atomic_file_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    _io.write_json(str(p), {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_file(str(p), "w") as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_file_permissions_follow_the_umask(tmp_path):
    p = tmp_path / "a.txt"
    _io.write_text(str(p), "x")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask


# ---- a folder -----------------------------------------------------------------------------------
def _write(folder, files: dict[str, str]):
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_folder_replaces_the_files_together_and_carries_the_others(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    d = tmp_path / "model"
    with _io.atomic_folder(str(d)) as tmp:
        _write(tmp, {"config.json": "1", "weights": "1"})
    _write(str(d), {"tokenizer.json": "mine", "sub/x": "mine too"})
    with _io.atomic_folder(str(d)) as tmp:
        assert not os.path.exists(os.path.join(tmp, "tokenizer.json"))
        _write(tmp, {"config.json": "2", "weights": "2"})
    assert _tree(d) == {"config.json": b"2", "weights": b"2", "tokenizer.json": b"mine", os.path.join("sub", "x"): b"mine too"}
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no partial or replaced folder left


def test_atomic_folder_without_carry_over_drops_the_old_files(tmp_path):
    d = tmp_path / "ckpt"
    with _io.atomic_folder(str(d), carry_over=False) as tmp:
        _write(tmp, {"a": "1", "dcp/shard": "1"})
    with _io.atomic_folder(str(d), carry_over=False) as tmp:
        _write(tmp, {"a": "2"})
    assert _tree(d) == {"a": b"2"}


def test_atomic_folder_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    d = tmp_path / "model"
    with _io.atomic_folder(str(d)) as tmp:
        _write(tmp, {"config.json": "1", "weights": "1"})
    with pytest.raises(RuntimeError):
        with _io.atomic_folder(str(d)) as tmp:
            _write(tmp, {"config.json": "2"})
            raise RuntimeError("crash before the weights")
    assert _tree(d) == {"config.json": b"1", "weights": b"1"}
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_crash_between_the_fallback_renames_is_undone_by_the_next_save(tmp_path):
    # the two-rename swap, killed after the first rename: the folder is missing and the old one is
    # beside it; loading says where it is, the next save puts it back first
    d = tmp_path / "model"
    with _io.atomic_folder(str(d), marker=True) as tmp:
        _write(tmp, {"w": "1"})
    os.rename(d, _io._replaced(str(d)))
    with pytest.raises(FileNotFoundError, match=r"interrupted while swapping.*\.model\.replaced"):
        _io.verify_folder(str(d))
    tmp = _io.begin_folder(str(d))
    assert _tree(d)["w"] == b"1"
    _io.commit_folder(tmp, str(d), marker=True)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_saving_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    # save_pretrained(model, "."): the swapped-out folder is deleted, the process stays in the new one
    d = tmp_path / "model"
    with _io.atomic_folder(str(d)) as tmp:
        _write(tmp, {"a": "1", "sub/b": "1"})
    monkeypatch.chdir(d / "sub")
    with _io.atomic_folder("..") as tmp:
        _write(tmp, {"a": "2", "sub/b": "2"})
    assert os.getcwd() == str(d / "sub") and open("b").read() == "2" and open("../a").read() == "2"


def test_a_stale_partial_folder_is_replaced(tmp_path):
    d = tmp_path / "model"
    os.makedirs(_io.partial_folder(str(d)))
    _write(_io.partial_folder(str(d)), {"junk": "x"})
    with _io.atomic_folder(str(d)) as tmp:
        _write(tmp, {"a": "1"})
    assert _tree(d) == {"a": b"1"}


def test_a_save_over_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        with _io.atomic_folder(str(tmp_path / "f")):
            pass


def test_a_symlinked_folder_is_replaced_behind_its_link(tmp_path):
    real = tmp_path / "real"
    with _io.atomic_folder(str(real)) as tmp:
        _write(tmp, {"a": "1"})
    os.symlink(real, tmp_path / "link")
    with _io.atomic_folder(str(tmp_path / "link")) as tmp:
        _write(tmp, {"a": "2"})
    assert os.path.islink(tmp_path / "link") and _tree(real) == {"a": b"2"}


# ---- the completion marker ----------------------------------------------------------------------
def _marked(tmp_path):
    d = tmp_path / "ckpt"
    with _io.atomic_folder(str(d), marker=True) as tmp:
        _write(tmp, {"model": "0123456789", "sub/rng": "abc"})
    return d


def test_marker_lists_every_file_and_verifies(tmp_path):
    d = _marked(tmp_path)
    files = _io.verify_folder(str(d))
    assert sorted(files) == ["model", os.path.join("sub", "rng")] and files["model"]["bytes"] == 10
    assert _io.is_complete(str(d))


@pytest.mark.parametrize("damage, match", [
    (lambda d: os.remove(d / _io.MARKER), "incomplete: it has no fusedlm_complete.json"),
    (lambda d: (d / _io.MARKER).write_text("{"), "completion marker .* is not valid JSON"),
    (lambda d: (d / _io.MARKER).write_text("[]"), "is not fusedlm's"),
    (lambda d: os.remove(d / "model"), r"model is missing \(the completion marker"),
    (lambda d: (d / "model").write_text("01234"), "model is truncated: 5 bytes, the save wrote 10"),
    (lambda d: (d / "model").write_text("0123456789ab"), "model is longer than it was written"),
    (lambda d: (d / "model").write_text("0123456780"), r"model is corrupted: .*SHA-256"),  # finite garbage, same size
], ids=["no-marker", "marker-not-json", "marker-not-ours", "file-missing", "truncated", "longer", "garbage"])
def test_verify_names_the_file_and_what_is_wrong(tmp_path, damage, match):
    d = _marked(tmp_path)
    damage(d)
    with pytest.raises(ValueError, match=match):
        _io.verify_folder(str(d))
    # the cheap check (what latest() uses) sees everything but same-size garbage, which verify catches
    assert _io.is_complete(str(d)) == ("SHA-256" in match)


def test_verify_of_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.verify_folder(str(tmp_path / "nope"))


# ---- readers ------------------------------------------------------------------------------------
def _safetensors(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(12.0).view(3, 4), "b": torch.ones(5)}, str(p))
    return p


def _header_len(p) -> int:
    return struct.unpack("<Q", p.read_bytes()[:8])[0]


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"abc"), "truncated: 3 bytes, shorter than the 8-byte header length"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated or not a safetensors file: its header length says"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4]), r"truncated: tensor 'b' ends at byte"),
    (lambda p: p.write_bytes(b"GARBAGE!" * 30), "truncated or not a safetensors file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope" + b"\0" * 8), "bad header"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "bad header"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + p.read_bytes()[8:].replace(b'"F32"', b'"F64"', 1)), "bad header: tensor"),
], ids=["empty", "tiny", "header-cut", "data-cut", "garbage", "not-json", "not-object", "wrong-size"])
def test_read_safetensors_names_the_file(tmp_path, damage, match):
    p = _safetensors(tmp_path)
    damage(p)
    with pytest.raises(ValueError, match=match) as e:
        _io.read_safetensors(str(p))
    assert str(p) in str(e.value)


def test_read_safetensors_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.read_safetensors(str(tmp_path / "none.safetensors"))


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be read .truncated, corrupted"),
    (lambda p: p.write_bytes(b"\x80\x02junk" * 10), "cannot be read"),
    (lambda p: p.write_text("hello"), "cannot be read"),
], ids=["empty", "half", "pickle-garbage", "text"])
def test_read_torch_names_the_file(tmp_path, damage, match):
    p = tmp_path / "s.pt"
    torch.save({"a": torch.ones(100)}, p)
    damage(p)
    with pytest.raises(ValueError, match=match) as e:
        _io.read_torch(str(p))
    assert str(p) in str(e.value)


@pytest.mark.parametrize("text, match", [("", "is empty"), ('{"a": 1', "not valid JSON .line 1"), (b"\xff\xfe", "not UTF-8")],
                         ids=["empty", "truncated", "binary"])
def test_read_json_names_the_file(tmp_path, text, match):
    p = tmp_path / "c.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match) as e:
        _io.read_json(str(p))
    assert str(p) in str(e.value)


def test_check_writable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _io.check_writable_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
        with pytest.raises(ValueError, match="exists and is not a folder"):
            _io.check_writable_folder(str(tmp_path / "file"))
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(ValueError, match="is not writable"):
                _io.check_writable_folder(str(ro))
            with pytest.raises(ValueError, match="cannot be created"):
                _io.check_writable_folder(str(ro / "sub"))
        with pytest.raises(ValueError, match="cannot be created"):
            _io.check_writable_folder(str(tmp_path / "file" / "sub"))
    finally:
        ro.chmod(0o700)


def test_a_folder_whose_parent_is_not_writable_is_replaced_file_by_file(tmp_path, monkeypatch):
    # no sibling folder can be made (a read-only parent): each file is still replaced atomically, with a warning
    d = tmp_path / "model"
    with _io.atomic_folder(str(d)) as tmp:
        _write(tmp, {"a": "1", "b": "1"})

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(_io, "begin_folder", refuse)
    with pytest.warns(UserWarning, match="replaced one by one, not together"):
        with _io.atomic_folder(str(d)) as tmp:
            _write(tmp, {"a": "2"})
    assert _tree(d) == {"a": b"2", "b": b"1"}
    with pytest.raises(RuntimeError):
        with pytest.warns(UserWarning):
            with _io.atomic_folder(str(d)) as tmp:
                _write(tmp, {"a": "3"})
                raise RuntimeError("crash")
    assert _tree(d) == {"a": b"2", "b": b"1"}
