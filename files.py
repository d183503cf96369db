"""
Writing a file whole or not at all: what every writer of the repo's model files uses (train.py's checkpoints and
interop.py's exports). A file is written under a temporary name beside its destination, fsynced, and renamed over it;
a rename is atomic and replaces a hard link instead of writing through it, so a crash, a full disk or a refused model
leaves the old file as it was.
"""
import glob
import os
import re
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(directory):
    """Make renames in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteRecorder:
    """A file's write() that keeps the OSError it raised (torch.save reports a failed write in its own words)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


class WriteError(OSError):
    """A file that could not be written, its path and the one-line reason; the old file is as it was."""

    def __init__(self, path, reason):
        super().__init__(f"could not write {path} ({reason})")
        self.path, self.reason = path, reason


def first_line(e):
    """An exception's message cut to its first line (libraries' errors run to tracebacks of their own)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def cause(e):
    """The one-line reason of a failed write: the OS's words where there are some (safetensors wraps them as
    "I/O error: <the OS's words> (os error N)")."""
    if isinstance(e, WriteError):
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    wrapped = re.search(r'I/O error: (.+?) \(os error \d+\)', str(e))
    return wrapped[1] if wrapped else first_line(e)


def write_failure(e):
    """Whether e is a failed write (the OS's, torch's zip writer's or safetensors'), not a refusal of the content."""
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == 'SafetensorError'


@contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` for the caller to write. When the block ends, the file is fsynced and
    renamed over `path`, and the directory fsynced. On any error the temporary file is removed and `path` is as it
    was; a failed write (disk full, file too large, read-only or missing folder) becomes a WriteError of one line
    that names `path` and the cause, other errors (a model a format cannot hold) pass through as they are."""
    path = Path(path)
    for stale in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if write_failure(e) and not isinstance(e, WriteError):
            raise WriteError(path, cause(e)) from e
        raise


def save_torch(obj, path):
    """torch.save(obj, path), whole or not at all (atomic_path), a failed write reported in the OS's words."""
    import torch
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        writer = WriteRecorder(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:  # torch's zip writer hides the file's own error behind its own message
            raise (writer.error or e) from e


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')
