"""`interp serve-explainer`: a local image-text-to-text model behind the OpenAI chat-completions API.

    interp serve-explainer --model shapes-explainer --port 8000
    interp explain RUN --explainer http://127.0.0.1:8000/v1 --api-model shapes-explainer

One process holds the model and any number of `interp explain` runs share it. uvicorn (h11) serves
a Starlette app; requests that arrive within a few milliseconds of each other (an explainer asks one
question per example) run as one batch on the model. Images come as base64 data URLs in
`image_url` parts (nothing is fetched); `logprobs`/`top_logprobs` return the first answer token's
distribution, which judges need for AUROC. Single-turn requests (optional system message and one
user message) only.

Why not `transformers serve` (tried on the organisms, transformers 5.23): it serves them, but it
returns no logprobs, fetches http image URLs, accepts a 17 KB 12000x12000 PNG (12 s, 2.4 GB peak)
and answers `messages: [1]` with a 500 and a traceback.

What keeps it up (ServerLimits): at most `max_concurrency` requests are read, decoded and on the
model at once and up to `max_queue` more wait for a slot without their body being read (beyond
that: 429, which clients retry). A body over `max_body_bytes` gets a 413, from its Content-Length
before any byte is kept (the rest is read and dropped, up to 4x the limit, so the client sees the
413 rather than a reset). Image sizes are read from the image header before anything is decoded:
an image over `max_image_pixels`, or images over `max_request_pixels` together, get a 400. A client
has `read_timeout` seconds to send the request head and again the body (408). So resident memory
stays under the model plus max_concurrency x (max_body_bytes + 3 x max_request_pixels) bytes.
Every refusal is a JSON error with a message and one log line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import uvicorn
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from explain.backends import ChatRequest, HFBackend, Reply

log = logging.getLogger("explain.server")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # decoders a request may reach; the rest stay closed
MiB = 2**20


@dataclass
class ServerLimits:
    max_body_bytes: int = 32 * MiB  # a request body (JSON with base64 images)
    max_image_pixels: int = 4096 * 4096  # one image, width x height from its header
    max_request_pixels: int = 2 * 4096 * 4096  # all images of one request together
    max_images: int = 64  # images in one request
    max_tokens: int = 512  # max_tokens a request may ask for
    max_concurrency: int = 32  # requests read, decoded and on the model at once (also the largest batch)
    max_queue: int = 256  # requests waiting for a slot; more get 429
    read_timeout: float = 30.0  # seconds a client has to send the request head, and again the body

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                flag = "--max-body-mb" if name == "max_body_bytes" else "--" + name.replace("_", "-")
                raise ValueError(f"server limit {name} ({flag}) must be > 0, got {value!r}")


class RequestError(ValueError):
    """A request this server refuses: the status and a message that says what to change."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


# ---------------------------------------------------------------- parsing a chat-completions body


def parse_request(body, limits: ServerLimits | None = None) -> tuple[ChatRequest, int]:
    """(the request, top_logprobs) from a decoded chat-completions body. Images are decoded last,
    once the whole body is valid and every image's header size has passed the limits."""
    limits = limits or ServerLimits()
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {_kind(body)}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("the body needs a non-empty 'messages' list")
    if body.get("stream"):
        raise RequestError("streaming is not supported: drop 'stream'")
    images = _Images(limits)
    system, parts, users = None, [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content', got {_kind(m)}")
        role, content = m.get("role"), m.get("content")
        if role == "system":
            system = _system_text(content, i)
        elif role == "user":
            users += 1
            parts = _parts(content, i, images)
        else:
            raise RequestError(f"messages[{i}]: only single-turn requests (system + user) are supported, "
                               f"got role {role!r}")
    if users != 1:
        raise RequestError(f"need exactly one user message, got {users}")
    n = body.get("max_completion_tokens") or body.get("max_tokens") or 32
    if not _is_int(n) or not 1 <= n <= limits.max_tokens:
        raise RequestError(f"max_tokens must be an integer in 1..{limits.max_tokens}, got {n!r}")
    want = body.get("logprobs") or False
    if not isinstance(want, bool):
        raise RequestError(f"logprobs must be true or false, got {want!r}")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= 20):
        raise RequestError(f"top_logprobs must be an integer in 0..20, got {top!r}")
    top = (top if top is not None else 1) if want else 0
    parts = [images.load(p) if isinstance(p, Image.Image) else p for p in parts]  # every header passed: decode
    return ChatRequest(parts, max_tokens=n, system=system), top


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(x) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(x), f"a number ({x!r})" if isinstance(x, (int, float)) else type(x).__name__)


