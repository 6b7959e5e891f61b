"""bench tenants' pure parts: percentiles, the Poisson schedule, the clients' reading of each server's
stream, and the shape of the rows, ratios and table. No model and no server: the real run takes minutes."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from celslm.bench import tenants
from celslm.bench.tenants import Sample
from celslm.errors import UsageError


def test_percentile_is_a_measured_value_by_nearest_rank():
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert tenants.percentile(values, 0.5) == 0.3
    assert tenants.percentile(values, 0.99) == 0.5
    assert tenants.percentile(values, 0.2) == 0.1
    assert tenants.percentile(list(range(1, 101)), 0.99) == 99
    assert tenants.percentile([], 0.5) is None


def test_poisson_schedule_is_bounded_in_count_and_time_and_repeatable():
    schedule = tenants.poisson_schedule(2.0, 50, max_s=1e9, seed=3)
    assert len(schedule) == 50 and schedule[0] == 0.0
    assert schedule == sorted(schedule) and schedule == tenants.poisson_schedule(2.0, 50, max_s=1e9, seed=3)
    assert 0.5 * 49 / 2.0 < schedule[-1] < 2.0 * 49 / 2.0  # mean gap 1/rate
    short = tenants.poisson_schedule(2.0, 1000, max_s=5.0, seed=3)
    assert short and short[-1] <= 5.0 and len(short) < 40
    with pytest.raises(UsageError):
        tenants.poisson_schedule(0.0, 5)


def test_clients_take_comma_lists_and_repeats():
    assert tenants.parse_levels(None) == (1, 2, 4, 8)
    assert tenants.parse_levels(["1,4", "8", "4"]) == (1, 4, 8)
    for bad in (["0"], ["1,x"], ["300"], [""]):
        with pytest.raises(UsageError):
            tenants.parse_levels(bad)


def test_celslm_stream_events_give_first_token_count_and_cache():
    role = {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
    piece = {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}
    empty = {"choices": [{"delta": {"content": ""}, "finish_reason": None}]}  # a token with no text yet
    final = {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": {"completion_tokens": 48},
             "celslm": {"cache": "resident"}}
    assert not tenants.celslm_event(role).token
    assert tenants.celslm_event(piece) == tenants.Reading(token=True, text="Hi")
    assert tenants.celslm_event(empty).token
    end = tenants.celslm_event(final)
    assert not end.token and end.tokens == 48 and end.cache_hit is True
    assert tenants.celslm_event({"error": {"message": "busy", "code": "x"}}).error == "busy"
    fetched = {**final, "celslm": {"cache": "fetched"}}
    assert tenants.celslm_event(fetched).cache_hit is False


def test_overload_counts_refusals_their_speed_and_other_failures_apart():
    samples = [Sample(0.0, 1.0, 0.2, 48, "x"), Sample(0.1, 0.13, None, 0, "", error="HTTP 429: queue full"),
               Sample(0.2, 0.26, None, 0, "", error="HTTP 429: queue full"),
               Sample(0.3, 0.5, None, 0, "", error="HTTP 503: deadline")]
    o = tenants.overload_summary(samples, 2.5, "celslm serve --parallel 4 --max-queue 4")
    assert (o["answered"], o["refused_429"], o["failed_otherwise"]) == (1, 2, 1)
    assert o["refusal_max_s"] == pytest.approx(0.06) and o["failures"] == ["HTTP 503: deadline"]
    assert o["ttft_p99_answered_s"] == 0.2


def test_llama_server_events_count_predicted_tokens_and_see_a_cached_context():
    read = tenants.llama_event(prompt_tokens=20)
    assert read({"content": "def", "stop": False, "tokens": [1]}) == tenants.Reading(token=True, text="def")
    assert not read({"prompt_progress": {"processed": 10}, "stop": False}).token
    cached = read({"content": "", "stop": True, "tokens_predicted": 48, "timings": {"prompt_n": 1}})
    assert cached.tokens == 48 and cached.cache_hit is True and not cached.token
    assert read({"content": "", "stop": True, "tokens_predicted": 48, "timings": {"prompt_n": 2068}}).cache_hit is False


def test_summary_rates_each_round_over_first_send_to_last_end_and_pools_ttft():
    round_a = [Sample(0.0, 2.0, 0.2, 48, "x", True), Sample(0.0, 4.0, 0.4, 48, "x", True)]  # 96 tokens / 4 s
    round_b = [Sample(0.0, 3.0, 0.3, 48, "x", True), Sample(0.1, 1.0, None, 0, "", None, "HTTP 429: busy")]
    row = tenants.summarize([round_a, round_b])
    assert row["requests"] == 4 and row["errors"] == 1 and row["first_error"] == "HTTP 429: busy"
    assert row["tok_s"] == pytest.approx((24.0 + 16.0) / 2)  # rounds' medians: 96/4 and 48/3
    assert row["ttft_p50_s"] == 0.3 and row["ttft_p99_s"] == 0.4 and row["ttft_max_s"] == 0.4
    assert row["tokens"] == 144 and row["min_tokens"] == 48 and row["cache_hits"] == "3/3"


def _result() -> dict:
    def row(server, label, clients, tok_s, ttft, run="closed"):
        return {"server": server, "label": label, "run": run, "clients": clients, "requests": clients, "errors": 0,
                "first_error": None, "tokens": 48 * clients, "min_tokens": 40, "tok_s": tok_s, "ttft_p50_s": ttft,
                "ttft_p99_s": ttft * 2, "ttft_max_s": ttft * 2, "latency_p50_s": 2.0, "cache_hits": f"{clients}/{clients}"}
    rows = [row("celslm-1", "celslm serve --parallel 1", 1, 20.0, 0.2), row("celslm-1", "celslm serve --parallel 1", 4, 20.0, 3.0),
            row("celslm-n", "celslm serve --parallel 4", 1, 20.0, 0.2), row("celslm-n", "celslm serve --parallel 4", 4, 30.0, 0.3),
            row("llama-server", "llama-server --parallel 4", 4, 32.0, 0.5),
            row("celslm-n", "celslm serve --parallel 4", 8, 25.0, 1.0, run="poisson")]
    result = {"model": "m", "context_tokens": 2048, "prompt_tokens": 20, "new_tokens": 48, "parallel": 4, "threads": 2,
              "cores": 2, "rounds": 2, "clients": [1, 4], "poisson_rate_per_s": 0.35, "warm": [{"server": "llama-server", "hits": 3, "of": 4}],
              "rows": rows, "memory": [{"server": "celslm-1", "vm_rss_mib": 900.0, "vm_hwm_mib": 1000.0, "kv_buffer_mib": None},
                                       {"server": "celslm-n", "vm_rss_mib": 950.0, "vm_hwm_mib": 1100.0, "kv_buffer_mib": None}],
              "same_text_as_parallel_1": {"celslm-n": True, "llama-server": False}, "notes": []}
    result["ratios"] = tenants.ratios(result)
    return result


def test_ratios_are_the_issues_targets():
    ratios = _result()["ratios"]
    assert ratios["4"]["slowest_ttft_vs_lone"] == 3.0  # 0.6 s against a lone client's 0.2 s
    assert ratios["4"]["tok_s_vs_parallel_1"] == 1.5 and ratios["4"]["tok_s_vs_llama_server"] == pytest.approx(0.938)
    assert ratios["4"]["ttft_p99_vs_llama_server"] == 0.6
    assert ratios["1"]["tok_s_vs_llama_server"] is None  # no llama-server row at 1 client
    assert ratios["hwm_parallel_n_vs_1"] == 1.1


def test_table_json_and_notes_show_every_row():
    result = _result()
    console = Console(width=250, record=True)
    for item in tenants.render(result):
        console.print(item)
    text = console.export_text()
    assert text.count("celslm serve --parallel 4") >= 3 and "Poisson 0.35/s x 8" in text and "llama-server" in text
    assert "1.50x --parallel 1" in text and "peak memory, --parallel 4 / --parallel 1: 1.10x" in text
    assert "end-of-sequence" in text  # celslm answers shorter than 48 tokens are said to be
    assert json.loads(json.dumps(result)) == result
    notes = tenants.notes(result)
    assert any("3 of 4" in line for line in notes) and any("llama-server's first answer differs" in line for line in notes)


def test_a_missing_llama_server_is_one_line_naming_make(tmp_path):
    with pytest.raises(UsageError, match="make llama-server"):
        tenants.find_llama_server(str(tmp_path / "nope"))


def test_kv_metrics_reads_only_kv_samples_and_tolerates_no_metrics(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (b"# HELP celslm_kv_cells_used cells\n# TYPE celslm_kv_cells_used gauge\ncelslm_kv_cells_used 2112.0\n"
                    b'celslm_kv_bytes{kind="context"} 2.5e+07\ncelslm_requests_served 3.0\n')
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        found = tenants.kv_metrics(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert found == {"celslm_kv_cells_used": 2112.0, 'celslm_kv_bytes{kind="context"}': 2.5e7}
    assert tenants.kv_metrics(f"http://127.0.0.1:{server.server_port}") == {}  # nobody listening now


def test_every_request_asks_its_own_question_from_the_first_word_on():
    asked = tenants.prompts()
    assert len(set(asked)) == len(asked) == tenants.QUESTIONS
    starts = {text.split(":")[0] for text in asked}  # no two share the words before the shared question
    assert len(starts) == len(asked) and all(text.endswith(tenants.PROMPT) for text in asked)
