"""Server processes for the Python tests (stdlib only): start a binary, read the lines it
announces on stdout (METRICS HOST:PORT, READY HOST:PORT) without sleeps, stop it with SIGTERM."""
import pathlib
import queue
import signal
import socket
import subprocess
import threading
import time


def free_port():
    """A TCP port free on 127.0.0.1 right now (for servers that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A child whose stdout lines are collected by a reader thread; stderr goes to
    <log_dir>/<name>.log."""

    def __init__(self, name, command, log_dir, env=None):
        self.name = name
        self.log = pathlib.Path(log_dir, f"{name}.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(c) for c in command], env=env,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        self.announced = {}  # "READY" -> "127.0.0.1:4242", "METRICS" -> ...
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # EOF

    def wait_ready(self, timeout=120):
        """The address of the READY line; earlier KEY VALUE lines land in `announced`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            key, _, value = line.strip().partition(" ")
            self.announced[key] = value
            if key == "READY":
                return value
        raise AssertionError(f"{self.name} did not print READY (exit code "
                             f"{self.proc.poll()}):\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout=20):
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
