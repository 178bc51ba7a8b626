"""GET /metrics: Prometheus text that adds up to what the clients saw, scraped during and after load."""

from __future__ import annotations

import threading

import httpx
from conftest import parse_sse, wait_until
from prometheus_client.parser import text_string_to_metric_families

from chatstream import Settings
from chatstream.web.app import create_app


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_add_up_to_what_the_clients_saw(serve):
    app = create_app(Settings(mock=True, mock_token_delay=0.02, concurrency=2, queue_size=1,
                              session_secret="m", session_store="memory://"))
    url = serve(app).url
    service = app.state.service
    results: list[httpx.Response] = []

    def turn(text: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            results.append(c.post("/chat_stream", json={"user_input": text}))

    with httpx.Client(base_url=url, timeout=30) as client:
        threads = [threading.Thread(target=turn, args=(f"q{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: service.admission.running == 2 and service.admission.waiting == 1)
        during = scrape(client)  # under load: two generating, one queued
        assert value(during, "chatstream_running_turns") == 2 and value(during, "chatstream_queue_length") == 1
        refused = client.post("/chat_stream", json={"user_input": "no room"})
        assert refused.status_code == 503
        for t in threads:
            t.join()
        openai = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert openai.status_code == 200
        bad = client.post("/chat_stream", json={"user_input": ""})
        assert bad.status_code == 400
        after = scrape(client)

    dones = [parse_sse(r.text)[-1][1] for r in results]
    assert all(d["status"] == "success" for d in dones)
    usage = openai.json()["usage"]
    assert value(after, "chatstream_turns_total", face="chat_stream", outcome="success") == 3
    assert value(after, "chatstream_turns_total", face="openai", outcome="success") == 1
    assert value(after, "chatstream_turns_refused_total", face="chat_stream", reason="too_many_requests") == 1
    assert value(after, "chatstream_generation_tokens_total") == (
        sum(d["usage"]["completion_tokens"] for d in dones) + usage["completion_tokens"])
    assert value(after, "chatstream_prompt_tokens_total") == (
        sum(d["usage"]["prompt_tokens"] for d in dones) + usage["prompt_tokens"])
    assert value(after, "chatstream_http_requests_total", route="/chat_stream", status="200") == 3
    assert value(after, "chatstream_http_requests_total", route="/chat_stream", status="503") == 1
    assert value(after, "chatstream_http_requests_total", route="/chat_stream", status="400") == 1
    assert value(after, "chatstream_queue_wait_seconds_count") == 4
    assert value(after, "chatstream_time_to_first_token_seconds_count") == 4
    assert value(after, "chatstream_running_turns") == 0 and value(after, "chatstream_queue_length") == 0
    assert value(after, "chatstream_ready") == 1 and value(after, "chatstream_live") == 1


def test_engine_figures_are_exported_with_the_real_model(serve, default_model):
    from chatstream import ChatService

    model, tokenizer = default_model
    settings = Settings(session_secret="m", session_store="memory://", max_new_tokens=4, temperature=0.0)
    app = create_app(settings, ChatService(settings, model=model, tokenizer=tokenizer))
    url = serve(app).url
    with httpx.Client(base_url=url, timeout=60) as client:
        assert wait_until(lambda: client.get("/health").status_code == 200, timeout=30)
        assert parse_sse(client.post("/chat_stream", json={"user_input": "Hi"}).text)[-1][0] == "done"
        # The next turn's prompt starts with the first one's: the prefix cache hits.
        assert parse_sse(client.post("/chat_stream", json={"user_input": "And?"}).text)[-1][0] == "done"
        samples = scrape(client)
    assert value(samples, "chatstream_engine_steps_total") >= 4
    queried = value(samples, "chatstream_prefix_cache_queried_tokens_total")
    assert queried > 0 and 16 <= value(samples, "chatstream_prefix_cache_hit_tokens_total") <= queried
    assert value(samples, "chatstream_engine_step_seconds_total") > 0
    total = value(samples, "chatstream_kv_cache_blocks_total")
    assert total > 0 and 0 < value(samples, "chatstream_kv_cache_blocks_free") <= total


def test_metrics_are_behind_the_api_key(serve):
    url = serve(create_app(Settings(mock=True, session_secret="m", session_store="memory://", api_key="k"))).url
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"authorization": "Bearer k"}).status_code == 200


