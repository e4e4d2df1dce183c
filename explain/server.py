"""`interp serve-explainer`: a local image-text-to-text model behind the OpenAI chat-completions API.

    interp serve-explainer --model shapes-explainer --port 8000
    interp explain RUN --explainer http://127.0.0.1:8000/v1 --api-model shapes-explainer

For machines where vLLM, SGLang or `transformers serve` are not installed (it needs only the
standard library): one process holds the model, any number of `interp explain` runs share it.
Concurrent requests are batched (they arrive within a few milliseconds of each other when an
explainer asks one question per example). Images come as base64 data URLs in `image_url`
parts; `logprobs`/`top_logprobs` return the first answer token's distribution, which judges
use for confidence. Single-turn requests (optional system message + one user message) only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from explain.backends import ChatRequest, HFBackend, Reply

MAX_TOKENS = 512


class RequestError(ValueError):
    """A request this server cannot answer (HTTP 400)."""


def parse_request(body: dict) -> tuple[ChatRequest, int]:
    """(the request, top_logprobs) from a chat-completions body."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise RequestError("the body needs a non-empty 'messages' list")
    if body.get("stream"):
        raise RequestError("streaming is not supported: drop 'stream'")
    system, parts, users = None, [], 0
    for m in body["messages"]:
        role, content = m.get("role"), m.get("content")
        if role == "system":
            system = content if isinstance(content, str) else " ".join(c.get("text", "") for c in content or [])
        elif role == "user":
            users += 1
            parts = _parts(content)
        else:
            raise RequestError(f"only single-turn requests (system + user) are supported, got a {role!r} message")
    if users != 1:
        raise RequestError(f"need exactly one user message, got {users}")
    n = body.get("max_completion_tokens") or body.get("max_tokens") or 32
    if not isinstance(n, int) or not 1 <= n <= MAX_TOKENS:
        raise RequestError(f"max_tokens must be an integer in 1..{MAX_TOKENS}, got {n!r}")
    top = int(body.get("top_logprobs") or (1 if body.get("logprobs") else 0)) if body.get("logprobs") else 0
    return ChatRequest(parts, max_tokens=n, system=system), min(max(top, 0), 20)


def _parts(content) -> list:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise RequestError("message content must be a string or a list of parts")
    out = []
    for c in content:
        kind = c.get("type") if isinstance(c, dict) else None
        if kind == "text":
            out.append(str(c.get("text", "")))
        elif kind == "image_url":
            ref = c.get("image_url")
            out.append(_image(str(ref.get("url", "") if isinstance(ref, dict) else ref)))
        else:
            raise RequestError(f"unsupported content part {kind!r} (text and image_url only)")
    return out


def _image(url: str) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise RequestError("images must be base64 data URLs (data:image/png;base64,...): this server fetches nothing")
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))) as im:
            return im.convert("RGB")
    except Exception as e:  # any decoder error means the same: not an image
        raise RequestError(f"cannot decode the image: {type(e).__name__}: {e}") from None


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


class Batcher:
    """Runs requests that arrive together as one batch on the model (one thread owns the model)."""

    def __init__(self, backend: HFBackend, max_batch: int = 32, wait_s: float = 0.005):
        self.backend, self.max_batch, self.wait_s = backend, max_batch, wait_s
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="explainer-batcher").start()

    def submit(self, req: ChatRequest, top: int) -> Future:
        fut: Future = Future()
        self._q.put((req, top, fut))
        return fut

    def _run(self) -> None:
        while True:
            items = [self._q.get()]
            deadline = time.time() + self.wait_s
            while len(items) < self.max_batch:
                try:
                    items.append(self._q.get(timeout=max(0.0, deadline - time.time())))
                except queue.Empty:
                    break
            try:
                replies = self.backend.complete([r for r, _, _ in items], top_logprobs=max(t for _, t, _ in items))
                for (_, _, fut), rep in zip(items, replies):
                    fut.set_result(rep)
            except Exception as e:  # the model failed on this batch: every request in it gets the error
                for _, _, fut in items:
                    fut.set_exception(e)


class ExplainerServer:
    """The HTTP server; `start()` serves on a background thread (tests, notebooks), `serve()` blocks."""

    def __init__(self, backend: HFBackend, model_name: str, host: str = "127.0.0.1", port: int = 8000):
        self.model_name, self.batcher = model_name, Batcher(backend)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: one line per request would drown the progress bars
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") in ("/health", "/v1/health"):
                    self._send(200, {"status": "ok"})
                elif self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                                  "owned_by": "lmmscope"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}; use /v1/chat/completions"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                    req, top = parse_request(body)
                except (RequestError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                    return
                try:
                    reply = server.batcher.submit(req, top).result()
                except Exception as e:  # the model failed: a server error the client may retry
                    self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
                    return
                self._send(200, response(reply, server.model_name, top))

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ExplainerServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="explainer-server").start()
        return self

    def serve(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-explainer", help="serve a local VLM (e.g. shapes-explainer) as an OpenAI-compatible API",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="shapes-explainer", help="organism name, model directory or hub id")
    p.add_argument("--served-name", default=None, help="model name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    server = ExplainerServer(HFBackend(args.model, device=args.device, dtype=args.dtype),
                             args.served_name or args.model, args.host, args.port)
    print(f"serving {args.model} at {server.url} (POST /chat/completions, GET /models, GET /health); Ctrl-C stops",
          flush=True)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
