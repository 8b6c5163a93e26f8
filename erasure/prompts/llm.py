"""Clients for the LLM that proposes subconcepts: any OpenAI-compatible chat endpoint, or a local
transformers causal LM.

`OpenAIChat` speaks HTTP with the standard library; the API key is read from the environment at
request time and is never logged, printed, put into an exception message or stored: it is sent only
to the endpoint's own origin (a redirect elsewhere is refused), and where an endpoint echoes it,
messages and answers carry REDACTED instead. `timeout` bounds the whole request, not each socket
read. `LocalLM` loads a folder with local files only and never with remote code. Both answer
`complete(prompt) -> str`; what they return is untrusted text, which erasure.prompts.expand parses
and filters.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from erasure.errors import LLMError

SYSTEM_PROMPT = ("You help build diverse, harmless text prompts for evaluating concept erasure in "
                 "text-to-image models. You answer with a JSON array of short strings and nothing else.")
MAX_RESPONSE_BYTES = 1 << 20  # an answer is a short list; anything bigger is not one
MAX_ERROR_BYTES = 1000  # of an error body, for the message (which shows 200 characters of it)
REDACTED = "[redacted API key]"  # what stands for the key wherever an endpoint echoed it


def _display_url(url: str) -> str:
    """The URL without any user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=f"***@{host}")
    return urllib.parse.urlunsplit(parts)


def _secret_forms(secret: str) -> list[str]:
    """The key as is and as written inside a JSON string (an error body may echo either)."""
    return list(dict.fromkeys([secret, json.dumps(secret)[1:-1]]))


def _redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by REDACTED."""
    if not secret:
        return text
    for form in _secret_forms(secret):
        text = text.replace(form, REDACTED)
    return text


def _drop_cut_secret(text: str, secret: str | None) -> str:
    """`text`, which a limited read may have cut inside an echoed key, without the start of the key
    it then ends with (redaction only finds whole keys)."""
    if not secret:
        return text
    for form in _secret_forms(secret):
        for n in range(min(len(form) - 1, len(text)), 0, -1):
            if text.endswith(form[:n]):
                return text[:-n]
    return text


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port made explicit: what a credential is bound to."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a port at all: an origin of its own that matches nothing
        port = -1
    return scheme, parts.hostname or "", port or {"http": 80, "https": 443}.get(scheme)


def _show_origin(url: str) -> str:
    """scheme://host[:port] of a URL, without user:password@, path or query."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# --- one request, one deadline ------------------------------------------------------------------------
# urllib's `timeout` bounds each socket operation, so a server that trickles its answer can hold a
# request indefinitely. These classes give every connect, send and read only the time left before a
# single monotonic deadline for the whole request (redirects included).

class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; socket.timeout when there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise socket.timeout(f"timed out after {self.seconds:g} s")
        return left


class _DeadlineReader(io.RawIOBase):
    """The socket's own raw reader (which keeps its reference counting), each read given the time left."""

    def __init__(self, raw, sock, deadline: _Deadline):
        self.raw, self.sock, self.deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self.sock.settimeout(self.deadline.left())
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineSocket:
    """A connected socket as http.client uses it (sendall, makefile, close), bounded by the deadline."""

    def __init__(self, sock, deadline: _Deadline):
        self._sock, self._deadline = sock, deadline

    def sendall(self, data) -> None:
        self._sock.settimeout(self._deadline.left())  # since Python 3.5 the timeout bounds the whole sendall
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        # http.client reads the status line, the headers and the body through this file
        return io.BufferedReader(_DeadlineReader(self._sock.makefile("rb", buffering=0), self._sock,
                                                 self._deadline))

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _DeadlineConnection:
    """Mixin for an http.client connection: connect within the time left (the TCP connect and a TLS
    handshake are each bounded by what is left when connecting starts), then send and read through a
    _DeadlineSocket."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = self.deadline.left()
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline)


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHandler:
    """Mixin for urllib's HTTP(S) handler: open connections of `connection` bound to `deadline`."""

    connection: type

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(self.connection, deadline=self.deadline), req, **kwargs)


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    connection = _HTTPConnection


_handlers = [_HTTPHandler]
if hasattr(http.client, "HTTPSConnection") and hasattr(urllib.request, "HTTPSHandler"):  # Python built with ssl
    class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
        pass

    class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
        connection = _HTTPSConnection

    _handlers.append(_HTTPSHandler)


class _RedirectRefused(Exception):
    """A redirect the client does not follow; the message says why, naming only the target's origin."""


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the endpoint's origin and only if it keeps the POST and its body
    (307, 308); urllib's own handler re-sends the Authorization header to any host it is sent to."""

    max_repeats = 1
    max_redirections = 3

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise _RedirectRefused(
                f"refused a redirect (HTTP {code}) to another origin, {_show_origin(newurl)}: the API key is "
                f"only sent to {_show_origin(req.full_url)}; set the base URL to the server that answers")
        if code not in (307, 308):
            fp.close()
            raise _RedirectRefused(
                f"refused a redirect (HTTP {code}) to {_display_url(newurl)}: it would turn the POST into a "
                "GET without the request; set the base URL to the address that answers")
        return urllib.request.Request(newurl, data=req.data, headers=dict(req.headers), method=req.get_method(),
                                      origin_req_host=req.origin_req_host, unverifiable=True)


