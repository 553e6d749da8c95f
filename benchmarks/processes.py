"""Process helpers the benchmark scripts share (standard library only)."""

import contextlib
import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop a process started in its own process group: SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
