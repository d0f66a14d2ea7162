"""Serving benchmark bookkeeping (the servers themselves are exercised by the demo and CI)."""

import pytest

from dspark_vllm.bench.serving import pool_rounds


def _run(config, c, rnd, tokens, wall, answers, lat=1.0, p90=2.0, requests=None):
    return {"config": config, "concurrency": c, "round": rnd, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "requests": len(answers) if requests is None else requests,
            "latency_mean_s": lat, "latency_p90_s": p90, "answers": answers}


def test_rounds_pool_tokens_over_total_wall_and_keep_config_order():
    runs = [_run("spec", 1, 0, 100, 10, {"0": "a"}, lat=1.0, p90=1.5),
            _run("base", 1, 0, 100, 20, {"0": "a"}),
            _run("base", 1, 1, 100, 5, {"0": "a"}),
            _run("spec", 1, 1, 50, 10, {"0": "a", "1": "b"}, lat=4.0, p90=5.0)]
    rows = pool_rounds(runs, ["base", "spec"])
    assert [r["config"] for r in rows] == ["base", "spec"]
    base, spec = rows
    assert base["tok_s"] == 200 / 25 and base["rounds"] == 2 and base["tok_s_per_round"] == [5.0, 20.0]
    assert spec["tok_s"] == 150 / 20
    assert spec["latency_mean_s"] == (1.0 * 1 + 4.0 * 2) / 3 and spec["latency_p90_s"] == 5.0
    assert spec["answers"] == {"0": "a", "1": "b"}


def test_an_answer_that_changes_between_rounds_is_not_identical():
    runs = [_run("spec", 4, 0, 10, 1, {"0": "a"}), _run("spec", 4, 1, 10, 1, {"0": "b"})]
    (row,) = pool_rounds(runs, ["spec"])
    assert row["answers"] == {"0": None}


def test_latency_is_weighted_by_requests_not_distinct_prompts():
    """Four requests that repeat one prompt weigh four times one request."""
    runs = [_run("spec", 4, 0, 40, 1, {"0": "a"}, lat=2.0, requests=4), _run("spec", 4, 1, 10, 1, {"0": "a"}, lat=6.0)]
    (row,) = pool_rounds(runs, ["spec"])
    assert row["latency_mean_s"] == (2.0 * 4 + 6.0 * 1) / 5


def test_counter_delta_keeps_label_summed_names_and_pooling_adds_rounds():
    from dspark_vllm.bench.serving import counter_delta

    before = {"dspark:gated_steps_total": 10.0, 'dspark:position_reached_total{position="0"}': 3.0}
    after = {"dspark:gated_steps_total": 25.0, "dspark:draft_steps_total": 4.0,
             'dspark:position_reached_total{position="0"}': 9.0}
    delta = counter_delta(before, after)
    assert delta == {"dspark:gated_steps_total": 15.0, "dspark:draft_steps_total": 4.0}
    runs = [dict(_run("la", 16, r, 100, 10, {"0": "a"}), counters=delta) for r in (0, 1)]
    (row,) = pool_rounds(runs, ["la"])
    assert row["counters"] == {"dspark:gated_steps_total": 30.0, "dspark:draft_steps_total": 8.0}


def test_repeats_mirror_the_order_so_each_config_is_first_as_often_as_last():
    from dspark_vllm.bench.serving import run_order

    names = ["no-spec", "la"]
    orders = [run_order(names, rnd, 0, rep) for rnd in range(2) for rep in range(2)]
    assert orders[:2] == [["no-spec", "la"], ["la", "no-spec"]]  # A B, B A within a round
    assert orders[2:] == [["la", "no-spec"], ["no-spec", "la"]]  # the next round starts mirrored
    firsts = [o[0] for o in orders]
    assert firsts.count("no-spec") == firsts.count("la")
    assert run_order(names, 0, 1, 0) == ["la", "no-spec"]  # the next concurrency mirrors too


