"""Clients for the LLM that proposes subconcepts: any OpenAI-compatible chat endpoint, or a local
transformers causal LM.

`OpenAIChat` asks through the openai package (the `erasure[llm]` extra). A failed request (HTTP
408, 409, 429 or 5xx, a timeout, a lost connection) is retried `retries` times with the package's
exponential backoff and jitter, which waits as long as a Retry-After (or retry-after-ms) header
asks, up to 2 minutes; a longer one ends the request. `timeout` bounds each attempt as a whole —
connect, send, every read and every redirect — not each socket read (erasure.prompts.endpoint). With
`json_object` the request asks for a JSON object (response_format) holding the array; an endpoint
that refuses response_format with a 400 or 422 is asked in plain text from then on.

The API key is read from the environment for each call and is never logged, printed, put into an
exception message or stored: the openai package never holds it, and erasure.prompts.endpoint adds it
only to requests to the endpoint's own origin (a redirect elsewhere is refused). Where an endpoint
echoes it, messages, answers and the log records of openai, httpx2 and httpcore2 carry REDACTED
instead. `LocalLM` loads a folder with local files only and never with remote code. Both answer
`complete(prompt) -> str`; what they return is untrusted text, which erasure.prompts.expand parses
and filters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import urllib.parse
from pathlib import Path

from erasure.errors import LLMAnswerError, LLMError

_TASK = "You help build diverse, harmless text prompts for evaluating concept erasure in text-to-image models."
SYSTEM_PROMPT = _TASK + " You answer with a JSON array of short strings and nothing else."
# json_object mode: the endpoint only lets the model write a JSON object, so the array goes in one
SYSTEM_PROMPT_JSON_OBJECT = (_TASK + ' You answer with a JSON object whose one key, "items", holds a JSON array '
                             "of short strings, and nothing else.")
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


class _RedactKey(logging.Filter):
    """Replaces the key in a log record's message and traceback (an endpoint may echo it in a header,
    a reason or a redirect, which the transport logs)."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _redact(message, self.secret)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:  # handlers print exc_text when it is set
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact(record.exc_text, self.secret)
        return True


@contextlib.contextmanager
def _key_kept_out_of_logs(secret: str | None):
    """While the request runs, the loggers of openai, httpx2 and httpcore2 (whose debug records show
    response headers) write REDACTED for the key. A logger's filter sees only the records made on that
    logger, so each of theirs gets one."""
    if not secret:
        yield
        return
    families = ("openai", "httpx2", "httpcore2")
    loggers = [logging.getLogger(name) for name in families]
    loggers += [logger for name, logger in list(logging.Logger.manager.loggerDict.items())
                if isinstance(logger, logging.Logger) and name.split(".")[0] in families]
    redaction = _RedactKey(secret)
    for logger in loggers:
        logger.addFilter(redaction)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(redaction)


def _refuses_json_object(response) -> bool:
    """Whether an error answer says the endpoint does not take response_format json_object."""
    return response.status_code in (400, 422) and any(word in response.content
                                                      for word in (b"response_format", b"json_object"))


def _endpoint_module():
    """erasure.prompts.endpoint, which needs the openai package (and the httpx2 and httpcore2 it
    installs); an LLMError that names the extra where they are missing."""
    try:
        from erasure.prompts import endpoint
    except ImportError as e:
        raise LLMError(f"--llm openai needs the openai package ({e.name or 'part of it'} is not installed): "
                       'pip install "erasure[llm]"') from None
    return endpoint


# The openai package insists on a key and would otherwise read OPENAI_API_KEY itself; what it puts in
# the Authorization header is replaced by erasure.prompts.endpoint with the key of --api-key-env.
_KEY_FOR_THE_SDK = "set-per-request-by-erasure"


