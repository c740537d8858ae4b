"""
Atomic writes: every file the programs write goes through write_atomic, so that a crash leaves the
old file or the whole new one, never half of one; and the temporary files that interrupted writes
leave behind, found and removed."""

import contextlib
import functools
import hashlib
import os
import re
import socket
import stat
import time
import uuid

try:  # file locks (write_atomic); not on Windows, where abandoned temporaries go by age alone
    import fcntl
except ImportError:
    fcntl = None


def write_atomic(path, write, mode="wb"):
    """Every file this program writes goes through here: write(f) fills a temporary file, which is
    then renamed to `path`, so a crash at any moment leaves either the old file or the complete new
    one under `path`, never half a file. A write that fails removes its temporary file. The
    temporary name is unique (two writers of one file, such as two runs in one --log_dir, never
    share one) and in the target's folder, so that the rename stays on one file system; "x" mode
    creates it new, with the usual permissions. The name also says which machine writes it, and the
    writer holds a lock on the file until it is renamed, so that a later run can tell what a kill -9
    left behind from a write in progress (remove_abandoned_temporaries)."""
    tmp = None
    try:
        f = None
        while f is None:
            tmp = f"{path}.{this_machine()}.{uuid.uuid4().hex[:12]}.tmp"
            f = open(tmp, mode.replace("w", "x"))
            if lock(f, wait=True) and not os.fstat(f.fileno()).st_nlink:
                f.close()  # a sweep removed it between its creation and our lock: take another name
                f = None
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            # renamed while still locked (POSIX renames open files; Windows does not)
            if fcntl is not None:
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, TypeError):  # TypeError: tmp None, nothing was created
            os.remove(tmp)
        raise


def lock(f, wait=False):
    """An exclusive lock on the open file f, released when it is closed or its process dies. Returns
    whether it was taken: False where locks do not work (Windows; file systems mounted without them,
    such as Lustre's default); raises BlockingIOError where another process holds it and not wait.
    """
    if fcntl is None:
        return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise
    except OSError:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks here
        return False
    return True


@functools.cache  # read once: every write and every swept file asks
def this_machine():
    """Who can see this process's file locks, as write_atomic's temporary names hold it: the running
    kernel's boot id (every container on this machine shares it, another machine never does), else
    the host name."""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            return hashlib.sha256(f.read().strip().encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


# seconds untouched after which a temporary file whose lock cannot be tried is abandoned
ABANDONED_AFTER = 3600


def remove_abandoned_temporaries(folder, targets):
    """Deletes the temporary files of write_atomic in `folder` that no write will finish: those a
    kill -9, a lost node or a full disk left, 0.5 GB each for a 124M checkpoint, which would
    otherwise pile up at every preemption. Only the temporaries of files whose names match `targets`
    (a regex: the files this program writes there), and only plain files. One of this machine's is
    abandoned when no process holds its lock (the kernel drops a killed process's locks); one whose
    lock cannot be tried (another machine's, where locks may not reach; an earlier version's, whose
    name says no machine; a file system without locks) when untouched for ABANDONED_AFTER seconds.
    What cannot be read or removed is left alone. Returns the names removed, and bytes."""
    removed, size = [], 0
    pattern = re.compile(rf"^(?:{targets})\.(?:(?P<machine>[A-Za-z0-9-]+)\.)?[0-9a-f]{{12}}\.tmp$")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match, path = pattern.match(name), os.path.join(folder, name)
        if not match:
            continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            with open(path, "rb") as f:
                try:
                    locked = match["machine"] == this_machine() and lock(f)
                except BlockingIOError:  # a write in progress
                    continue
                st = os.fstat(f.fileno())
                if not locked and time.time() - st.st_mtime <= ABANDONED_AFTER:
                    continue
                # while holding its lock: a writer that just created it sees it gone
                os.remove(path)
        except OSError:  # gone already (another run's sweep), unreadable, not ours to remove
            continue
        removed.append(name)
        size += st.st_size
    return removed, size


def report_abandoned_temporaries(folder, targets):
    """remove_abandoned_temporaries, said in one line when it found any."""
    removed, size = remove_abandoned_temporaries(folder, targets)
    if removed:
        names = ", ".join(removed[:3]) + (
            f" and {len(removed) - 3} more" if len(removed) > 3 else ""
        )
        amount = f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size:,} bytes"
        print(
            f"removed {len(removed)} temporary file{'s' * (len(removed) > 1)} that interrupted "
            f"writes left in {folder} ({amount}): {names}"
        )