def test_turn_order_alternates_baselines_and_speculative_servers():
    from dspark_vllm.bench.serving import run_order, turn_order

    names = ["no-spec", "no-spec-control", "la", "la-twin"]
    order = turn_order(names, ["no-spec", "no-spec-control"])
    assert order == ["no-spec", "la", "no-spec-control", "la-twin"]
    # in both directions of the mirrored order no two servers of one side run back to back
    for o in (run_order(order, 0, 0, rep) for rep in range(2)):
        sides = [n.startswith("no-spec") for n in o]
        assert all(a != b for a, b in zip(sides, sides[1:]))
    # more speculative servers than baselines: the rest follow in their own order
    assert turn_order(["no-spec", "a", "a-twin", "b"], ["no-spec"]) == ["no-spec", "a", "a-twin", "b"]


def test_paired_ratios_divide_by_the_baseline_run_of_the_same_round_and_repeat():
    from dspark_vllm.bench.serving import paired_ratios

    runs = [dict(_run("no-spec", 16, 0, 100, 10, {}), repeat=0), dict(_run("la", 16, 0, 120, 10, {}), repeat=0),
            dict(_run("la", 16, 0, 90, 10, {}), repeat=1), dict(_run("no-spec", 16, 0, 100, 5, {}), repeat=1),
            dict(_run("la", 4, 0, 90, 10, {}), repeat=0)]  # another concurrency: no baseline, not paired
    assert paired_ratios(runs, "la", 16) == [1.2, 9.0 / 20.0]
    assert paired_ratios(runs, "la", 4) == []


def test_ratio_summary_is_a_geometric_mean_with_a_t_interval_that_narrows_with_runs():
    import math

    from dspark_vllm.bench.serving import ratio_summary

    one = ratio_summary([1.1])
    assert one["geomean"] == 1.1 and math.isnan(one["low"])
    s = ratio_summary([0.8, 1.25])  # log ratios -x, +x: geometric mean exactly 1
    assert math.isclose(s["geomean"], 1.0) and s["low"] < 0.8 and s["high"] > 1.25  # t(1 dof) = 12.7
    noisy = [0.94, 1.02, 1.07, 0.98, 1.00, 0.96]
    few, many = ratio_summary(noisy[:3]), ratio_summary(noisy * 4)
    assert few["low"] < many["low"] < many["geomean"] < many["high"] < few["high"]
    flat = ratio_summary([1.03] * 5)
    assert math.isclose(flat["low"], flat["high"]) and math.isclose(flat["geomean"], 1.03)  # no spread, no width


def test_both_baselines_ratio_pools_tokens_and_wall_time_of_the_two_no_spec_servers():
    from dspark_vllm.bench.serving import both_baselines_ratio

    base = {"tokens": 800, "wall_s": 10.0}  # 80 tok/s
    control = {"tokens": 700, "wall_s": 10.0}  # 70 tok/s: pooled 75
    assert both_baselines_ratio({"tok_s": 75.0}, base, control) == 1.0
    assert both_baselines_ratio({"tok_s": 78.0}, base, control) > 1.0 > 78.0 / 80.0


def test_twins_pool_two_instances_of_each_configuration_against_both_baselines():
    """--twins: every speculative server gets a twin; the report pools each pair of instances
    (total tokens / total wall time) against the two no-spec servers pooled."""
    from dspark_vllm.bench.serving import _ratios, add_twins, pooled_ratio

    spec = {"method": "dspark"}
    configs = add_twins([("no-spec", None, {}), ("dspark-fixed", spec, {"A": "1"}), ("dspark-load-aware", spec, {})])
    assert [c[0] for c in configs] == ["no-spec", "dspark-fixed", "dspark-fixed-twin", "dspark-load-aware",
                                      "dspark-load-aware-twin"]
    assert configs[2][1:] == (spec, {"A": "1"})  # the twin is the same server

    def row(config: str, tokens: int, wall: float) -> dict:
        return {"config": config, "concurrency": 16, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                "latency_mean_s": 1.0, "answers": {"0": "x"}}

    rows = [row("no-spec", 900, 10.0), row("no-spec-control", 700, 10.0),  # pooled 80 tok/s
            row("dspark-load-aware", 700, 10.0), row("dspark-load-aware-twin", 1000, 10.0)]  # pooled 85
    out = {"rows": rows, "runs": []}
    _ratios(out)
    assert rows[2]["ratio"] == pytest.approx(700 / 900)  # against one instance: 0.78x
    assert rows[2]["ratio_both_instances"] == pytest.approx(85 / 80)  # both against both: 1.06x
    assert "ratio_both_instances" not in rows[3]  # reported once, on the configuration itself
    assert pooled_ratio([rows[2]], [rows[0]]) == pytest.approx(rows[2]["ratio"])