class OpenAIChat:
    """Any OpenAI-compatible chat endpoint: POST {base_url}/chat/completions, through the openai package."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, temperature: float = 1.0, retries: int = 2, json_object: bool = True):
        if not isinstance(base_url, str) or not re.match(r"https?://", base_url):
            raise LLMError(f"LLM base_url must be an http:// or https:// URL, e.g. http://localhost:8000/v1 "
                           f"(got {_display_url(str(base_url))!r})")
        if "@" in urllib.parse.urlsplit(base_url).netloc:
            raise LLMError(f"LLM base_url {_display_url(base_url)!r} holds user:password@; leave it out and put "
                           f"the API key in the variable --api-key-env names ({api_key_env})")
        if not model:
            raise LLMError("an OpenAI-compatible endpoint needs a model name")
        if not timeout or timeout <= 0:
            raise LLMError(f"LLM timeout must be a positive number of seconds (got {timeout!r})")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise LLMError(f"LLM retries must be a whole number, 0 or more (got {retries!r})")
        _endpoint_module()  # fails now, in one line, where the openai package is missing
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.endpoint = _display_url(self.url)
        self.model = model
        self.api_key_env = api_key_env  # the variable's name; its value is read per request, never stored
        self.timeout = float(timeout)
        self.temperature = float(temperature)
        self.retries = retries
        self.json_object = bool(json_object)
        self.json_object_refused = False  # set once the endpoint has refused response_format

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

    def _create(self, client, prompt: str):
        """One chat completion, its HTTP answer unparsed (erasure reads the body itself)."""
        json_object = self.json_object and not self.json_object_refused
        messages = [{"role": "system", "content": SYSTEM_PROMPT_JSON_OBJECT if json_object else SYSTEM_PROMPT},
                    {"role": "user", "content": prompt}]
        extra = {"response_format": {"type": "json_object"}} if json_object else {}
        return client.chat.completions.with_raw_response.create(model=self.model, messages=messages,
                                                                temperature=self.temperature, **extra)

    def complete(self, prompt: str) -> str:
        """The answer's text, with the key replaced by REDACTED if the endpoint echoed it. LLMError
        once the request has failed `retries` + 1 times; LLMAnswerError for an answer that is not a
        chat completion (asking again may help)."""
        import openai

        endpoint = _endpoint_module()
        key = self._key()

        def fail(problem: str, error: type[LLMError] = LLMError) -> LLMError:
            problem = _redact(" ".join(problem.split()), key)
            return error(_redact(f"{self.describe()}: {problem}", key), problem)

        try:
            http = endpoint.EndpointClient(self.base_url, key, self.timeout)
        except endpoint.Refused as e:
            raise fail(str(e)) from None
        client = openai.OpenAI(api_key=_KEY_FOR_THE_SDK, base_url=self.base_url, timeout=self.timeout,
                               max_retries=self.retries, http_client=http)
        with client, _key_kept_out_of_logs(key):
            try:
                try:
                    raw = self._create(client, prompt)
                except openai.APIStatusError as e:
                    if not (self.json_object and not self.json_object_refused and _refuses_json_object(e.response)):
                        raise
                    self.json_object_refused = True  # for the rest of this client's life
                    raw = self._create(client, prompt)
                body = raw.http_response.content
            except endpoint.Refused as e:
                raise fail(str(e)) from None
            except openai.APIStatusError as e:
                raise fail(self._status_problem(e.response, key) + _attempts(http.attempts)) from None
            except openai.APITimeoutError:
                raise fail(f"timed out after {self.timeout:g} s" + _attempts(http.attempts)) from None
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                raise fail(f"cannot reach the endpoint: {type(cause).__name__}: {cause}"
                           + _attempts(http.attempts)) from None
            except openai.OpenAIError as e:
                raise fail(f"{type(e).__name__}: {e}") from None
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise fail("response body is not JSON", LLMAnswerError) from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise fail("response has no choices[0].message.content", LLMAnswerError) from None
        if not isinstance(content, str):
            raise fail("response's choices[0].message.content is not text", LLMAnswerError)
        return _redact(content, key)

    @staticmethod
    def _status_problem(response, key: str | None) -> str:
        """HTTP status, reason and the start of the error body, the key redacted before the cut (so
        that the cut cannot leave part of it)."""
        body = response.content[:MAX_ERROR_BYTES]
        detail = body.decode("utf-8", "replace")
        if len(response.content) > MAX_ERROR_BYTES:
            detail = _drop_cut_secret(detail, key)
        detail = " ".join(_redact(detail, key).split())
        problem = f"HTTP {response.status_code} {response.reason_phrase}" + (f": {detail[:200]}" if detail else "")
        wait = response.headers.get("retry-after")
        return problem + (f" (Retry-After: {_redact(wait, key)[:40]})" if wait else "")


def _attempts(n: int) -> str:
    return f" ({n} attempts)" if n > 1 else ""


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
                api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 2,
                json_object: bool = True):
    """llm = 'openai' (needs base_url and model) or 'local:PATH'. Clear ValueError otherwise."""
    if llm == "openai":
        missing = [name for name, value in (("base_url (--base-url)", base_url), ("model (--llm-model)", model))
                   if not value]
        if missing:
            raise LLMError(f"--llm openai needs {' and '.join(missing)}, e.g. --base-url "
                             "http://localhost:8000/v1 --llm-model NAME")
        return OpenAIChat(base_url, model, api_key_env=api_key_env, timeout=timeout, retries=retries,
                          json_object=json_object)
    if isinstance(llm, str) and llm.startswith("local:"):
        path = llm[len("local:"):]
        if not path:
            raise LLMError("--llm local:PATH needs the folder of a transformers causal LM after 'local:'")
        return LocalLM(path)
    raise LLMError(f"--llm {llm!r} is not understood; use 'openai' (with --base-url and --model) or "
                     "'local:PATH' (a folder holding a transformers causal LM)")