def _system_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) and isinstance(c.get("text", ""), str) for c in content):
        return " ".join(c.get("text", "") for c in content)
    raise RequestError(f"messages[{i}]: system content must be a string or a list of text parts")


def _parts(content, i: int, images: _Images) -> list:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}]: content must be a string or a list of parts, got {_kind(content)}")
    out = []
    for j, c in enumerate(content):
        kind = c.get("type") if isinstance(c, dict) else None
        where = f"messages[{i}].content[{j}]"
        if kind == "text":
            if not isinstance(c.get("text"), str):
                raise RequestError(f"{where}: a text part needs a string 'text'")
            out.append(c["text"])
        elif kind == "image_url":
            ref = c.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            out.append(images.open(url, where))
        else:
            raise RequestError(f"{where}: unsupported content part {kind!r} (text and image_url only)")
    return out


class _Images:
    """Opens a request's images lazily and checks their header sizes; `load` decodes them once all passed."""

    def __init__(self, limits: ServerLimits):
        self.limits, self.count, self.pixels = limits, 0, 0

    def open(self, url, where: str) -> Image.Image:
        lim = self.limits
        if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:200]:
            raise RequestError(f"{where}: images must be base64 data URLs (data:image/png;base64,...): "
                               "this server fetches nothing")
        self.count += 1
        if self.count > lim.max_images:
            raise RequestError(f"more than {lim.max_images} images in one request (--max-images): split it")
        try:
            raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the image data URL is not valid base64") from None
        try:
            im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # lazy: reads the header, decodes nothing
        except Image.DecompressionBombError as e:  # PIL's own guard (twice its MAX_IMAGE_PIXELS) came first
            raise RequestError(f"{where}: {e}; this server's limit is {lim.max_image_pixels:,} pixels per image "
                               "(--max-image-pixels)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise RequestError(f"{where}: not a {'/'.join(IMAGE_FORMATS)} image") from None
        w, h = im.size
        if w * h > lim.max_image_pixels:
            raise RequestError(f"{where}: the image is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                               f"{lim.max_image_pixels:,} per image (--max-image-pixels): resize it before sending")
        self.pixels += w * h
        if self.pixels > lim.max_request_pixels:
            raise RequestError(f"the request's images have {self.pixels:,} pixels or more together, over this "
                               f"server's limit of {lim.max_request_pixels:,} (--max-request-pixels): send smaller "
                               "or fewer images")
        im.where = where
        return im

    @staticmethod
    def load(im: Image.Image) -> Image.Image:
        try:
            with im:
                return im.convert("RGB")
        except Exception as e:  # any decoder error means the same thing here: a broken image
            raise RequestError(f"{im.where}: cannot decode the {im.format} image ({type(e).__name__}: {e})") from None


def response(reply: Reply, model: str, top: int) -> dict:
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop",
                    "logprobs": None}
    if top and reply.logprobs:
        first = [{"token": t, "logprob": lp} for t, lp in reply.logprobs[:top]]
        choice["logprobs"] = {"content": [{**first[0], "top_logprobs": first}]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": reply.tokens_in, "completion_tokens": reply.tokens_out,
                      "total_tokens": reply.tokens_in + reply.tokens_out}}


# ---------------------------------------------------------------- the model thread


