"""
Atomic writes: a crash leaves the old file or the whole new one, never half of one. One run a
folder (DirLock), which removes what interrupted writes left there."""

import contextlib
import errno
import os
import re
import socket
import uuid

try:  # flock; not on Windows, where folders are used unheld
    import fcntl
except ImportError:
    fcntl = None

from plumbing import errors


def write_atomic(path, write, mode="wb"):
    """Every file the programs write goes through here: write(f) fills a temporary file of its own
    beside `path` (on one file system: the rename is atomic), then renamed to `path`. A failed write
    removes it; a kill -9's goes when the folder is next held (DirLock). "x": a new file, with the
    usual permissions."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    f = open(tmp, mode.replace("w", "x"))
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class DirLock:
    """`folder` (created if need be) held until release() or the with block's end, or until this
    process dies: a flock on its .lock, which the kernel drops, so a resume after a kill -9 finds it
    free. Another holder: a UserError naming its pid (`what`: the flag to change), or with wait, a
    line and a wait. Once held, write_atomic's temporaries of the files named like `targets` (a
    regex) go, in one line: whoever writes those there holds the folder. Without locks (Windows;
    ENOLCK, ENOSYS, EOPNOTSUPP: file systems mounted without them, such as Lustre's default) a line
    says the folder is used unheld; nothing is removed: a temporary may be a write in progress."""

    def __init__(self, folder, what, targets, wait=False):
        self.folder, self.path, self.fd = folder, os.path.join(folder, ".lock"), None
        self.created = not os.path.exists(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            while fcntl is not None and self.fd is None:
                self.fd = self.take(folder, what, wait)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise errors.UserError(f"cannot write to {what} {folder} ({e.strerror}); choose a "
                                       "writable directory") from None
            with contextlib.suppress(OSError):
                os.remove(self.path)
        if self.fd is None:
            print(f"cannot lock {folder} (no file locks here): a second run there is not refused, "
                  "and the temporaries of interrupted writes there are left")
            return
        os.pwrite(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        # the optional part: the machine that earlier versions named
        pattern = re.compile(rf"(?:{targets})\.(?:[A-Za-z0-9-]+\.)?[0-9a-f]{{12}}\.tmp")
        removed, size = [], 0
        for name in sorted(filter(pattern.fullmatch, os.listdir(folder))):
            with contextlib.suppress(OSError):  # a folder, or not ours to remove: left
                st = os.lstat(path := os.path.join(folder, name))
                os.remove(path)
                removed.append(name)
                size += st.st_size
        if removed:
            names = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" * bool(removed[3:]))
            amount = f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size:,} bytes"
            print(f"removed {len(removed)} temporary file{'s' * (len(removed) > 1)} that "
                  f"interrupted writes left in {folder} ({amount}): {names}")

    def take(self, folder, what, wait):
        """The .lock's descriptor, flocked; None where its holder removed it as it left."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
                if not wait:
                    raise errors.UserError(f"{folder} is in use by another run ({holder}); wait "
                                           f"for it to finish or choose another {what}") from None
                print(f"{folder} is in use by another process ({holder}); waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            if os.fstat(fd).st_nlink:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def release(self):
        """Removes the .lock while held (one who opened it meanwhile tries anew), and the folder
        where it was created and nothing was written there."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
                if self.created:
                    os.rmdir(self.folder)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
