"""LLM expansion of concept specs against a real local HTTP server (and a tiny local causal LM)."""

import json
import logging
import re
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from erasure.errors import LLMAnswerError
from erasure.prompts.expand import expand_spec, parse_list
from erasure.prompts.llm import MAX_RESPONSE_BYTES, LLMError, LocalLM, OpenAIChat, make_client
from erasure.prompts.spec import spec_from_dict

KEY = "sk-test-SECRET-4242"

SPEC = {
    "concept": "nudity",
    "phrasings": ["nude", "naked"],
    "twin": "remove",
    "templates": ["a photo of a {concept} {subject} {environment}"],
    "dimensions": {
        "subject": {"train": ["woman", "man", "dancer", "athlete"], "test": ["painter"]},
        "environment": {"train": ["on a beach", "in a forest", "in a bare concrete room"], "test": ["in a studio"]},
    },
    "uniform": {"forget": "a photo of a nude person", "retain": "a photo of a person"},
}

GOOD = {
    "paraphrases": ["unclothed", "in the buff", "undressed"],
    "subject": ["gardener", "old fisherman", "young chef", "skateboarder", "violinist", "sailor",
                "farmer", "pilot", "woman"],  # 'woman' is curated: dropped as a duplicate
    "environment": ["in a desert", "under a bridge", "on a rooftop", "in a library", "by a lake",
                    "in a kitchen", "on a train", "in a garden"],
}


def step_of(prompt: str) -> str:
    match = re.search(r'dimension "(\w+)"', prompt)
    return match.group(1) if match else "paraphrases"


def good_answer(prompt: str) -> str:
    return json.dumps(GOOD[step_of(prompt)])


def chat(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class Server:
    """A scripted OpenAI-compatible endpoint. Each request takes the next entry of `script`:
    (status, body, delay_s[, extra]) where body is a str/bytes or a callable(user prompt) -> content
    string, or None for the default (a good answer for the step), and extra may name response
    `headers` or a `trickle` ("status line" or "body": 20 bytes of it sent 1 byte per 0.3 s). "{AUTH}"
    in a body or header stands for the Authorization header the request came with. Every request is
    recorded, GETs too (a client that followed a 301/302/303 would send one)."""

    def __init__(self):
        self.script = deque()
        self.requests = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self.answer(json.loads(self.rfile.read(length)))

            def answer(self, body):
                prompt = body["messages"][-1]["content"] if body else ""
                with outer.lock:
                    outer.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                           "body": body, "step": step_of(prompt)})
                    entry = outer.script.popleft() if outer.script else None
                status, payload, delay, *rest = entry or (200, None, 0)
                extra = rest[0] if rest else {}
                if delay:
                    time.sleep(delay)
                if payload is None:
                    payload = json.dumps(chat(good_answer(prompt)))
                elif callable(payload):
                    payload = json.dumps(chat(payload(prompt)))
                auth = self.headers.get("Authorization", "")
                if isinstance(payload, str):
                    payload = payload.replace("{AUTH}", auth).encode()
                head = f"HTTP/1.0 {status} {self.responses.get(status, ('?',))[0]}\r\n"
                for name, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                                    **extra.get("headers", {})}.items():
                    head += f"{name}: {value.replace('{AUTH}', auth)}\r\n"
                raw = (head + "\r\n").encode() + payload
                start = {None: len(raw), "status line": 0, "body": len(raw) - 20}[extra.get("trickle")]
                try:
                    self.wfile.write(raw[:start])
                    for i in range(start, min(start + 20, len(raw))):  # a slow server: 6 s for 20 bytes
                        if outer.closing.wait(0.3):
                            return
                        self.wfile.write(raw[i:i + 1])
                    self.wfile.write(raw[start + 20:])
                except OSError:  # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.origin + "/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def content(self, text: str, status: int = 200, delay: float = 0):
        self.script.append((status, json.dumps(chat(text)), delay))

    def raw(self, body, status: int = 200, delay: float = 0, headers: dict | None = None):
        self.script.append((status, body, delay, {"headers": headers or {}}))

    def redirect(self, location: str, status: int = 302):
        self.script.append((status, b"", 0, {"headers": {"Location": location}}))

    def trickle(self, part: str):
        self.script.append((200, None, 0, {"trickle": part}))

    def steps(self) -> list[str]:
        return [r["step"] for r in self.requests]

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def spec():
    return spec_from_dict(json.loads(json.dumps(SPEC)), source="test-spec")


