"""`quintet serve` against the real `openai` client: a uvicorn server on a free loopback port, started and
stopped here (a child process group; nothing outlives the module)."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from quintet.deploy.convert import quantize_folder
from quintet.models.jamba.create import create_model
from quintet.serve.launch import running_server

KEY = "test-key"
SYSTEM = "You are a careful assistant for the quintet project. " * 8  # ~430 tokens (byte-level)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    create_model("jamba-tiny", root / "float", seed=0)
    quantize_folder(root / "float", root / "tiny-fp4", group_size=32)
    return root / "tiny-fp4"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ("--max-batch", "8", "--max-context", "640", "--api-key", KEY, "--threads", "1")
    with running_server(model_dir, *args, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def complete(client, prompt, max_tokens=24, **extra):
    out = client.completions.create(
        model="tiny-fp4", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )  # fmt: skip
    return out.choices[0], out.usage


def test_completions_streamed_and_not_agree(client):
    choice, usage = complete(client, "The model", max_tokens=12)
    assert usage.prompt_tokens == 9 and usage.completion_tokens == len(token_ids(choice)) > 0
    stream = client.completions.create(
        model="tiny-fp4", prompt="The model", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_completion_logprobs_and_sampling_seed(client):
    out = client.completions.create(model="tiny-fp4", prompt="abc", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    kw = dict(model="tiny-fp4", prompt="abc", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_chat_streamed_and_not_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    out = client.chat.completions.create(model="tiny-fp4", messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny-fp4", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_stop_strings_cut_the_text(client):
    choice, _ = complete(client, "Hello", max_tokens=30)
    text = choice.text
    if len(text) < 4:
        pytest.skip("the tiny model's answer is too short to cut")
    cut = text[2:4]
    stopped, _ = complete(client, "Hello", max_tokens=30, stop=[cut])
    assert stopped.text == text[: text.index(cut)] and stopped.finish_reason == "stop"


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-fp4"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    text = httpx.get(server + "/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "batch_size",
                 "queue_length", "time_to_first_token_seconds", "prefix_cache_hits_total",
                 "prefix_cache_misses_total", "prefix_cache_bytes"):  # fmt: skip
        assert f"# TYPE quintet_serve_{name} " in text


def test_concurrent_greedy_requests_equal_each_alone(server, client):
    torch.manual_seed(3)
    prompts = [torch.randint(3, 259, (n,)).tolist() for n in (3, 19, 44, 80, 121, 170, 233, 301)]
    lengths = [30 + 5 * i for i in range(8)]
    alone = [
        token_ids(complete(client, p, m, cache_prompt=False)[0])
        for p, m in zip(prompts, lengths, strict=True)
    ]
    steps_before = metric(server, "quintet_serve_batch_size_count")
    rows_before = metric(server, "quintet_serve_batch_size_sum")
    results = [None] * 8

    def one(i):
        results[i] = token_ids(complete(client, prompts[i], lengths[i], cache_prompt=False)[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    steps = metric(server, "quintet_serve_batch_size_count") - steps_before
    rows = metric(server, "quintet_serve_batch_size_sum") - rows_before
    assert rows / steps > 2  # they really ran together (mean decode batch)


def test_prefix_cache_hit_returns_the_tokens_of_a_miss(server, client):
    def chat(user, **extra):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        out = client.chat.completions.create(
            model="tiny-fp4", messages=messages, max_tokens=20, temperature=0,
            extra_body={"return_token_ids": True, **extra},
        )  # fmt: skip
        return token_ids(out.choices[0]), out.usage

    miss, usage = chat("What is Jamba?", cache_prompt=False)
    assert usage.prompt_tokens_details.cached_tokens == 0
    hits = metric(server, "quintet_serve_prefix_cache_hits_total")
    chat("Something else first.")  # stores the system prompt's state
    hit, usage = chat("What is Jamba?")
    assert usage.prompt_tokens_details.cached_tokens >= len(SYSTEM)
    assert hit == miss
    assert metric(server, "quintet_serve_prefix_cache_hits_total") == hits + 1
    assert metric(server, "quintet_serve_prefix_cache_bytes") > 0


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


BAD = {
    "unknown model": ({"model": "nope", "prompt": "hi"}, 404),
    "max_tokens 0": ({"model": "tiny-fp4", "prompt": "hi", "max_tokens": 0}, 400),
    "max_tokens over the context": ({"model": "tiny-fp4", "prompt": "hi", "max_tokens": 10_000}, 400),
    "prompt over the context": ({"model": "tiny-fp4", "prompt": "x" * 700}, 400),
    "max_tokens a string": ({"model": "tiny-fp4", "prompt": "hi", "max_tokens": "ten"}, 400),
    "temperature a string": ({"model": "tiny-fp4", "prompt": "hi", "temperature": "hot"}, 400),
    "prompt a number": ({"model": "tiny-fp4", "prompt": 5}, 400),
    "no prompt": ({"model": "tiny-fp4"}, 400),
    "n = 2": ({"model": "tiny-fp4", "prompt": "hi", "n": 2}, 400),
    "top_p 0": ({"model": "tiny-fp4", "prompt": "hi", "top_p": 0}, 400),
    "streamed, max_tokens -1": ({"model": "tiny-fp4", "prompt": "hi", "max_tokens": -1, "stream": True}, 400),
    "token id past the vocabulary": ({"model": "tiny-fp4", "prompt": [1, 10**9]}, 400),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_completion_requests_get_openai_errors(server, case):
    body, status = BAD[case]
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + "/v1/completions", json=body, headers=auth)
    _error(r, status)
    good = {"model": "tiny-fp4", "prompt": "hi", "max_tokens": 2}  # and the server keeps serving
    assert httpx.post(server + "/v1/completions", json=good, headers=auth).json()["choices"]


def test_bad_chat_requests_malformed_json_and_a_huge_body(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = server + "/v1/chat/completions"
    _error(httpx.post(url, content=b'{"model": "tiny-fp4", "messages": [', headers=auth), 400)
    _error(httpx.post(url, content=b"[1, 2]", headers=auth), 400)
    _error(httpx.post(url, json={"model": "tiny-fp4", "messages": "hi"}, headers=auth), 400)
    bot = [{"role": "bot", "content": "x"}]
    _error(httpx.post(url, json={"model": "tiny-fp4", "messages": bot}, headers=auth), 400)
    huge = json.dumps({"model": "tiny-fp4", "messages": [{"role": "user", "content": "x" * 10_000_000}]})
    body = _error(httpx.post(url, content=huge.encode(), headers=auth, timeout=60), 413)
    assert body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-fp4", messages=[{"role": "user", "content": "x" * 700}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    ok = [{"role": "user", "content": "ok"}]
    assert client.chat.completions.create(model="tiny-fp4", messages=ok, max_tokens=2).choices


def test_api_key_is_checked(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        body = _error(httpx.get(server + "/v1/models", headers=headers), 401)
        assert body["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-fp4", prompt="hi", max_tokens=2)
    assert httpx.get(server + "/health").status_code == 200  # health needs no key


def _wait_for(predicate, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    body = {"model": "tiny-fp4", "prompt": "Once", "max_tokens": 600, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", server + "/v1/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert metric(server, "quintet_serve_slots_in_use") == 1
    # the connection is closed: the request is cancelled and its slot freed, long before 600 tokens
    assert _wait_for(lambda: metric(server, "quintet_serve_slots_in_use") == 0)
    assert metric(server, "quintet_serve_running_sequences") == 0
    assert complete(client, "still serving", 3)[0].text is not None


def test_a_full_queue_answers_429_with_retry_after(model_dir):
    args = ("--max-batch", "1", "--max-queue", "1", "--max-context", "4096", "--threads", "1")
    with (
        running_server(model_dir, *args) as url,
        httpx.Client(timeout=60) as h1,
        httpx.Client(timeout=60) as h2,
    ):
        body = {"model": "tiny-fp4", "prompt": "x", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with h1.stream("POST", url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: closing the iterator would close the connection
            next(lines)  # the first holds the only slot
            with h2.stream("POST", url + "/v1/completions", json=body) as queued:
                assert _wait_for(lambda: metric(url, "quintet_serve_queue_length") == 1)
                r = httpx.post(url + "/v1/completions", json={**body, "stream": False})
                assert _error(r, 429)["type"] == "rate_limit_error"
                assert r.headers["retry-after"] == "1"
                assert queued.status_code == 200
        assert _wait_for(lambda: metric(url, "quintet_serve_slots_in_use") == 0)
        assert metric(url, "quintet_serve_queue_length") == 0
