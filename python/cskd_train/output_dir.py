"""The output directory of a run: checked writable, held by one live process, cleaned of dead writers' files.

``claim_output_dir`` runs before datasets and models are built, so a directory
that cannot take the run is refused in one line before any work: it is created
(with its parents) and probed with a temporary file, a lock file ``.lock``
(pid and host, created with O_CREAT | O_EXCL) keeps a second live process out,
and a directory that already holds a run is refused unless ``--resume`` or
``--overwrite`` says what to do with it. Directories it created are removed
again if the run leaves them empty (a refused run writes nothing).
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time

LOCK_NAME = ".lock"
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")
OVERWRITTEN_FILES = RUN_FILES + ("curves.png",)
# save_atomic's temporaries: .NAME.<pid>.<random>.tmp; before the pid was in the name: .NAME.<random>.tmp
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
OLD_TEMPORARY = re.compile(r"^\.(?:last|best)\.pt\.[A-Za-z0-9_]{8}\.tmp$")
OLD_TEMPORARY_AGE = 3600.0  # seconds: an unnamed writer still writing after an hour is not plausible


class OutputDirError(RuntimeError):
    """The output directory cannot take this run (one-line message)."""


def warn(text):
    print(f"cskd-train: warning: {text}", file=sys.stderr, flush=True)


def reason(error):
    """'no space left on device' from an OSError: errno's meaning, lower case, as it ends a sentence."""
    text = os.strerror(error.errno) if error.errno else str(error)
    return text[:1].lower() + text[1:]


def make_directories(path):
    """os.makedirs that returns the directories it created (deepest last), to remove them if left empty."""
    created = []
    missing = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        missing.append(current)
        current = os.path.dirname(current)
    if not os.path.isdir(current):
        raise OutputDirError(f"cannot create --output-dir {path}: {current} is not a directory")
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:  # made meanwhile by another process
            continue
        except OSError as error:
            remove_if_empty(created)
            raise OutputDirError(f"cannot create --output-dir {path}: {reason(error)}") from None
        created.append(directory)
    return created


def remove_if_empty(directories):
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:  # not empty (the run wrote something) or gone: leave it
            return


def check_writable(path):
    """Create and remove a probe file: permission bits alone do not tell (root, read-only mounts, /proc)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".probe.{os.getpid()}.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise OutputDirError(f"cannot write to --output-dir {path}: {reason(error)}") from None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_lock(lock_path):
    """(pid, host) from a lock file, or None when it cannot be read (being written, or garbage)."""
    try:
        with open(lock_path, encoding="utf-8") as handle:
            pid, host = handle.read().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


class OutputLock:
    """``.lock`` in the output directory, holding "pid host"; taken with O_CREAT | O_EXCL."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def create(self):
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        self.held = True

    def acquire(self):
        try:
            self.create()
            return
        except FileExistsError:
            pass
        except OSError as error:
            raise OutputDirError(f"cannot create the lock {self.path}: {reason(error)}") from None
        owner = read_lock(self.path)
        if owner is None:
            raise OutputDirError(
                f"--output-dir {self.directory} is locked ({self.path} holds no pid and host): another run may be "
                f"starting there; if none is, remove {self.path}"
            )
        pid, host = owner
        if host != socket.gethostname():
            raise OutputDirError(
                f"--output-dir {self.directory} is in use by pid {pid} on host {host} ({self.path}); "
                f"if that run is over, remove {self.path}"
            )
        if pid_alive(pid):
            raise OutputDirError(
                f"--output-dir {self.directory} is in use by a running cskd-train (pid {pid}, lock {self.path}); "
                "give another --output-dir, or wait for that run to end"
            )
        warn(f"taking over the stale lock {self.path} of pid {pid} on {host}, which is no longer running")
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            self.create()  # O_EXCL again: of two processes taking over the same stale lock, one wins
        except FileExistsError:
            raise OutputDirError(f"--output-dir {self.directory} was just taken by another process "
                                 f"(lock {self.path})") from None

    def release(self):
        if self.held and read_lock(self.path) == (os.getpid(), socket.gethostname()):
            os.unlink(self.path)
        self.held = False


def run_files(directory):
    return [name for name in RUN_FILES if os.path.exists(os.path.join(directory, name))]


def refuse_used_directory(directory, resume, overwrite):
    """A fresh run must not silently empty metrics.jsonl or replace another run's checkpoints."""
    found = run_files(directory)
    if found and not resume and not overwrite:
        raise OutputDirError(
            f"--output-dir {directory} holds a run ({', '.join(found)}): continue it with --resume "
            f"{os.path.join(directory, 'last.pt')}, start over with --overwrite, or give another --output-dir"
        )


TENSORBOARD_DIR = "tensorboard"  # --tensorboard's event files


def remove_run_files(directory):
    """--overwrite: the old run's files go before the new run writes, so none of them mixes with it."""
    for name in OVERWRITTEN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    shutil.rmtree(os.path.join(directory, TENSORBOARD_DIR), ignore_errors=True)


def remove_stale_temporaries(directory, now=None):
    """Remove the temporaries of writers killed mid-save (kill -9, OOM): full-size files nothing else removes.

    A name with a pid is stale when that pid is not alive on this host (the lock makes this the only run
    writing here); old-format names without a pid when they are more than an hour old.
    """
    now = time.time() if now is None else now
    removed, freed = 0, 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        match = TEMPORARY.match(name)
        if match:
            pid = int(match.group("pid"))
            stale = pid != os.getpid() and not pid_alive(pid)
        elif OLD_TEMPORARY.match(name):
            try:
                stale = now - os.path.getmtime(path) > OLD_TEMPORARY_AGE
            except OSError:
                stale = False
        else:
            continue
        if stale:
            try:
                size = os.path.getsize(path)
                os.unlink(path)
            except OSError:
                continue
            removed, freed = removed + 1, freed + size
    if removed:
        warn(f"removed {removed} temporary file(s) of interrupted checkpoint writes ({freed / 2**20:.1f} MiB) "
             f"left in {directory} by processes that no longer run")
    return removed


def exit_on_signal(signum, frame):
    """SIGTERM outside the training loop (which saves and stops on its own): unwind so the lock is removed."""
    print(f"cskd-train: {signal.Signals(signum).name} received outside the training steps: stopping without "
          "saving", file=sys.stderr)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def released_on_sigterm():
    """While the lock is held, SIGTERM unwinds (finally blocks run) instead of killing outright."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def claim_output_dir(directory, resume, overwrite):
    """Create, probe, lock and check the output directory (rank 0 only); yields; unlocks and removes
    the directories it created if they were left empty."""
    created = make_directories(directory)
    lock = OutputLock(directory)
    try:
        check_writable(directory)
        lock.acquire()
        with released_on_sigterm():
            refuse_used_directory(directory, resume, overwrite)
            remove_stale_temporaries(directory)
            yield
    finally:
        lock.release()
        remove_if_empty(created)