def test_variants_name_extra_servers_and_reject_bad_input(tmp_path):
    from dspark_vllm.bench.serving import parse_variants

    good = tmp_path / "margin.yaml"
    good.write_text("scheduler:\n  gate_min_gain: 1.15\n")
    assert parse_variants([f"m115={good}"], ["no-spec"]) == [("m115", str(good.resolve()))]
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler:\n  gate_min_gain: 0.5\n")  # below its 1.0 floor
    lost = tmp_path / "lost.yaml"
    lost.write_text("scheduler:\n  cost_profile: profiles/none.json\n")
    for specs, words in (([f"m={bad}"], "gate_min_gain"), ([str(good)], "NAME=SETTINGS"),
                         ([f"no-spec={good}"], "already used"), ([f"a={good}", f"a={good}"], "already used"),
                         ([f"m={lost}"], "does not exist"), ([f"m-twin={good}"], "--twins")):
        with pytest.raises(SystemExit, match=words):
            parse_variants(specs, ["no-spec"])


def test_peers_are_served_by_vllms_own_methods_and_tau_comes_from_vllms_counters():
    from dspark_vllm.bench.serving import PEERS, peer_configs, tau

    peers = peer_configs(None)
    assert peers["ngram"] == {"method": "ngram", "num_speculative_tokens": 5}
    assert peers["ngram-tuned"]["method"] == "ngram" and peers["suffix"] == {"method": "suffix"}
    assert peers["suffix-prompt"]["suffix_decoding_max_cached_requests"] == 0  # no cross-request cache
    assert "dflash-upstream" not in peers and set(peers) < set(PEERS)
    assert peer_configs("/d")["dflash-upstream"]["method"] == "dflash"
    assert all(cfg["method"] != "dspark" for cfg in peers.values())  # never the plugin's path
    assert tau({"vllm:spec_decode_num_drafts_total": 10, "vllm:spec_decode_num_accepted_tokens_total": 15}) == 2.5
    assert tau({}) is None


def test_prompts_the_server_would_refuse_are_left_out_with_a_count(capsys):
    from dspark_vllm.bench.serving import MAX_MODEL_LEN, fitting_prompts
    from dspark_vllm.pypi_models import smollm2_path

    long = "word " * MAX_MODEL_LEN
    kept = fitting_prompts(["What is 2 + 2?", long, "Name a colour."], str(smollm2_path()), 96, "set")
    assert kept == ["What is 2 + 2?", "Name a colour."]
    assert "set: 1 of 3 prompts left out" in capsys.readouterr().out


def test_stopping_a_server_ends_its_whole_process_group(tmp_path):
    """A vLLM server's engine core and workers are its children; stopped mid start-up they used to
    outlive the API server and keep their memory. A child that ignores SIGTERM is killed too."""
    import os
    import subprocess
    import sys
    import time

    from dspark_vllm.bench.serving import stop_process_group

    pid_file = tmp_path / "child.pid"
    child = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)")
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    stop_process_group(proc, timeout=2)
    assert proc.returncode is not None
    time.sleep(0.2)
    try:
        os.kill(child_pid, 0)
        alive = open(f"/proc/{child_pid}/stat").read().split()[2] != "Z"  # a zombie waits for init to reap it
    except ProcessLookupError:
        alive = False
    assert not alive, "the SIGTERM-ignoring child outlived stop_process_group"