def client_for(server, timeout=5.0, retries=0, json_object=True):
    """A client of the server; without retries unless asked, so that each request takes one entry of
    the script (the openai package's retries have tests of their own)."""
    return make_client("openai", base_url=server.url, model="test-model", api_key_env="TEST_LLM_KEY",
                       timeout=timeout, retries=retries, json_object=json_object)


def test_happy_path(server, spec, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    state = tmp_path / "state.json"
    new = expand_spec(spec, client_for(server), per_dimension=20, paraphrases=5, state_file=state, seed=0)

    assert server.steps() == ["paraphrases", "subject", "environment"]
    for r in server.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["body"]["model"] == "test-model"
        assert [m["role"] for m in r["body"]["messages"]] == ["system", "user"]
        assert "JSON array" in r["body"]["messages"][1]["content"]
        assert r["headers"]["Authorization"] == f"Bearer {KEY}"

    assert new is not spec and spec.phrasings == ["nude", "naked"]  # the input is untouched
    assert new.phrasings == ["nude", "naked", "unclothed", "in the buff", "undressed"]
    for name in ("subject", "environment"):
        old, dim = spec.dimensions[name], new.dimensions[name]
        added = [s for s in dim.train + dim.test if s not in old.train + old.test]
        assert sorted(added) == sorted(x for x in GOOD[name] if x != "woman")
        assert dim.train[:len(old.train)] == old.train and dim.test[:len(old.test)] == old.test
        assert not {s.lower() for s in dim.train} & {s.lower() for s in dim.test}
    assert spec.dimensions["subject"].train == ["woman", "man", "dancer", "athlete"]

    saved = json.loads(state.read_text())
    assert saved["model"] == "test-model" and saved["endpoint"] == server.url + "/chat/completions"
    assert saved["phrasings"] == ["unclothed", "in the buff", "undressed"]
    for name in ("subject", "environment"):
        assert sorted(saved["dimensions"][name]["train"] + saved["dimensions"][name]["test"]) == \
            sorted(x for x in GOOD[name] if x != "woman")
        assert saved["dimensions"][name]["train"] == [s for s in new.dimensions[name].train
                                                      if s not in spec.dimensions[name].train]
    assert KEY not in state.read_text()
    assert not list(tmp_path.glob("*.tmp"))
    out = capsys.readouterr()
    assert KEY not in out.out + out.err

    # the split is deterministic for a seed; a rerun with the same state file asks for nothing
    again = expand_spec(spec, client_for(server), state_file=state, seed=0)
    assert len(server.requests) == 3
    assert again.to_dict() == new.to_dict()


def test_no_key_no_header(server, spec, monkeypatch):
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    # what the openai package would otherwise read from the environment and send along
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-key")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-private")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-private")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Private: 1\nAuthorization: Bearer sk-custom")
    expand_spec(spec, client_for(server))
    for r in server.requests:
        names = {name.lower() for name in r["headers"]}
        assert "authorization" not in names and not names & {"openai-organization", "openai-project", "x-private"}
        assert "private" not in json.dumps(r["headers"])


def test_fences_and_prose_are_parsed(server, spec):
    server.content("```json\n" + json.dumps(["unclothed"]) + "\n```")
    server.content('Sure! Here are [some] ideas:\n["gardener", "sailor"]\nHope that helps.')
    server.content('```\n["in a desert"]\n``` (all harmless)')
    new = expand_spec(spec, client_for(server))
    assert new.phrasings[-1] == "unclothed"
    assert {"gardener", "sailor"} <= set(new.dimensions["subject"].train + new.dimensions["subject"].test)
    assert "in a desert" in new.dimensions["environment"].train + new.dimensions["environment"].test
    assert len(server.requests) == 3


