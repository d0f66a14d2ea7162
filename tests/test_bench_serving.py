"""Serving benchmark bookkeeping (the servers themselves are exercised by the demo and CI)."""

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
