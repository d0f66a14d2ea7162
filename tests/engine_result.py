"""The RESULT line an engine script (``vllm_engine.py`` and friends) prints, parsed."""

import json
import subprocess


def engine_result(proc: subprocess.CompletedProcess) -> dict:
    """The JSON after ``RESULT `` on stdout, or an AssertionError with the engine's stderr tail."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"engine failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