def test_parse_list_rejects_non_arrays():
    for text in ["", "no list here", '{"items": 3}', "[unquoted, words]", "```json\n[\"a\",\n```"]:
        with pytest.raises(ValueError, match="not a JSON array"):
            parse_list(text)
    assert parse_list('["a", ["nested"], 3]') == ["a", ["nested"], 3]
    # json_object mode: the array under "items", even where a string before it holds a bracket
    assert parse_list('{"note": "[x]", "items": ["a", "b"]}') == ["a", "b"]
    assert parse_list('```json\n{"ideas": ["c"]}\n```') == ["c"]  # another key: the first array


def test_retries_malformed_http500_and_timeout(server, spec):
    # the answer that is not an array is asked for again by expand_spec; the failed requests are
    # retried by the openai package (with retries=0 they would end the step: see the 401 test)
    server.content("[not json")                                  # paraphrases: malformed, then good
    server.raw(None)
    server.raw('{"error": "overloaded"}', status=500)            # subject: HTTP 500, then good
    server.raw(None)
    server.raw(None, delay=1.5)                                  # environment: too slow, then good
    server.raw(None)
    new = expand_spec(spec, client_for(server, timeout=0.5, retries=1), max_retries=3)
    assert server.steps() == ["paraphrases", "paraphrases", "subject", "subject", "environment", "environment"]
    assert "unclothed" in new.phrasings
    assert "gardener" in new.dimensions["subject"].train + new.dimensions["subject"].test
    assert "in a desert" in new.dimensions["environment"].train + new.dimensions["environment"].test