class OpenAIChat:
    """Any OpenAI-compatible chat endpoint: POST {base_url}/chat/completions."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, temperature: float = 1.0):
        if not isinstance(base_url, str) or not re.match(r"https?://", base_url):
            raise LLMError(f"LLM base_url must be an http:// or https:// URL, e.g. http://localhost:8000/v1 "
                             f"(got {_display_url(str(base_url))!r})")
        if not model:
            raise LLMError("an OpenAI-compatible endpoint needs a model name")
        if not timeout or timeout <= 0:
            raise LLMError(f"LLM timeout must be a positive number of seconds (got {timeout!r})")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.endpoint = _display_url(self.url)
        self.model = model
        self.api_key_env = api_key_env  # the variable's name; its value is read per request, never stored
        self.timeout = float(timeout)
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return f"OpenAIChat(endpoint={self.endpoint!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> str:
        return f"{self.endpoint} (model {self.model})"

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def redact(self, text: str) -> str:
        """`text` with the API key (as the environment holds it now) replaced by REDACTED; for callers
        that show or keep what came from the endpoint."""
        return _redact(text, self._key())

    def complete(self, prompt: str) -> str:
        """The answer's text, with the key replaced by REDACTED if the endpoint echoed it."""
        key = self._key()
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")

        def fail(problem: str) -> LLMError:
            problem = _redact(" ".join(problem.split()), key)
            return LLMError(_redact(f"{self.describe()}: {problem}", key), problem)

        deadline = _Deadline(self.timeout)
        opener = urllib.request.build_opener(_SameOriginRedirects, *(handler(deadline) for handler in _handlers))
        try:
            with opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except _RedirectRefused as e:
            raise fail(str(e)) from None
        except urllib.error.HTTPError as e:
            try:
                body = e.read(MAX_ERROR_BYTES)
                detail = body.decode("utf-8", "replace")
                if len(body) == MAX_ERROR_BYTES:
                    detail = _drop_cut_secret(detail, key)
            except Exception:
                detail = ""
            # redacted before it is cut short, so that the cut cannot leave part of the key
            detail = " ".join(_redact(detail, key).split())
            raise fail(f"HTTP {e.code} {e.reason}" + (f": {detail[:200]}" if detail else "")) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise fail(f"timed out after {self.timeout:g} s") from None
            raise fail(f"cannot reach the endpoint: {e.reason}") from None
        except (TimeoutError, socket.timeout):
            raise fail(f"timed out after {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise fail(f"connection failed: {type(e).__name__}: {e}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise fail(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise fail("response body is not JSON") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise fail("response has no choices[0].message.content") from None
        if not isinstance(content, str):
            raise fail("response's choices[0].message.content is not text")
        return _redact(content, key)


class LocalLM:
    """A local transformers causal LM (AutoModelForCausalLM/AutoTokenizer from a folder; never trust_remote_code)."""

    def __init__(self, path: str, max_new_tokens: int = 200, seed: int = 0):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise LLMError(f"local LLM folder {str(path)!r} does not exist (expected a transformers model "
                             "folder with config.json and tokenizer files)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            self.lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                           trust_remote_code=False)
        except Exception as e:
            raise LLMError(f"local LLM folder {str(path)!r} could not be loaded as a transformers causal LM: "
                             f"{type(e).__name__}: {e}") from None
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.lm.to(self.device).eval()
        self.path = str(path)
        self.endpoint = "local"
        self.model = self.path  # what the state file records
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self._calls = 0

    def __repr__(self) -> str:
        return f"LocalLM({self.path!r})"

    def describe(self) -> str:
        return f"local model {self.path}"

    def _prompt_ids(self, prompt: str):
        tok = self.tokenizer
        text = None
        if getattr(tok, "chat_template", None):
            for messages in ([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                             [{"role": "user", "content": SYSTEM_PROMPT + "\n\n" + prompt}]):
                try:
                    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                    break
                except Exception:  # some templates refuse a system role
                    continue
        if text is None:
            text = f"{SYSTEM_PROMPT}\n\n{prompt}\n\nAnswer: "
            ids = tok(text, return_tensors="pt").input_ids
        else:
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        config = self.lm.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit and ids.shape[1] + self.max_new_tokens > limit:
            ids = ids[:, -max(1, limit - self.max_new_tokens):]
        return ids

    def complete(self, prompt: str) -> str:
        import torch

        self._calls += 1
        try:
            ids = self._prompt_ids(prompt).to(self.device)
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = self.tokenizer.eos_token_id
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.device == "cuda" else []):
                torch.manual_seed(self.seed * 1_000_003 + self._calls)
                with torch.no_grad():
                    out = self.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=self.max_new_tokens, do_sample=True, top_p=0.95,
                                              pad_token_id=pad)
            return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        except Exception as e:
            problem = f"generation failed: {type(e).__name__}: {e}"
            raise LLMError(f"{self.describe()}: {problem}", problem) from None


def make_client(llm: str, base_url: str | None = None, model: str | None = None,
                api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
    """llm = 'openai' (needs base_url and model) or 'local:PATH'. Clear ValueError otherwise."""
    if llm == "openai":
        missing = [name for name, value in (("base_url (--base-url)", base_url), ("model (--llm-model)", model))
                   if not value]
        if missing:
            raise LLMError(f"--llm openai needs {' and '.join(missing)}, e.g. --base-url "
                             "http://localhost:8000/v1 --llm-model NAME")
        return OpenAIChat(base_url, model, api_key_env=api_key_env, timeout=timeout)
    if isinstance(llm, str) and llm.startswith("local:"):
        path = llm[len("local:"):]
        if not path:
            raise LLMError("--llm local:PATH needs the folder of a transformers causal LM after 'local:'")
        return LocalLM(path)
    raise LLMError(f"--llm {llm!r} is not understood; use 'openai' (with --base-url and --model) or "
                     "'local:PATH' (a folder holding a transformers causal LM)")
