"""Start `tunelab serve` in a subprocess (port 0: the OS picks a free one) and wait until it is ready."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

KEY = "test-key-0123456789-abcdef"
OTHER_KEY = "other-key-0123456789-abcdef"
THIRD_KEY = "third-key-0123456789-abcdef"


class ServerProcess:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, wait_ready: bool = True):
        self.log = log
        full_env = {**os.environ, "TUNELAB_API_KEYS": "", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=full_env)
        self.lines: list[str] = []
        first = self.proc.stdout.readline()
        self.lines.append(first)
        m = re.search(r"serving on (http://\S+)", first)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {first!r}\n{log.read_text()[-3000:]}")
        self.url = m.group(1)
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        if wait_ready:
            self.wait_ready()

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
