"""The error boundary: every command ends in one of four ways.

    0    success
    2    one line `peftlab: error: ...`: a mistake in what the user asked for (UserError, a
         usage error), or a refusal of the file system (read-only, no space, not a folder),
         naming the path
    130  Ctrl-C, 143 SIGTERM: one line saying what was kept
    1    anything no check foresaw: one line calling itself a bug, the traceback saved to a file

A command tells the boundary what an interrupt keeps through `obj["kept"]`.
"""

import errno
import sys

from typer import Abort

from .compat import click_exceptions
from .errors import RunFailed, UserError
from .interrupt import Interrupted, Stop, stop_on_signals

click_errors = click_exceptions()


# Refusals of the file system that are about the user's machine, not about peftlab: one line.
ENVIRONMENT = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
               errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EFBIG, errno.EIO, errno.EBUSY, errno.ELOOP,
               errno.EXDEV}


class Exit(Exception):
    """Leave the command line with `code`, after printing `message` (if any) as one line."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code


def guarded(command, obj: dict) -> int:
    """Run `command()` (click's main, standalone_mode=False) and map how it ended to an exit code."""
    try:
        with stop_on_signals():
            code = command()
            code = code if isinstance(code, int) else 0
            if code == 130:  # typer turns a KeyboardInterrupt inside a command into Exit(130)
                raise Stop(2)
            return code
    except UserError as e:
        return error(e)
    except Interrupted as e:
        print(f"peftlab: {e}; continue with the same command and --resume", file=sys.stderr)
        return e.exit_code
    except (Stop, KeyboardInterrupt, Abort) as e:
        signum = e.signum if isinstance(e, Stop) else 2
        kept = obj["kept"]() if callable(obj["kept"]) else obj["kept"]  # what is on disk now, not what was planned
        print(f"peftlab: stopped by {'SIGTERM' if signum == 15 else 'Ctrl-C'}; {kept}", file=sys.stderr)
        return 128 + signum
    except RunFailed as e:
        print(f"peftlab: error: {e}", file=sys.stderr)
        return 1
    except Exit as e:
        if str(e):
            print(f"peftlab: error: {e}", file=sys.stderr)
        return e.code
    except click_errors.NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        return 0
    except click_errors.UsageError as e:
        sub = e.ctx.command.name if e.ctx and e.ctx.command.name not in (None, "", "peftlab") else ""
        return error(f"{e.format_message()} (see: peftlab {sub + ' ' if sub else ''}--help)")
    except OSError as e:
        if e.errno not in ENVIRONMENT:  # a missing file we meant to have is a bug of ours
            return bug(obj.get("argv", []))
        where = f" {e.filename}" if e.filename else ""
        return error(f"cannot use{where}: {e.strerror or e}")
    except RecursionError:
        return error("an input is nested too deeply to read")
    except Exception:  # noqa: BLE001  (the boundary: anything else is a bug of ours)
        return bug(obj.get("argv", []))
    finally:
        # A process group exists only where a command imported distributed.py and joined one
        # (a command refused on its arguments never loads torch: it answers at once).
        distributed = sys.modules.get("peftlab.distributed")
        if distributed is not None:
            distributed.finish()


def error(message) -> int:
    """Print one `peftlab: error:` line (whitespace folded, so never more than one) and return 2."""
    print(f"peftlab: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def bug(argv: list) -> int:
    """An exception no check foresaw: save the traceback, say it is a bug, return 1."""
    import tempfile
    import traceback

    from . import __version__

    text = f"peftlab {__version__}\nargv: {argv}\n\n{traceback.format_exc()}"
    try:
        fd, path = tempfile.mkstemp(prefix="peftlab-crash-", suffix=".txt")
        with open(fd, "w") as f:
            f.write(text)
    except OSError:
        path = "(could not be saved)"
    kind = sys.exc_info()[0].__name__
    print(f"peftlab: internal error (a bug in peftlab, please report it): {kind}; traceback: {path}", file=sys.stderr)
    return 1
