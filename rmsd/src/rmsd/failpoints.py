"""Named points in multi-step operations where a test may kill the process, to prove that a run
killed at any step can be rerun and converges. Inert unless RMSD_FAILPOINT names the point."""

import os
import signal

ENV = "RMSD_FAILPOINT"


def reach(name: str) -> None:
    """Die at once (SIGKILL: no cleanup, no rollback by this process) when RMSD_FAILPOINT is `name`."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
