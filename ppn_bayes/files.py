"""Small file utilities every step shares: atomic writes, content hashes, and the rules for outputs.

A crash, a kill -9 or a full disk must never leave a half-written file where a complete one is
expected, so every file ppn-bayes writes goes through a temporary name in the same directory and an
atomic rename (:func:`os.replace`).

Every command with an output (``fit``, ``resize``, ``report``, ``compare``, ``demo``, ``bench --plot``)
checks it with the functions below *before* the expensive work, so a wrong path costs a second, not
a training run:

* :func:`check_no_overlap`: the output is not one of the command's inputs, does not contain one, and
  does not replace anything inside one. Paths are compared after resolving symlinks
  (:func:`os.path.realpath`), so a link to the run directory is the run directory. ``--force`` never
  lifts this: it allows replacing an earlier *output*, never an input.
* :func:`check_owned`: an existing output directory holds only what this command writes (its own
  earlier output); a directory with anything else in it is the user's, and is never written into.
* :func:`check_writable`: the output can be created where it is asked for (no component of the path
  is a file, no symlink loop, names not too long, the nearest existing directory writable, the file
  system not read-only or full), so an operating-system error that can be foreseen is a one-line
  error up front rather than a traceback after hours of work.
* :func:`writer_lock`: one writer per output. An advisory ``fcntl.flock`` on a lock file *next to*
  the output (``.<name>.ppn-lock`` in its parent), holding the PID and the command. Next to it, not
  inside: the lock is taken before the output exists (``ppn fit`` creates the run directory only once
  the model and data have loaded) and an export replaced whole by a rename (``ppn resize``) would
  carry a lock inside it away. The kernel releases the lock when its process exits, however it
  exits, so a lock file left by a killed process never blocks; the file is removed on release.

:func:`os_error_message` turns an :class:`OSError` into the one line the CLI prints
(``<what> <path>: <strerror>; <fix>``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ppn_bayes.errors import OutputError


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (``mkstemp`` makes 0600; outputs are meant to be shared)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_temp(path: Path, data: bytes) -> str:
    """``data`` in a fsynced temporary file next to ``path``; returns its name (removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    atomic_write_many({Path(path): data})


def atomic_write_many(files: dict[Path, bytes]) -> None:
    """Write several files that belong together: every one to a temporary name first, and only when
    all are written (a full disk fails here, with nothing replaced) renamed into place."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """A file that a library writes by name (safetensors, NetCDF): ``write(tmp)`` fills a temporary file
    next to ``path``, which is then fsynced, given the mode ``open()`` would give a new file
    (``mkstemp`` makes 0600; outputs and caches are meant to be shared) and renamed into place. On any
    failure the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), _file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_write_with`."""
    host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_with(path, lambda tmp: save_file(host, tmp, metadata=metadata))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (files may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ outputs

#: What to do about an operating-system error, by errno (the ``<fix>`` of the one-line message).
_FIXES = {
    errno.EACCES: "check its permissions, or choose another location",
    errno.EPERM: "check its permissions, or choose another location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.ENOSPC: "free some disk space or choose another location, then rerun",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another location, then rerun",
    errno.ENOTDIR: "a component of the path is a file, not a directory; fix the path",
    errno.ENOENT: "a directory on the path does not exist; create it or fix the path",
    errno.ELOOP: "the path is a loop of symbolic links; fix or remove the link",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system; use a shorter one",
    errno.EISDIR: "it is a directory; pass a file name",
    errno.EEXIST: "it already exists; choose another path",
    errno.ENOTEMPTY: "it already exists and is not empty; choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and rerun",
    errno.ENFILE: "too many open files on the system; close some programs and rerun",
    errno.EIO: "the device reported an input/output error; check the disk",
}


def os_error_message(err: OSError, what: str = "cannot use") -> str:
    """``<what> <path>: <strerror>; <fix>``: an :class:`OSError` as one line for the user."""
    path = err.filename if err.filename is not None else err.filename2
    reason = err.strerror or str(err) or type(err).__name__
    fix = _FIXES.get(err.errno, "check the path and the file system, then rerun")
    where = f" {os.fsdecode(path)}" if path is not None else ""
    return " ".join(f"{what}{where}: {reason}; {fix}".split())


def real(path: str | os.PathLike[str]) -> Path:
    """The absolute path with every symlink resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _fail(code: int, path: Path, flag: str) -> OutputError:
    return OutputError(os_error_message(OSError(code, os.strerror(code), str(path)), f"cannot write {flag}"))


def check_no_overlap(out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
                     *, flag: str = "--out", writes: Collection[str] | None = None) -> None:
    """Refuse an output that would replace one of the command's inputs (``--force`` or not).

    ``inputs``: ``(what, path)`` pairs (``None`` paths are skipped), e.g. ``("run directory", RUN)``.
    ``writes``: the names (glob patterns) the command writes *into* the directory ``out``; ``None``
    means ``out`` is replaced as a whole (a file, or a directory renamed into place). The output
    overlaps an input when it is the input, when the input lies inside what is replaced (the whole of
    ``out``, or one of ``writes`` inside it), or when it lies inside the input and already exists.
    """
    o = real(out)
    for what, path in inputs:
        if path is None:
            continue
        i = real(path)
        if o == i:
            raise OutputError(f"{flag} {out} is the {what} itself; writing it would destroy the input; "
                              f"choose another {flag}")
        if i.is_relative_to(o):
            rel = i.relative_to(o).parts
            if writes is None or any(fnmatch.fnmatchcase(rel[0], pat) for pat in writes):
                raise OutputError(f"{flag} {out} contains the {what} {path}; writing it would destroy the input; "
                                  f"choose another {flag}")
        if o.is_relative_to(i) and os.path.lexists(o):
            raise OutputError(f"{flag} {out} lies inside the {what} {path} and exists; writing it would change "
                              f"the input; choose a {flag} outside {path}")


def _temp_of(name: str, owned: Collection[str]) -> bool:
    """Whether ``name`` is the temporary or lock name of an owned entry (``.<name>.<random>``...)."""
    return name.startswith(".") and any(fnmatch.fnmatchcase(name, f".{pat}[.-]*") for pat in owned)


def foreign_entries(directory: str | os.PathLike[str], owned: Collection[str]) -> list[str]:
    """The entries of ``directory`` that are neither an ``owned`` name (glob patterns) nor its temporary name."""
    return sorted(n for n in os.listdir(directory)
                  if not any(fnmatch.fnmatchcase(n, pat) for pat in owned) and not _temp_of(n, owned))


def check_owned(out: str | os.PathLike[str], owned: Collection[str], command: str, *, flag: str = "--out") -> bool:
    """Refuse an existing output directory that holds anything the command does not write itself.

    Returns whether ``out`` exists (and holds only ``owned`` entries: an earlier output of the command).
    """
    path = Path(out)
    if not os.path.lexists(path):
        return False
    if not path.is_dir():
        raise OutputError(f"{flag} {out} is a file; {command} writes a directory there; choose another {flag}")
    foreign = foreign_entries(path, owned)
    if foreign:
        raise OutputError(f"{flag} {out} holds files {command} did not write (e.g. {foreign[0]}); it is never "
                          f"written into; choose an empty or new {flag}")
    return True


def check_writable(out: str | os.PathLike[str], flag: str = "--out") -> None:
    """Raise a one-line :class:`OutputError` now for an output the file system would refuse later.

    Foreseeable: a component of the path that is a file (ENOTDIR), a symlink loop (ELOOP), a name
    too long (ENAMETOOLONG), a nearest existing directory that is not writable (EACCES), a read-only
    (EROFS) or full (ENOSPC) file system. Nothing is created.
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    missing: list[str] = []
    probe = path
    while True:
        try:
            os.stat(probe)
            break
        except FileNotFoundError:
            if os.path.islink(probe):  # a dangling link: following it would create its target elsewhere
                break
            missing.append(probe.name)
            probe = probe.parent
        except OSError as err:  # ELOOP, ENOTDIR, ENAMETOOLONG, EACCES on the way
            if err.errno == errno.ENAMETOOLONG:
                raise _fail(errno.ENAMETOOLONG, path, flag) from None
            raise OutputError(os_error_message(err, f"cannot write {flag}")) from None
    if probe == path and path.is_dir():
        existing = path
    elif probe == path:
        existing = path.parent  # an existing file output is replaced by a rename in its directory
    else:
        existing = probe
        if not probe.is_dir():
            raise _fail(errno.ENOTDIR, probe, flag)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if any(len(os.fsencode(n)) > name_max for n in missing):
        raise _fail(errno.ENAMETOOLONG, path, flag)
    try:
        vfs = os.statvfs(existing)
    except OSError as err:
        raise OutputError(os_error_message(err, f"cannot write {flag}")) from None
    if vfs.f_flag & os.ST_RDONLY:
        raise _fail(errno.EROFS, existing, flag)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(errno.EACCES, existing, flag)
    if vfs.f_bavail == 0 and vfs.f_blocks > 0:
        raise _fail(errno.ENOSPC, existing, flag)


# ------------------------------------------------------------------------------------ one writer

LOCK_SUFFIX = ".ppn-lock"
_held: dict[Path, int] = {}  # lock file -> nesting depth, for this process (a command inside a command)


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``.<name>.ppn-lock`` next to it (symlinks resolved)."""
    t = real(target)
    return t.parent / f".{t.name}{LOCK_SUFFIX}"


def lock_holder(target: str | os.PathLike[str]) -> str | None:
    """``"pid N: COMMAND"`` of the process writing ``target`` now, or None when nobody holds its lock."""
    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 4096).decode("utf-8", "replace").strip() or "another ppn process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _command(label: str | None) -> str:
    """The holder's command line as the user typed it (``ppn fit recipe.yaml --out runs/x``); from
    another program, ``label`` and that program's command line."""
    import shlex
    import sys

    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] == "__main__.py" and "ppn_bayes" in sys.argv[0]:  # python -m ppn_bayes.cli / torchrun -m
        argv[0] = "ppn"
    line = " ".join(shlex.quote(a) for a in argv)
    if argv[0] != "ppn" and label:
        line = f"{label}, from {line}"
    return line[:300]


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike[str], command: str | None = None) -> Iterator[Path]:
    """Hold the one-writer lock of ``target`` (a run directory, an export, a report directory).

    A second process asking for the same lock gets an :class:`OutputError` naming the holder (PID and
    command) at once; it never waits. Missing parent directories are created for the lock file and
    removed again on release when still empty, so a command that fails leaves nothing behind.
    """
    path = lock_path(target)
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    made: list[Path] = []
    parent = path.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    if made:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(os_error_message(err, "cannot write")) from None
    try:
        fd = _acquire(path, Path(target), command)
    except BaseException:
        _remove_empty(made)
        raise
    _held[path] = 1
    try:
        yield path
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: a waiter that opened the old file sees it is gone
        os.close(fd)
        _remove_empty(made)


def _acquire(path: Path, target: Path, command: str | None) -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(os_error_message(err, "cannot write the lock file")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another ppn process"
            os.close(fd)
            raise OutputError(f"{target} is being written by {holder}; wait for it to finish, or stop that "
                              f"process, then rerun") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder unlinked between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} ({_command(command)})\n".encode())
            return fd
        os.close(fd)
    raise OutputError(f"cannot take the lock {path}; remove it if no ppn process is running, then rerun")


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            return
