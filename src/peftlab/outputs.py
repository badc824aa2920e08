"""One policy for everything a command writes, checked before any model loads.

    with outputs.claim(out, inputs=[model, adapter], overwrite=False, kind="folder") as dest:
        ...  # load, compute; write through files.atomic_dir / write_text (temp name, then rename)

What `claim` guarantees:
- the destination is not, does not hold, and is not inside any input of the command (model
  folder or file, adapter, data, run folders a report reads) — refused even with --overwrite;
- it is not the current folder or one that holds it (a folder cannot be renamed over itself);
- an existing non-empty destination is refused unless the user said --overwrite, or the
  command continues its own job there (`train --resume`, `compare` reusing its strategies);
- the place can be written (the nearest existing folder is a folder, writable);
- one process at a time: an advisory lock per destination (fcntl), whose holder's pid the
  refusal names. Lock files live in the temp folder, keyed by the destination's real path, so
  they never litter the user's folders and work before the destination exists.
"""

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def real(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def local_inputs(*names) -> list[Path]:
    """The inputs among `names` that are paths on this machine (aliases and hub ids are not)."""
    out = []
    for n in names:
        if n is None:
            continue
        p = Path(str(n)).expanduser()
        if p.exists():
            out.append(real(p))
    return out


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "holds"
    return None


def check(path, *, inputs=(), overwrite: bool = False, continuing: bool = False, kind: str = "folder",
          flag: str = "--out", what_exists: str = "") -> Path:
    """Refuse a destination that breaks the policy (see the module docstring); return its real path."""
    dest = real(path)
    cwd = real(".")
    if dest == cwd or dest in cwd.parents:
        raise UserError(f"{flag} {path} is the current folder or holds it; name a new folder, e.g. {flag} runs/new")
    for inp in local_inputs(*inputs):
        rel = _relation(dest, inp)
        if rel:
            raise UserError(f"{flag} {path} {rel} {'the input' if rel != 'holds' else 'an input of this command:'} {inp}; "
                            f"peftlab never writes into or over its inputs: choose another {flag}")
    probe = dest
    while not probe.exists():
        probe = probe.parent
    if probe != dest and not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder")
    if dest.exists():
        if kind == "folder" and not dest.is_dir():
            raise UserError(f"{flag} {path} is a file; give a folder (it is created if missing)")
        if kind == "file" and dest.is_dir():
            raise UserError(f"{flag} {path} is a folder; give the file to write, e.g. {flag} {Path(path) / 'out'}")
        full = dest.is_file() or any(dest.iterdir())
        if full and not (overwrite or continuing):
            held = f" ({what_exists})" if what_exists else ""
            raise UserError(f"{flag} {path} already exists{held}; add --overwrite to replace it, or choose another {flag}")
    _writable(probe if probe != dest else (dest if dest.is_dir() else dest.parent), flag, path)
    return dest


def _writable(folder: Path, flag: str, given) -> None:
    """Try to make (and remove) a temporary entry where the output will go: os.access says
    yes for root on a read-only mount and under /proc."""
    try:
        tmp = tempfile.mkdtemp(dir=folder, prefix=".peftlab-probe-")
        os.rmdir(tmp)
    except OSError as e:
        raise UserError(f"{flag} {given}: cannot write in {folder} ({e.strerror or e})") from None


def lock_folder() -> Path:
    """One place for every process on the machine, whatever its TMPDIR: /tmp where it exists."""
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    folder = base / "peftlab-locks"
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o1777)  # every user locks here; the sticky bit keeps their files theirs
    return folder


def _holder(file: Path) -> tuple[str, Path] | None:
    """(pid, destination) of a lock file another process holds now, else None."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        pid, _, where = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition(" ")
        return pid or "unknown", Path(where)
    finally:
        os.close(fd)


@contextmanager
def lock(path, flag: str = "--out"):
    """Hold the advisory lock of destination `path` for the duration; refuse if another
    process holds it, or holds one of a destination inside it or around it (a merge with
    --overwrite must not remove a folder another run is writing into), naming its pid."""
    dest = real(path)
    folder = lock_folder()
    file = folder / (hashlib.sha256(str(dest).encode()).hexdigest()[:32] + ".lock")
    other = f", or choose another {flag}" if flag.startswith("--") else ""
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").split()[:1]
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            raise UserError(f"{flag} {path} is in use by another peftlab process (pid {pid}); "
                            f"wait for it to finish{other}") from None
        # The holder before us may have unlinked the file after we opened it: lock the live one.
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {dest}\n".encode(), 0)
        for f in folder.glob("*.lock"):
            held = _holder(f) if f != file else None
            if held and held[0] != str(os.getpid()) and _relation(dest, held[1]) in ("holds", "is inside"):
                raise UserError(f"{flag} {path} {_relation(dest, held[1])} {held[1]}, which another peftlab process "
                                f"(pid {held[0]}) is writing; wait for it to finish{other}")
        yield fd  # a child process that inherits it (pass_fds) holds the lock with us
    finally:
        try:
            os.unlink(file)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def claim(path, **policy):
    """`lock`, then `check`: a folder another process is writing is refused as in use (the
    more useful of the two messages), and nothing changes between the check and the write."""
    with lock(path, policy.get("flag", "--out")):
        yield check(path, **policy)


def set_aside(folder: Path) -> Path | None:
    """Move an existing destination the user allowed to be replaced (--overwrite) out of the
    way in one rename; `restore` puts it back if the new run fails, `drop` removes it."""
    folder = Path(folder)
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.replaced-"))
    os.replace(folder, aside / folder.name)
    return aside


def restore(aside: Path | None, folder: Path) -> None:
    if aside is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(aside / Path(folder).name, folder)
        shutil.rmtree(aside, ignore_errors=True)


def drop(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clear(folder: Path) -> None:
    """Empty an existing destination the user allowed to be replaced (--overwrite): moved
    aside in one rename, then removed, so a crash never leaves it half-deleted."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.replaced-"))
        os.replace(folder, aside / folder.name)
        shutil.rmtree(aside, ignore_errors=True)
    elif folder.is_file():
        folder.unlink()
