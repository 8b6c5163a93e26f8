"""The HTTP client that the openai package sends through (its `http_client=`), for one endpoint.

The openai package retries, backs off and honours Retry-After; what it hands to httpx2 for each
attempt passes through `EndpointClient.send`, which keeps the promises erasure makes about the key
and the answer (erasure.prompts.llm):

* the request goes to the endpoint's own origin only, with the headers of a chat request and the
  key read for this call; whatever else the openai package would add from the environment
  (organisation, project, OPENAI_CUSTOM_HEADERS) is not sent;
* a redirect is followed only within that origin and only if it keeps the POST and its body (307,
  308); anything else is refused before a byte goes to the new address (httpx2 would re-send the
  prompt, and over an http→https hop the key, to another host);
* the answer is read whole, up to MAX_RESPONSE_BYTES;
* `seconds` bounds the whole attempt: connect, send, every read and every redirect.
"""

from __future__ import annotations

import contextvars
import time
import urllib.parse
import urllib.request

import httpcore2
import httpx2
import openai

from erasure.prompts.llm import MAX_RESPONSE_BYTES, _display_url, _origin, _show_origin

MAX_REDIRECTS = 3
# What a chat request needs; httpx2 adds Host and Content-Length itself.
SENT_HEADERS = ("accept", "content-type", "user-agent")


class Refused(openai.OpenAIError):
    """A request or redirect this client does not send, or an answer it does not read; the message
    names only an origin or a URL without user:password@. An OpenAIError, which the openai package
    passes on as it is: not retried, not wrapped (older releases retry any other exception)."""


# --- one attempt, one deadline ------------------------------------------------------------------------
# httpx2's timeouts bound each connect, write and read, so a server that trickles its answer a byte at
# a time can hold a request for ever. The attempt's deadline lives in a context variable that
# EndpointClient.send sets; every network operation is given at most the time left before it.

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("erasure_llm_deadline", default=None)


def _time_left(timeout: float | None, timed_out: type[Exception]) -> float | None:
    """`timeout` cut to the time left before the attempt's deadline; `timed_out` when none is left."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore2.NetworkStream):
    def __init__(self, stream: httpcore2.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _time_left(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _time_left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _time_left(timeout, httpcore2.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
    def __init__(self, backend: httpcore2.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore2.NetworkStream:
        return _DeadlineStream(self._backend.connect_tcp(host, port, _time_left(timeout, httpcore2.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options=None) -> httpcore2.NetworkStream:
        return _DeadlineStream(self._backend.connect_unix_socket(path, _time_left(timeout, httpcore2.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineTransport(httpx2.HTTPTransport):
    """httpx2's own transport (TLS, proxies, the mapping of errors that the openai package retries on),
    its connection pool given a network backend that keeps to the deadline."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # httpx2 takes no network backend as an argument (encode/httpx#3180 asks for one); the pool
        # keeps it in this attribute and hands it to every connection it opens.
        pool = getattr(self, "_pool", None)
        if not isinstance(getattr(pool, "_network_backend", None), httpcore2.NetworkBackend):
            raise RuntimeError(f"httpx2 {httpx2.__version__} keeps its connection pool elsewhere; erasure's "
                               "whole-request timeout needs updating")
        pool._network_backend = _DeadlineBackend(pool._network_backend)


def _environment_proxy(url: str) -> str | None:
    """The proxy that HTTP_PROXY or HTTPS_PROXY names for `url`, unless NO_PROXY exempts its host, as
    the standard library reads them (httpx2 leaves a transport of one's own without proxies)."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class EndpointClient(httpx2.Client):
    """An httpx2 client bound to the origin of `base_url`, for one call of OpenAIChat.complete.

    `key` is the API key read for this call (None: no Authorization header); `seconds` bounds each
    attempt. `attempts` counts what the openai package sent, retries included."""

    def __init__(self, base_url: str, key: str | None, seconds: float):
        self.origin = _origin(base_url)
        self.shown_origin = _show_origin(base_url)
        self.key = key
        self.seconds = seconds
        self.attempts = 0
        proxy = _environment_proxy(base_url)
        try:
            transport = _DeadlineTransport(proxy=proxy)
        except (ImportError, ValueError) as e:  # a proxy scheme httpx2 does not speak, or cannot here
            raise Refused(f"cannot use the proxy {_display_url(proxy)} that the environment names for "
                          f"{self.shown_origin} ({type(e).__name__})") from None
        super().__init__(transport=transport, timeout=seconds, follow_redirects=False, trust_env=False)

    def send(self, request: httpx2.Request, **kwargs) -> httpx2.Response:
        """One attempt: redirects handled here and the body read before the deadline. The openai
        package passes `stream` and, at most, `auth` and `follow_redirects`: this client reads every
        answer whole and follows redirects by its own rule, with no other authentication."""
        self.attempts += 1
        outgoing = self._outgoing(request)
        token = _deadline.set(time.monotonic() + self.seconds)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                response = super().send(outgoing, stream=True, auth=None, follow_redirects=False)
                if not response.has_redirect_location:
                    return self._read(response, request)
                outgoing = self._redirected(outgoing, response)
            raise Refused(f"refused a redirect: more than {MAX_REDIRECTS} in a row, the last to "
                          f"{_display_url(str(outgoing.url))}")
        finally:
            _deadline.reset(token)

    def _outgoing(self, request: httpx2.Request) -> httpx2.Request:
        """`request` with only the headers a chat request needs, the key and no compression (the
        size limit counts what arrives)."""
        url = str(request.url)
        if _origin(url) != self.origin:
            raise Refused(f"refused to send a request to {_show_origin(url)}: the API key is only sent to "
                          f"{self.shown_origin}")
        headers = {name: value for name, value in request.headers.items() if name.lower() in SENT_HEADERS}
        headers["Accept-Encoding"] = "identity"
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return httpx2.Request(request.method, request.url, headers=headers, content=request.read(),
                              extensions=request.extensions)

    def _redirected(self, outgoing: httpx2.Request, response: httpx2.Response) -> httpx2.Request:
        """The request a redirect leads to, if it stays within the origin and keeps the POST."""
        code = response.status_code
        target = urllib.parse.urljoin(str(outgoing.url), response.headers["Location"])
        response.close()
        if _origin(target) != self.origin:
            raise Refused(
                f"refused a redirect (HTTP {code}) to another origin, {_show_origin(target)}: the API key is only "
                f"sent to {_show_origin(str(outgoing.url))}; set the base URL to the server that answers")
        if code not in (307, 308):
            raise Refused(
                f"refused a redirect (HTTP {code}) to {_display_url(target)}: it would turn the POST into a GET "
                "without the request; set the base URL to the address that answers")
        return httpx2.Request(outgoing.method, target, headers=outgoing.headers, content=outgoing.content,
                              extensions=outgoing.extensions)

    def _read(self, response: httpx2.Response, request: httpx2.Request) -> httpx2.Response:
        """The answer read whole (at most MAX_RESPONSE_BYTES of it), as a response to `request`, the
        openai package's own (which it reads its options back from)."""
        body = bytearray()
        try:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise Refused(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        finally:
            response.close()
        # decoded already: the new response must not decode it again
        headers = [(name, value) for name, value in response.headers.multi_items()
                   if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        extensions = {name: value for name, value in response.extensions.items()
                      if name in ("http_version", "reason_phrase")}
        return httpx2.Response(response.status_code, headers=headers, content=bytes(body), request=request,
                               extensions=extensions)