class Batcher:
    """Runs requests that arrive together as one batch on the model (one thread owns the model)."""

    def __init__(self, backend: HFBackend, max_batch: int = 32, wait_s: float = 0.005):
        self.backend, self.max_batch, self.wait_s = backend, max_batch, wait_s
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="explainer-batcher")
        self._thread.start()

    def submit(self, req: ChatRequest, top: int) -> Future:
        fut: Future = Future()
        self._q.put((req, top, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            items, stop = [first], False
            deadline = time.time() + self.wait_s
            while len(items) < self.max_batch:
                try:
                    item = self._q.get(timeout=max(0.0, deadline - time.time()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                items.append(item)
            try:
                replies = self.backend.complete([r for r, _, _ in items], top_logprobs=max(t for _, t, _ in items))
                for (_, _, fut), rep in zip(items, replies):
                    fut.set_result(rep)
            except Exception as e:  # the model failed on this batch: every request in it gets the error
                for _, _, fut in items:
                    fut.set_exception(e)
            if stop:
                return


# ---------------------------------------------------------------- HTTP


class _Gate:
    """At most `slots` requests inside, at most `queue` waiting to enter; the rest are refused."""

    def __init__(self, slots: int, queue_len: int):
        self.slots, self.queue_len, self.waiting, self.inside = slots, queue_len, 0, 0
        self._sem: asyncio.Semaphore | None = None  # made on the server's loop

    async def __aenter__(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        if self._sem.locked() and self.waiting >= self.queue_len:
            raise RequestError(f"server busy: {self.inside} requests running and {self.waiting} queued "
                               f"(--max-queue {self.queue_len}); retry later", 429, "server_busy")
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.inside += 1

    async def __aexit__(self, *exc) -> None:
        self.inside -= 1
        self._sem.release()


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


async def _read_body(request: Request, limits: ServerLimits) -> bytes:
    """The body, refused (413) as soon as it passes the limit and (408) when it takes too long."""
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(f"request body over this server's limit of {limits.max_body_bytes:,} bytes "
                                   "(--max-body-mb): send smaller or fewer images", 413)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.read_timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body took longer than {limits.read_timeout:g} s to arrive "
                           "(--read-timeout)", 408) from None
    return b"".join(chunks)


async def _drain(request: Request, limits: ServerLimits) -> None:
    """Read and drop the rest of a refused body, up to 4x the limit and the read timeout: a client
    still sending when the server closes gets a connection reset instead of the 413."""
    async def drain() -> None:
        dropped = 0
        while dropped <= 4 * limits.max_body_bytes:
            message = await request.receive()
            dropped += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drain(), limits.read_timeout)
    except (asyncio.TimeoutError, ClientDisconnect, OSError):
        pass


def build_app(batcher: Batcher, model_name: str, limits: ServerLimits) -> Starlette:
    """The Starlette app: /v1/chat/completions, /v1/models and /health."""
    gate = _Gate(limits.max_concurrency, limits.max_queue)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "running": gate.inside, "queued": gate.waiting})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "lmmscope"}]})

    def parse(raw: bytes) -> tuple[ChatRequest, int]:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not JSON: {e}") from None
        except RecursionError:
            raise RequestError("the body is nested too deeply") from None
        return parse_request(body, limits)

    async def chat(request: Request) -> JSONResponse:
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
                raise RequestError(f"request body of {int(declared):,} bytes is over this server's limit of "
                                   f"{limits.max_body_bytes:,} (--max-body-mb): send smaller or fewer images", 413)
            async with gate:
                raw = await _read_body(request, limits)
                req, top = await run_in_threadpool(parse, raw)
                reply = await asyncio.wrap_future(batcher.submit(req, top))
            return JSONResponse(response(reply, model_name, top))
        except RequestError as e:
            log.warning("%s refused with %d: %s", client, e.status, e)
            headers = {"Retry-After": "1"} if e.status == 429 else None
            if e.status in (413, 429):  # refused before the body was read
                await _drain(request, limits)
            if e.status in (408, 413):  # the unread rest of the body makes the connection unusable
                headers = {"Connection": "close"}
            return _error(e.status, str(e), e.kind, headers)
        except ClientDisconnect:
            log.warning("%s disconnected before sending the whole body", client)
            return _error(400, "client disconnected", "invalid_request_error")
        except Exception as e:  # the model (or this server) failed: a 500, which clients retry
            log.error("%s: server error: %s: %s", client, type(e).__name__, e)
            return _error(500, f"{type(e).__name__}: {e}", "server_error")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        hint = "; use POST /v1/chat/completions, GET /v1/models or GET /health"
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}{hint}",
                      "invalid_request_error")

    routes = [Route(p, health, methods=["GET"]) for p in ("/health", "/v1/health")]
    routes += [Route("/v1/models", models, methods=["GET"]), Route("/v1/chat/completions", chat, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.gate = gate
    return app


def _protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for the request head, which uvicorn lacks: without
    it a client that opens connections and sends headers slowly holds them for ever."""

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(head_timeout, self._head_deadline)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_timer.cancel()  # the next request on this connection gets its own deadline
            self._head_timer = self.loop.call_later(head_timeout, self._head_deadline)

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_deadline(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), with a long accept queue so bursts wait, not fail."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)


class ExplainerServer:
    """The HTTP server. The socket is bound here (port 0 picks a free one); `start()` serves on a
    background thread (tests, notebooks), `serve()` blocks."""

    def __init__(self, backend: HFBackend, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits | None = None, sock: socket.socket | None = None):
        self.model_name, self.limits = model_name, limits or ServerLimits()
        self.batcher = Batcher(backend, max_batch=self.limits.max_concurrency)
        self.app = build_app(self.batcher, model_name, self.limits)
        self.sock = sock or listen(host, port)
        config = uvicorn.Config(self.app, http=_protocol(self.limits.read_timeout), lifespan="off",
                                log_level="warning", access_log=False, server_header=False,
                                limit_concurrency=self.limits.max_concurrency + self.limits.max_queue + 64,
                                timeout_keep_alive=5, timeout_graceful_shutdown=10)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def start(self, timeout: float = 30.0) -> ExplainerServer:
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="explainer-server")
        self._thread.start()
        deadline = time.time() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the explainer server did not start")
            time.sleep(0.01)
        return self

    def serve(self) -> None:
        self._uvicorn.run(sockets=[self.sock])

    def close(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.batcher.close()
        self.sock.close()


def register(sub: argparse._SubParsersAction) -> None:
    d = ServerLimits()
    p = sub.add_parser("serve-explainer", help="serve a local VLM (e.g. shapes-explainer) as an OpenAI-compatible API",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="shapes-explainer", help="organism name, model directory or hub id")
    p.add_argument("--served-name", default=None, help="model name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                   help="requests decoded and on the model at once (also the largest batch)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting for a slot; more get HTTP 429")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MiB, help="largest request body (413)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest image, width x height")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="all images of one request together")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images in one request")
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds a client has to send the request head, and again the body (408)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import warnings

    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * MiB), max_image_pixels=args.max_image_pixels,
                          max_request_pixels=args.max_request_pixels, max_images=args.max_images,
                          max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          read_timeout=args.read_timeout)  # ValueError: one line and exit code 2 from interp.cli
    try:
        sock = listen(args.host, args.port)  # before loading the model, so a busy port fails fast
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): pick another --port "
                         "or --host") from None
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # such images are refused here, earlier
    backend = HFBackend(args.model, device=args.device, dtype=args.dtype, batch_size=limits.max_concurrency)
    server = ExplainerServer(backend, args.served_name or args.model, limits=limits, sock=sock)
    print(f"serving {args.model} at {server.url} (POST /chat/completions, GET /models, GET /health); Ctrl-C stops",
          flush=True)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.sock.close()
    return 0
