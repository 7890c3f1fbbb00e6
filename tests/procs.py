"""Helpers for tests that run real processes on the loopback interface."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, until: Callable[[], Any], seconds: float = 300.0, every: float = 0.3) -> Any:
    """Poll ``until()`` until it returns something true (returned), or fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = until()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def accelerate_launch(module_args: list[str], processes: int = 2, timeout: float = 900, use_cpu: bool = True) -> Any:
    """``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m ...`` (N
    processes, gloo on the loopback), as a user would run it; returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    launcher = Path(sys.executable).parent / "accelerate"
    # `--cpu` alone starts one process unless under mpirun (accelerate 1.15): the launcher
    # that starts N processes is the multi-GPU one (torch.distributed.run), told to use the
    # CPU, which makes accelerate pick gloo (docs/akd.md, "Several processes")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(free_port()), "-m", *module_args]
    # one thread per process: two processes on two cores
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
