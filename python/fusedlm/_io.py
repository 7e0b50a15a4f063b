"""Files in and out, so that nothing is lost (DESIGN.md rule 8) and a broken file is reported with
its path (rule 2). Every writer of fusedlm goes through here.

    with atomic_file("out/results.json", "w") as f:      # one file
        json.dump(rows, f)
    with atomic_folder("out/model") as tmp:              # a folder's files, replaced together
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        write_json(os.path.join(tmp, "config.json"), config)
    with atomic_folder("run/checkpoint-10", marker=True) as tmp: ...   # + a completion marker
    verify_folder("run/checkpoint-10")                   # the marker: every file whole and unchanged
    read_json(p); read_safetensors(p); read_torch(p)     # ValueError naming p and what is wrong

One file: written under a temporary name in its own folder, flushed and fsynced, then renamed
over the old one (``os.replace`` is atomic), and the folder fsynced: a crash at any moment
leaves the old file or the new one, never a mix.

A folder: its files are written into a sibling folder ``.<name>.partial``; on success every file
is fsynced and the new folder takes the old one's place in one step (Linux: ``renameat2`` with
``RENAME_EXCHANGE``; elsewhere two renames, the old folder kept as ``.<name>.replaced`` in
between and restored by the next save if a crash falls there). Files of the old folder that the
save does not write (a tokenizer next to a model) are carried over as hard links unless
``carry_over=False``. With ``marker=True`` the folder also gets :data:`MARKER`, written last
into the partial folder: each file's size and SHA-256, so a reader can tell a complete, intact
folder (:func:`verify_folder`) from a partial, truncated or corrupted one.

Imports nothing of fusedlm.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import secrets
import shutil
import struct
import warnings

MARKER = "fusedlm_complete.json"  # the completion marker of a folder written with marker=True
_FORMAT = "fusedlm-folder"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    """Makes the names in folder `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Yields a file object writing a temporary file beside `path`; on leaving the block without an
    exception it is fsynced and renamed to `path` (the old file, if any, stays whole until then);
    on an exception it is deleted and `path` is untouched."""
    path = os.fspath(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions from the umask, as open() gives
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes(path: str, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str, obj, **dump_kwargs) -> None:
    """`obj` as JSON at `path`, atomically (indent=2 unless given)."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}) + "\n")


def save_torch(obj, path: str) -> None:
    """torch.save(obj) to `path`, atomically."""
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def check_writable_folder(path: str, what: str = "output folder") -> str:
    """Raises ValueError naming `path` when it cannot become a writable folder (an existing file, an
    unwritable folder or parent); returns its absolute path. Creates nothing."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{what} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path} is not writable")
        return path
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be created: {parent} is not a writable folder")
    return path


def partial_folder(path: str) -> str:
    """The partial folder a save to folder `path` writes into (``.<name>.partial`` beside it)."""
    final = os.path.realpath(os.fspath(path))
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial")


def _replaced(final: str) -> str:
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.replaced")


def _target(path: str) -> str:
    """The folder a save to `path` replaces (a symlink's target), absolute."""
    final = os.path.realpath(os.fspath(path))
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"{path} exists and is not a folder")
    return final


def begin_folder(path: str) -> str:
    """Starts replacing folder `path`: an empty partial folder beside it (a stale one removed; an old
    folder a crashed swap left as ``.<name>.replaced`` put back first); returns the partial folder."""
    final = _target(path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    replaced = _replaced(final)
    if not os.path.exists(final) and os.path.isdir(replaced):
        os.rename(replaced, final)  # a crash between the two renames of the fallback swap
    tmp = partial_folder(final)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.unlink(tmp)
    os.mkdir(tmp)
    return tmp


def _files(root: str) -> list[str]:
    """Paths of the regular files under `root`, relative to it, sorted."""
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(out)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(final: str, tmp: str) -> None:
    """Links the entries of the old folder that the new one does not have into it."""
    ours = set(os.listdir(tmp))
    for name in os.listdir(final):
        if name in ours or name == MARKER:
            continue
        src, dst = os.path.join(final, name), os.path.join(tmp, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swaps the names a and b in one step (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # ENOSYS, EINVAL (a file system without the flag): the two-rename fallback


def commit_folder(tmp: str, path: str, *, marker: bool = False, carry_over: bool = True) -> None:
    """Completes a save begun with :func:`begin_folder`: fsyncs every file of the partial folder
    `tmp`, writes the completion marker (``marker=True``), carries over the old folder's other
    entries (``carry_over``), and puts the partial folder in the place of `path`."""
    final = _target(path)
    written = _files(tmp)
    for rel in written:
        _fsync_file(os.path.join(tmp, rel))
    if marker:
        files = {rel: {"bytes": os.path.getsize(os.path.join(tmp, rel)), "sha256": sha256_file(os.path.join(tmp, rel))}
                 for rel in written}
        write_json(os.path.join(tmp, MARKER), {"format": _FORMAT, "version": 1, "files": files})
    if carry_over and os.path.isdir(final):
        _carry_over(final, tmp)
    for folder, _, _ in os.walk(tmp):
        fsync_dir(folder)
    parent = os.path.dirname(final)
    try:  # a process working inside the folder keeps its working directory's path, in the new folder
        cwd = os.path.relpath(os.getcwd(), final)
    except (OSError, ValueError):
        cwd = os.pardir
    if not os.path.exists(final):
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # the old folder, now under the partial name
    else:
        replaced = _replaced(final)
        if os.path.lexists(replaced):
            shutil.rmtree(replaced)
        os.rename(final, replaced)
        os.rename(tmp, final)
        shutil.rmtree(replaced)
    fsync_dir(parent)
    if cwd != os.pardir and not cwd.startswith(os.pardir + os.sep):
        os.chdir(os.path.join(final, cwd) if os.path.isdir(os.path.join(final, cwd)) else final)


@contextlib.contextmanager
def atomic_folder(path: str, *, marker: bool = False, carry_over: bool = True):
    """Yields a partial folder to write `path`'s files into; on leaving the block they replace the
    folder `path` together (see the module docstring). On an exception the partial folder is deleted
    and `path` is untouched. Where the folder beside `path` cannot be created (an unwritable parent),
    each file is replaced on its own instead, with a warning."""
    try:
        tmp = begin_folder(path)
    except PermissionError as e:
        if not os.path.isdir(path) or marker:
            raise
        warnings.warn(f"cannot write beside {path} ({e}): its files are replaced one by one, not together", stacklevel=3)
        yield from _file_by_file(path)
        return
    try:
        yield tmp
        commit_folder(tmp, path, marker=marker, carry_over=carry_over)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_by_file(path: str):
    """The fallback of atomic_folder: a partial folder inside `path`, each file renamed out of it."""
    tmp = os.path.join(path, f".fusedlm.{secrets.token_hex(4)}.partial")
    os.mkdir(tmp)
    try:
        yield tmp
        for rel in _files(tmp):
            _fsync_file(os.path.join(tmp, rel))
            os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
            os.replace(os.path.join(tmp, rel), os.path.join(path, rel))
        fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def resolve(path: str) -> str:
    """`path`, or, when a save was killed between the two renames of the fallback swap (`path`
    missing, the old folder beside it as ``.<name>.replaced``), that old folder, with a warning:
    the previous version stays loadable (the next save puts it back in place)."""
    if os.path.exists(path):
        return path
    replaced = _replaced(os.path.realpath(path))
    if os.path.isdir(replaced):
        warnings.warn(f"{path} is missing: a save was interrupted while swapping folders; reading the previous version, "
                      f"{replaced} (the next save puts it back)", stacklevel=3)
        return replaced
    return path


def marker_files(path: str) -> dict | None:
    """The files the completion marker of folder `path` lists ({relative path: {"bytes", "sha256"}}),
    None when it has no marker. ValueError naming the marker when it is unreadable."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return None
    info = read_json(marker, "completion marker")
    if not isinstance(info, dict) or info.get("format") != _FORMAT or not isinstance(info.get("files"), dict):
        raise ValueError(f"completion marker {marker} is not fusedlm's (format {_FORMAT!r} with a 'files' table)")
    return info["files"]


def is_complete(path: str) -> bool:
    """True when folder `path` has a completion marker and every file it lists has the listed size
    (cheap: no checksums; :func:`verify_folder` reads the files)."""
    try:
        files = marker_files(path)
    except ValueError:
        return False
    if files is None:
        return False
    return all(os.path.isfile(os.path.join(path, rel)) and os.path.getsize(os.path.join(path, rel)) == meta.get("bytes")
               for rel, meta in files.items())


def verify_folder(path: str, what: str = "folder") -> dict:
    """Checks folder `path` against its completion marker: the marker is there, and every file it
    lists is there with its size and SHA-256. Returns the marker's file table; raises ValueError
    naming the file and what is wrong (FileNotFoundError when `path` is missing)."""
    if not os.path.isdir(path):
        replaced = _replaced(os.path.realpath(path))
        hint = f" (a save was interrupted while swapping folders: the previous {what} is {replaced})" if os.path.isdir(replaced) else ""
        raise FileNotFoundError(f"{what} {path} does not exist{hint}")
    files = marker_files(path)
    if files is None:
        raise ValueError(f"{what} {path} is incomplete: it has no {MARKER} (the save that wrote it did not finish, "
                         "or fusedlm did not write it)")
    for rel, meta in files.items():
        f = os.path.join(path, rel)
        if not os.path.isfile(f):
            raise ValueError(f"{f} is missing (the completion marker {os.path.join(path, MARKER)} lists it)")
        size = os.path.getsize(f)
        if size != meta.get("bytes"):
            state = "truncated" if size < meta.get("bytes", 0) else "longer than it was written"
            raise ValueError(f"{f} is {state}: {size} bytes, the save wrote {meta.get('bytes')}")
        if sha256_file(f) != meta.get("sha256"):
            raise ValueError(f"{f} is corrupted: its content differs from what the save wrote (SHA-256 mismatch)")
    return files


def _nonempty(path: str, what: str) -> int:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder, not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes)")
    return size


def read_json(path: str, what: str = "JSON file"):
    """The JSON document at `path`; FileNotFoundError / ValueError naming the path and what is wrong."""
    _nonempty(path, what)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}; "
                         "truncated or corrupted?)") from None


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(path: str, what: str = "safetensors file") -> dict:
    """Checks the framing of a safetensors file without reading its tensors: the 8-byte header
    length, the JSON header, each tensor's bytes inside the file. Returns the header; ValueError
    naming the path and what is wrong (empty, truncated, bad header, a tensor past the end)."""
    size = _nonempty(path, what)
    if size < 8:
        raise ValueError(f"{what} {path} is truncated: {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"{what} {path} is truncated or not a safetensors file: its header length says {n} bytes, "
                             f"the file has {size - 8} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{what} {path} has a bad header (not a JSON object: {e}); not a safetensors file, or corrupted") from None
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = _ST_DTYPES[info["dtype"]]
            for d in info["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{what} {path} has a bad header entry for tensor {name!r}: {info!r}") from None
        if end > data:
            raise ValueError(f"{what} {path} is truncated: tensor {name!r} ends at byte {end} of the data, which has {data}")
        if end - begin != count:
            raise ValueError(f"{what} {path} has a bad header: tensor {name!r} spans {end - begin} bytes, its dtype and "
                             f"shape need {count}")
    return header


def read_safetensors(path: str, what: str = "safetensors file", device: str = "cpu") -> dict:
    """The tensors of a safetensors file, framing checked first (:func:`check_safetensors`); every
    error names the path."""
    check_safetensors(path, what)
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except Exception as e:  # safetensors' own errors name no file
        raise ValueError(f"{what} {path} cannot be read: {type(e).__name__}: {e}") from None


def read_torch(path: str, what: str = "torch.save file", *, weights_only: bool = True):
    """torch.load of `path` on the CPU; ValueError naming the path when it is empty, truncated or not
    a torch.save file."""
    import torch

    _nonempty(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # zip, pickle and unpickler errors of every kind: none of them names the file
        if not isinstance(e, (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                              ImportError, UnicodeDecodeError)) and type(e).__module__ not in ("pickle", "_pickle"):
            raise
        text = str(e).split("WeightsUnpickler error:")[-1].strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise ValueError(f"{what} {path} cannot be read (truncated, corrupted or not a torch.save file): {first}") from None
