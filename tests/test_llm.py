"""LLM expansion of concept specs against a real local HTTP server (and a tiny local causal LM)."""

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from erasure.prompts.expand import expand_spec, parse_list
from erasure.prompts.llm import LLMError, LocalLM, OpenAIChat, make_client
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
    (status, body, delay_s) where body is a str/bytes or a callable(user prompt) -> content string,
    or None for the default (a good answer for the step). Every request is recorded."""

    def __init__(self):
        self.script = deque()
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                prompt = body["messages"][-1]["content"]
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "step": step_of(prompt)})
                    entry = outer.script.popleft() if outer.script else None
                status, payload, delay = entry or (200, None, 0)
                if delay:
                    time.sleep(delay)
                if payload is None:
                    payload = json.dumps(chat(good_answer(prompt)))
                elif callable(payload):
                    payload = json.dumps(chat(payload(prompt)))
                if isinstance(payload, str):
                    payload = payload.replace("{AUTH}", self.headers.get("Authorization", ""))
                    payload = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def content(self, text: str, status: int = 200, delay: float = 0):
        self.script.append((status, json.dumps(chat(text)), delay))

    def raw(self, body, status: int = 200, delay: float = 0):
        self.script.append((status, body, delay))

    def steps(self) -> list[str]:
        return [r["step"] for r in self.requests]

    def close(self):
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


def client_for(server, timeout=5.0):
    return make_client("openai", base_url=server.url, model="test-model", api_key_env="TEST_LLM_KEY",
                       timeout=timeout)


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
    expand_spec(spec, client_for(server))
    assert all("Authorization" not in r["headers"] for r in server.requests)


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


def test_retries_malformed_http500_and_timeout(server, spec):
    server.content("[not json")                                  # paraphrases: malformed, then good
    server.raw(None)
    server.raw('{"error": "overloaded"}', status=500)            # subject: HTTP 500, then good
    server.raw(None)
    server.raw(None, delay=1.5)                                  # environment: too slow, then good
    server.raw(None)
    new = expand_spec(spec, client_for(server, timeout=0.5), max_retries=3)
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
    assert not state.exists()


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