def test_client_errors_name_the_problem(server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    client = client_for(server, timeout=0.5)
    cases = [((500, "oops", 0), "HTTP 500"), ((200, "<html>hi</html>", 0), "not JSON"),
             ((200, '{"choices": []}', 0), "no choices"), ((200, None, 1.5), "timed out")]
    for entry, expected in cases:
        server.script.append(entry)
        with pytest.raises(LLMError, match=expected) as info:
            client.complete("hello")
        assert server.url in str(info.value) and "test-model" in str(info.value)


def test_always_malformed_fails_then_resumes(server, spec, tmp_path):
    state = tmp_path / "out" / "llm_expansion.json"
    server.raw(None)                          # paraphrases: good
    server.raw(None)                          # subject: good
    for _ in range(4):
        server.content("I cannot help with that.")  # environment: never an array
    with pytest.raises(LLMError) as info:
        expand_spec(spec, client_for(server), max_retries=3, state_file=state)
    message = str(info.value)
    assert "'environment'" in message and "3 attempts" in message and "not a JSON array" in message
    assert "test-model" in message and server.url in message
    assert server.steps() == ["paraphrases", "subject"] + ["environment"] * 3

    saved = json.loads(state.read_text())
    assert saved["phrasings"] == GOOD["paraphrases"]
    assert set(saved["dimensions"]) == {"subject"}

    server.script.clear()
    server.requests.clear()
    new = expand_spec(spec, client_for(server), max_retries=3, state_file=state)
    assert server.steps() == ["environment"]
    assert new.phrasings[2:] == GOOD["paraphrases"]
    assert "gardener" in new.dimensions["subject"].train + new.dimensions["subject"].test
    assert "in a desert" in new.dimensions["environment"].train + new.dimensions["environment"].test
    assert set(json.loads(state.read_text())["dimensions"]) == {"subject", "environment"}


def test_leaking_proposals_are_dropped(server, spec):
    # 'bare' would make the curated 'in a bare concrete room' (a retain-side subconcept) name the concept;
    # 'a' would do the same to the template's own words.
    server.content(json.dumps(["bare", "a", "unclothed", "nude", "Naked"]))
    server.content(json.dumps(["naked runner", "Nude model", "unclothed swimmer", "man", "MAN", "rock climber",
                               "x" * 61, "one two three four five six seven eight nine", "cat {concept}", 7,
                               "nudity fan", "glassblower", "glassblower"]))
    server.content(json.dumps(["in a cave"]))
    new = expand_spec(spec, client_for(server), per_dimension=20, paraphrases=5)
    assert new.phrasings == ["nude", "naked", "unclothed"]
    subjects = new.dimensions["subject"].train + new.dimensions["subject"].test
    assert sorted(set(subjects) - set(SPEC["dimensions"]["subject"]["train"] + ["painter"])) == \
        ["glassblower", "rock climber"]
    assert not any(new.mentions_concept(s) for s in subjects)


def test_all_rejected_names_the_reason(server, spec):
    server.raw(None)
    for _ in range(2):
        server.content(json.dumps(["naked runner", "unclothed swimmer", "nude model"]))
    with pytest.raises(LLMError, match=r"'subject'.*2 attempts.*all 3 items rejected: 3 contain the concept phrasing"):
        expand_spec(spec, client_for(server), max_retries=2)


def test_http_401_message_hides_the_key(server, spec, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    for _ in range(2):  # a careless server echoes the credentials it was sent
        server.raw('{"error": "invalid credentials: {AUTH}"}', status=401)
    state = tmp_path / "state.json"
    with pytest.raises(LLMError) as info:
        expand_spec(spec, client_for(server), max_retries=2, state_file=state)
    assert "HTTP 401" in str(info.value) and "paraphrases" in str(info.value)
    assert KEY not in str(info.value) and KEY not in repr(info.value) and KEY not in info.value.problem
    assert KEY not in repr(client_for(server))
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert len(server.requests) == 1  # a failed request ends the step: it is not asked again at once
    assert not state.exists()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_keeps_the_key(server, monkeypatch, status):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    other = Server()  # another port: another origin
    try:
        server.redirect(other.url + "/chat/completions?from=redirect", status)
        with pytest.raises(LLMError) as info:
            client_for(server).complete("hello")
    finally:
        other.close()
    message = str(info.value)
    assert "\n" not in message and f"HTTP {status}" in message and "another origin" in message
    assert server.url in message and other.origin in message and "from=redirect" not in message
    assert KEY not in message + repr(info.value)
    assert other.requests == []  # so neither the key nor the prompt reached it


def test_redirect_within_the_origin(server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    client = client_for(server)
    server.redirect(server.url + "/chat/completions/", 307)  # keeps the POST: followed
    assert parse_list(client.complete("hello")) == GOOD["paraphrases"]
    assert [(r["method"], r["path"]) for r in server.requests] == [("POST", "/v1/chat/completions"),
                                                                   ("POST", "/v1/chat/completions/")]
    assert server.requests[1]["body"] == server.requests[0]["body"]
    assert server.requests[1]["headers"]["Authorization"] == f"Bearer {KEY}"

    server.requests.clear()
    server.redirect("/v1/other", 302)  # would turn the POST into a bodiless GET: refused
    with pytest.raises(LLMError, match=r"redirect \(HTTP 302\) to .*/v1/other.*POST into a GET"):
        client.complete("hello")
    assert len(server.requests) == 1

    server.requests.clear()
    for _ in range(4):
        server.redirect(server.url + "/chat/completions", 307)
    with pytest.raises(LLMError, match="more than 3 in a row"):
        client.complete("hello")
    assert len(server.requests) == 4


def test_echoed_key_is_redacted_from_messages_and_answers(server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    client = client_for(server)
    # the key straddles the 200 characters of the error body the message shows
    body = '{"error": "' + "x" * 173 + ' {AUTH} is not valid"}'
    assert body.index("{AUTH}") + len("Bearer ") == 192
    server.raw(body, status=401)
    server.raw(" " * 985 + "{AUTH}", status=500)  # the read of the error body cuts the key
    server.redirect(f"http://{KEY}.invalid/v1/chat/completions")
    server.content("here is your key: {AUTH}")
    for expected in ['HTTP 401 Unauthorized: {"error": "xxx', "HTTP 500 Internal Server Error: Bearer",
                     "another origin, http://[redacted API key].invalid"]:
        with pytest.raises(LLMError) as info:
            client.complete("hello")
        assert expected in str(info.value)
        for text in [str(info.value), repr(info.value), info.value.problem]:
            assert KEY not in text and KEY[:7] not in text, text
    answer = client.complete("hello")
    assert answer == "here is your key: Bearer [redacted API key]"
    assert len(server.requests) == 4


def test_echoed_key_is_neither_used_nor_stored(server, spec, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    escaped = KEY.replace("-", "\\u002d")  # a JSON escape: only the parsed item holds the key
    server.content(f'["unclothed", "{{AUTH}}", "in the buff", "{escaped}", "nude {escaped}"]')
    server.content('["gardener", "{AUTH}", "sailor"]')
    for _ in range(2):
        server.content(f'["{{AUTH}}", "{escaped}"]')
    state = tmp_path / "out" / "llm_expansion.json"
    with pytest.raises(LLMError) as info:
        expand_spec(spec, client_for(server), max_retries=2, state_file=state)
    message, saved, out = str(info.value), state.read_text(), capsys.readouterr()
    for text in [message, repr(info.value), info.value.problem, saved, out.out, out.err]:
        assert KEY not in text and KEY[:7] not in text
    assert json.loads(saved)["phrasings"] == ["unclothed", "in the buff"]
    assert sorted(sum(json.loads(saved)["dimensions"]["subject"].values(), [])) == ["gardener", "sailor"]
    assert "'environment'" in message and "all 2 items rejected: 2 contain the API key" in message
    assert server.steps() == ["paraphrases", "subject", "environment", "environment"]

    # a state file from before (holding the key) is not reused as it is
    old = json.loads(saved)
    old["phrasings"].append(KEY)
    state.write_text(json.dumps(old))
    server.script.clear()
    new = expand_spec(spec, client_for(server), max_retries=2, state_file=state)
    assert KEY not in new.phrasings and KEY not in state.read_text()


@pytest.mark.parametrize("part", ["status line", "body"])
def test_timeout_bounds_the_whole_request(server, part):
    server.trickle(part)  # each byte well within the timeout, the answer far beyond it
    client = client_for(server, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(LLMError, match="timed out after 1 s") as info:
        client.complete("hello")
    assert time.monotonic() - start < 2.0
    assert server.url in str(info.value)


# --- the openai package's retries, timeouts, JSON mode and logs ----------------------------------------

def test_429_waits_as_long_as_retry_after_asks(server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    server.raw('{"error": {"message": "slow down"}}', status=429, headers={"Retry-After": "1"})
    server.content('["unclothed"]')
    start = time.monotonic()
    answer = client_for(server, retries=2).complete("hello")
    waited = time.monotonic() - start
    assert parse_list(answer) == ["unclothed"]
    assert 0.95 <= waited < 1.9  # the backoff alone would have been 0.5 s at most
    assert len(server.requests) == 2
    assert [r["headers"]["Authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 2
    assert server.requests[1]["body"] == server.requests[0]["body"]


def test_retry_after_beyond_two_minutes_is_not_waited(server):
    server.raw('{"error": "quota"}', status=429, headers={"Retry-After": "600"})
    start = time.monotonic()
    with pytest.raises(LLMError, match=r"HTTP 429 Too Many Requests: .*quota.*\(Retry-After: 600\)"):
        client_for(server, retries=2).complete("hello")
    assert time.monotonic() - start < 0.5 and len(server.requests) == 1


def test_500_is_retried_with_backoff_then_named_with_the_attempts(server):
    client = client_for(server, retries=1)
    server.raw('{"error": "overloaded"}', status=500)
    server.raw(None)
    start = time.monotonic()
    assert parse_list(client.complete("hello")) == GOOD["paraphrases"]
    assert 0.3 <= time.monotonic() - start < 1.5  # 0.5 s less up to 25 % jitter
    assert len(server.requests) == 2

    server.raw('{"error": "overloaded"}', status=500)
    server.raw('{"error": "still overloaded"}', status=503)
    with pytest.raises(LLMError, match=r"HTTP 503 Service Unavailable: .*still overloaded.* \(2 attempts\)"):
        client.complete("hello")


def test_malformed_json_body_is_asked_again_by_the_step(server, spec):
    server.raw('{"choices": [{"message": ')   # a 200 cut short: the openai package does not retry it
    server.raw(None)
    with pytest.raises(LLMAnswerError, match="response body is not JSON"):
        client_for(server, retries=2).complete("hello")
    assert len(server.requests) == 1  # the good answer after it was left unasked
    server.script.clear()
    server.requests.clear()
    server.raw("<html>a proxy's error page</html>")  # paraphrases: not JSON, then good
    new = expand_spec(spec, client_for(server, retries=2), max_retries=2)
    assert server.steps() == ["paraphrases", "paraphrases", "subject", "environment"]
    assert "unclothed" in new.phrasings


def test_a_slow_attempt_is_cut_and_retried(server):
    server.trickle("body")
    start = time.monotonic()
    assert parse_list(client_for(server, timeout=1.0, retries=1).complete("hello")) == GOOD["paraphrases"]
    assert time.monotonic() - start < 2.5  # 1 s for the trickling attempt, then at most 0.5 s of backoff
    assert len(server.requests) == 2


def test_response_size_is_limited(server):
    server.raw(b"[" + b" " * MAX_RESPONSE_BYTES + b"]")
    with pytest.raises(LLMError, match=f"response larger than {MAX_RESPONSE_BYTES} bytes"):
        client_for(server, retries=2).complete("hello")
    assert len(server.requests) == 1


def test_json_object_mode_and_its_fallback(server, monkeypatch):
    client = client_for(server)
    server.content(json.dumps({"items": ["unclothed", "undressed"]}))
    assert parse_list(client.complete("Reply with a JSON array")) == ["unclothed", "undressed"]
    first = server.requests[0]["body"]
    assert first["response_format"] == {"type": "json_object"}
    assert '"items"' in first["messages"][0]["content"] and "JSON" in first["messages"][1]["content"]

    # an endpoint without JSON mode: asked again in plain text, and from then on
    server.requests.clear()
    server.raw('{"error": {"message": "response_format type json_object is not supported"}}', status=400)
    assert parse_list(client.complete("hello")) == GOOD["paraphrases"]
    client.complete("hello")
    bodies = [r["body"] for r in server.requests]
    assert len(bodies) == 3 and "response_format" in bodies[0]
    assert not any("response_format" in b for b in bodies[1:])
    assert all("JSON array of short strings and nothing else" in b["messages"][0]["content"] for b in bodies[1:])

    # another 400 is an error, not a reason to drop JSON mode
    fresh = client_for(server)
    server.raw('{"error": {"message": "unknown model"}}', status=400)
    with pytest.raises(LLMError, match="HTTP 400 Bad Request: .*unknown model"):
        fresh.complete("hello")
    assert not fresh.json_object_refused

    server.requests.clear()
    client_for(server, json_object=False).complete("hello")
    assert "response_format" not in server.requests[0]["body"]


def test_the_key_stays_out_of_logs_output_and_files(server, spec, monkeypatch, tmp_path, caplog, capsys):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    caplog.set_level(logging.DEBUG)  # openai, httpx2 and httpcore2 at their most talkative
    # a careless endpoint echoes the credentials in a header httpcore2 logs, and in an error the
    # openai package logs nothing of
    server.raw('{"error": "try again, {AUTH}"}', status=500, headers={"X-Request-Id": "{AUTH}"})
    for _ in range(3):
        server.raw(None, headers={"X-Request-Id": "{AUTH}", "X-Echo": "{AUTH}"})
    state = tmp_path / "out" / "llm_expansion.json"
    expand_spec(spec, client_for(server, retries=1), state_file=state)

    assert len(server.requests) == 4 and server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("receive_response_headers") for m in messages)  # the transport did log
    assert any("[redacted API key]" in m for m in messages)
    for text in messages + [caplog.text, *capsys.readouterr()]:
        assert KEY not in text and KEY[:7] not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace")
    assert not logging.getLogger("httpcore2.http11").filters  # the redaction ends with the request

    # older openai releases log a failed send with its traceback, whose message may hold the key
    from erasure.prompts.llm import _key_kept_out_of_logs

    caplog.clear()
    with _key_kept_out_of_logs(KEY):
        try:
            raise RuntimeError(f"refused a redirect to http://{KEY}.invalid")
        except RuntimeError:
            logging.getLogger("openai._base_client").debug("Encountered Exception", exc_info=True)
    assert "Encountered Exception" in caplog.text and "RuntimeError" in caplog.text and KEY not in caplog.text


def test_user_and_password_in_the_base_url_are_refused_unshown():
    with pytest.raises(LLMError, match=r"\*\*\*@127\.0\.0\.1:1/v1.*user:password@") as info:
        make_client("openai", base_url="http://alice:hunter2@127.0.0.1:1/v1", model="m")
    assert "hunter2" not in str(info.value) and "alice" not in str(info.value)


def test_without_the_openai_package_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    import yaml

    from erasure.cli import main

    import erasure.prompts

    # as in a process without the package: import openai fails, and the module that needs it is not loaded
    monkeypatch.setitem(sys.modules, "openai", None)
    monkeypatch.delitem(sys.modules, "erasure.prompts.endpoint", raising=False)
    monkeypatch.delattr(erasure.prompts, "endpoint", raising=False)
    with pytest.raises(LLMError, match=r'pip install "erasure\[llm\]"'):
        make_client("openai", base_url="http://127.0.0.1:1/v1", model="m")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    with pytest.raises(SystemExit) as stop:
        main(["prompts", "build", str(spec), "--out", str(tmp_path / "out"), "--llm", "openai",
              "--base-url", "http://127.0.0.1:1/v1", "--llm-model", "m"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("erasure: error: --llm openai needs the openai package") and '"erasure[llm]"' in err


def test_make_client_errors(tmp_path):
    with pytest.raises(ValueError, match="base_url"):
        make_client("openai", model="m")
    with pytest.raises(ValueError, match="model"):
        make_client("openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="'gpt'"):
        make_client("gpt")
    with pytest.raises(ValueError, match="/nonexistent"):
        make_client("local:/nonexistent")
    with pytest.raises(ValueError, match="could not be loaded"):
        make_client(f"local:{tmp_path}")
    assert isinstance(make_client("openai", base_url="http://x/v1/", model="m"), OpenAIChat)


def test_local_lm_random_output_is_rejected(spec, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from erasure.tiny import clip_bpe

    vocab, merges = clip_bpe()
    tokenizer = GPT2TokenizerFast(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges],
                                  unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=512,
                                       bos_token_id=eos, eos_token_id=eos))
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    client = LocalLM(str(folder), max_new_tokens=20)
    text = client.complete("Reply with a JSON array of 3 short strings and nothing else.")
    assert isinstance(text, str) and "Reply with" not in text
    with pytest.raises(LLMError, match=r"paraphrases.*3 attempts") as info:
        expand_spec(spec, client, max_retries=3, state_file=tmp_path / "state.json")
    assert str(folder) in str(info.value)
    assert not (tmp_path / "state.json").exists()
