"""Start and stop a real weightfs daemon on a temporary mount, for the tests that need one
(root, /dev/fuse). One place, so every such test starts, waits for and stops it alike."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Callable, Sequence


def workdir(prefix: str) -> tuple[str, str, str]:
    """A fresh folder (0700: the daemon refuses a socket folder others can write) holding the
    mount point ``mnt`` and the socket's path: ``(folder, mnt, sock)``."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    os.chmod(tmp, 0o700)
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    return tmp, mnt, os.path.join(tmp, "control.sock")


def start(binary: str, sock: str, mnt: str, log_path: str, args: Sequence[str] = (),
          ready: Callable[[], bool] = lambda: False, timeout: float = 60) -> subprocess.Popen:
    """``binary --socket sock --log-format json mount mnt --state-dir DIR *args`` (DIR beside the
    socket), its stderr in ``log_path``;
    returns once ``ready()`` holds. Raises RuntimeError with the daemon's log when it exits or
    ``timeout`` passes first (the daemon is stopped then)."""
    # A state folder of its own beside the socket: daemons refuse to share one (and a killed
    # daemon's images would be adopted by the next test's).
    state = os.path.join(os.path.dirname(sock), "state")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([binary, "--socket", sock, "--log-format", "json", "mount", mnt,
                                 "--state-dir", state, *args], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            with open(log_path) as f:
                raise RuntimeError("the daemon did not mount: " + f.read())
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon unmounts), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
