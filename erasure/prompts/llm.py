"""Clients for the LLM that proposes subconcepts: any OpenAI-compatible chat endpoint, or a local
transformers causal LM.

`OpenAIChat` speaks HTTP with the standard library; the API key is read from the environment at
request time and is never logged, printed, put into an exception message or stored. `LocalLM` loads
a folder with local files only and never with remote code. Both answer `complete(prompt) -> str`;
what they return is untrusted text, which erasure.prompts.expand parses and filters.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

SYSTEM_PROMPT = ("You help build diverse, harmless text prompts for evaluating concept erasure in "
                 "text-to-image models. You answer with a JSON array of short strings and nothing else.")
MAX_RESPONSE_BYTES = 1 << 20  # an answer is a short list; anything bigger is not one


class LLMError(RuntimeError):
    """An LLM request or expansion step failed; the message names the endpoint/model (never the key),
    the step and the last problem. `problem` is the short form of the last problem."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


def _display_url(url: str) -> str:
    """The URL without any user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=f"***@{host}")
    return urllib.parse.urlunsplit(parts)


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


class OpenAIChat:
    """Any OpenAI-compatible chat endpoint: POST {base_url}/chat/completions."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, temperature: float = 1.0):
        if not isinstance(base_url, str) or not re.match(r"https?://", base_url):
            raise ValueError(f"LLM base_url must be an http:// or https:// URL, e.g. http://localhost:8000/v1 "
                             f"(got {_display_url(str(base_url))!r})")
        if not model:
            raise ValueError("an OpenAI-compatible endpoint needs a model name")
        if not timeout or timeout <= 0:
            raise ValueError(f"LLM timeout must be a positive number of seconds (got {timeout!r})")
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

    def complete(self, prompt: str) -> str:
        key = os.environ.get(self.api_key_env) or None
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")

        def fail(problem: str) -> LLMError:
            problem = _redact(problem, key)
            return LLMError(f"{self.describe()}: {problem}", problem)

        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as e:
            try:
                detail = e.read(300).decode("utf-8", "replace")
            except Exception:
                detail = ""
            detail = " ".join(detail.split())
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
        return content


class LocalLM:
    """A local transformers causal LM (AutoModelForCausalLM/AutoTokenizer from a folder; never trust_remote_code)."""

    def __init__(self, path: str, max_new_tokens: int = 200, seed: int = 0):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"local LLM folder {str(path)!r} does not exist (expected a transformers model "
                             "folder with config.json and tokenizer files)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            self.lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                           trust_remote_code=False)
        except Exception as e:
            raise ValueError(f"local LLM folder {str(path)!r} could not be loaded as a transformers causal LM: "
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
        missing = [name for name, value in (("base_url (--base-url)", base_url), ("model (--model)", model))
                   if not value]
        if missing:
            raise ValueError(f"--llm openai needs {' and '.join(missing)}, e.g. --base-url "
                             "http://localhost:8000/v1 --model NAME")
        return OpenAIChat(base_url, model, api_key_env=api_key_env, timeout=timeout)
    if isinstance(llm, str) and llm.startswith("local:"):
        path = llm[len("local:"):]
        if not path:
            raise ValueError("--llm local:PATH needs the folder of a transformers causal LM after 'local:'")
        return LocalLM(path)
    raise ValueError(f"--llm {llm!r} is not understood; use 'openai' (with --base-url and --model) or "
                     "'local:PATH' (a folder holding a transformers causal LM)")
