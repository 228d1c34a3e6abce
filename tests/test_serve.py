"""The OpenAI-compatible server, exercised with the official `openai` client over real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import build_tiny

from refusalkit.generation import generate
from refusalkit.interventions import Profile, addition
from refusalkit.scoring import last_logprobs
from refusalkit.serve import create_app, serve_in_thread

KEY = "test-key-123"
_http = httpx.Client(timeout=120)  # a loaded CI machine can be slow; never a false failure
PROMPT = "Write a haiku about rain."


def _profile(d: int, layers: tuple[int, ...], norm: float, seed: int = 0) -> Profile:
    """A strong random addition: enough to change what a model says."""
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return Profile((addition({layer: v / v.norm() * norm for layer in layers}, 1.0),))


def _client(url: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0,
                         timeout=120)


def _ask(client: openai.OpenAI, prompt: str = PROMPT, **kw):
    kw.setdefault("max_tokens", 10)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": prompt}], **kw)


@pytest.fixture(scope="module")
def steer_profile(smol) -> Profile:
    return _profile(smol.hidden_size, (8, 12), 8.0)


@pytest.fixture(scope="module")
def server(smol, steer_profile):
    app = create_app(smol, steer_profile, api_key=KEY, max_tokens_limit=64,
                     max_body_bytes=20_000, max_concurrency=32, max_batch=16)
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.real
def test_models_health_and_auth(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    assert _http.get(f"{server}/health").json()["status"] == "ok"  # open for probes
    with pytest.raises(openai.AuthenticationError) as err:
        _ask(_client(server, key="wrong"))
    assert err.value.status_code == 401
    assert err.value.body["code"] == "invalid_api_key"
    r = _http.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _http.get(f"{server}/v1/models").status_code == 401


@pytest.mark.real
def test_steering_override_matches_offline_generation(server, smol, steer_profile):
    client = _client(server)
    unsteered = generate(smol, [PROMPT], max_new_tokens=10, show_progress=False)[0][0].text
    steered = generate(smol, [PROMPT], profile=steer_profile, max_new_tokens=10,
                       show_progress=False)[0][0].text
    assert steered != unsteered  # the profile changes the answer
    default = _ask(client)
    assert default.choices[0].message.content == steered
    assert default.steering == {"enabled": True, "scale": 1.0}
    off = _ask(client, extra_body={"steering": {"scale": 0.0}})
    assert off.choices[0].message.content == unsteered
    disabled = _ask(client, extra_body={"steering": {"enabled": False}})
    assert disabled.choices[0].message.content == unsteered
    assert default.usage.completion_tokens == 10 and default.choices[0].finish_reason == "length"


@pytest.mark.real
def test_streaming_equals_non_streaming(server):
    client = _client(server)
    full = _ask(client, max_tokens=12)
    chunks = list(_ask(client, max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.real
def test_logprobs_are_the_models(server, smol, steer_profile):
    r = _ask(_client(server), max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True)
        assert bytes(t.bytes) == t.token.encode()
    first = last_logprobs(smol, [PROMPT], profile=steer_profile)[0]
    assert content[0].logprob == pytest.approx(float(first.max()), abs=1e-4)


@pytest.mark.real
def test_stop_strings_and_seeded_sampling(server):
    client = _client(server)
    full = _ask(client, max_tokens=12).choices[0].message.content
    stop = full[5:8]
    cut = full[: full.index(stop)]
    r = _ask(client, max_tokens=12, stop=[stop, "zzzz"], logprobs=True)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    tokens = [t.token for t in r.choices[0].logprobs.content]  # those that start before the cut
    assert "".join(tokens).startswith(cut) and len("".join(tokens[:-1])) < len(cut)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _ask(client, max_tokens=12, stop=stop, stream=True))
    assert streamed == cut
    a = _ask(client, temperature=1.0, top_p=0.9, seed=7, max_tokens=8, n=2)
    b = _ask(client, temperature=1.0, top_p=0.9, seed=7, max_tokens=8, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens <= 16


@pytest.mark.real
def test_bad_requests_get_json_errors(server):
    client = _client(server)
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server}/v1/chat/completions"
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, max_tokens=10_000)
    assert err.value.body["code"] == "max_tokens_too_large"
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b'{"model": "x", "max_tokens": 4}', 400, "invalid_request"),  # no messages
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "invalid_request"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": false, '
         b'"top_logprobs": 2}', 400, "unsupported_parameter"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "steering": {"scale": "big"}}',
         400, "invalid_request"),
        (b'{"messages": [{"role": "user", "content": "' + b"a" * 30_000 + b'"}]}', 413,
         "request_too_large"),
        (b"[1, 2]", 400, "invalid_request"),
    ]
    for body, status, code in cases:
        r = _http.post(url, content=body, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == status, body[:60]
        err_body = r.json()["error"]
        assert err_body["code"] == code and err_body["message"]
    r = _http.get(f"{server}/v1/nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert _ask(client, max_tokens=2).choices[0].message.content  # still serving


@pytest.mark.real
def test_load_16_clients_4_requests_batched(server):
    client = _client(server)
    prompts = [f"Give me one word that rhymes with {w}." for w in
               ("cat", "dog", "sun", "tree", "blue", "car", "rain", "moon")]

    def worker(i: int) -> list[str]:
        return [_ask(client, prompts[(i + k) % len(prompts)], max_tokens=4).choices[0]
                .finish_reason for k in range(4)]

    before = _http.get(f"{server}/health").json()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(worker, range(16)))  # any error raises here
    after = _http.get(f"{server}/health").json()
    assert sum(len(r) for r in results) == 64
    assert after["rows"] - before["rows"] == 64
    assert after["batches"] - before["batches"] < 64  # requests shared forward passes
    assert after["max_rows_in_batch"] > 1 and after["in_flight"] == 0


def test_concurrency_bound_and_client_disconnect():
    lm = build_tiny("llama")
    app = create_app(lm, max_concurrency=1, max_tokens_limit=128, batch_window_ms=0)
    with serve_in_thread(app) as url:
        barrier = threading.Barrier(8)
        body = {"messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": 60, "temperature": 0}

        def post(_: int) -> httpx.Response:
            barrier.wait()
            return _http.post(f"{url}/v1/chat/completions", json=body)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        assert all(r.json()["error"]["type"] == "rate_limit_error"
                   for r in responses if r.status_code == 429)
        with _http.stream("POST", f"{url}/v1/chat/completions",
                          json={**body, "stream": True}) as r:
            next(r.iter_lines())  # read the first event, then hang up
        for _ in range(200):
            if _http.get(f"{url}/health").json()["in_flight"] == 0:
                break
            threading.Event().wait(0.05)
        assert _http.get(f"{url}/health").json()["in_flight"] == 0
        assert _http.post(f"{url}/v1/chat/completions", json=body).status_code == 200
        r = _http.post(f"{url}/v1/chat/completions",
                       json={**body, "steering": {"scale": 2.0}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_profile"
        r = _http.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 125})  # > 128
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_serve_cli_runs_a_server(tmp_path):
    """`refusalkit serve` end to end: a tiny model folder, an API key from the environment."""
    lm = build_tiny("llama", seed=1)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RK_TEST_KEY": "sekrit"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from refusalkit.cli import run; run()", "--quiet", "serve",
         "--model", str(tmp_path / "m"), "--port", str(port), "--api-key-env", "RK_TEST_KEY"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            try:
                if _http.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        r = client.chat.completions.create(model=str(tmp_path / "m"), max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason
        assert _http.get(f"{url}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    missing = subprocess.run(
        [sys.executable, "-c", "from refusalkit.cli import run; run()", "serve", "--model",
         str(tmp_path / "m"), "--api-key-env", "RK_UNSET_VARIABLE_XYZ"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: environment variable RK_UNSET_VARIABLE_XYZ is not set or empty; export the "
        "API key there first"]
