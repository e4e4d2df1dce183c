"""How explainers reach a model: a local Hugging Face model, or an OpenAI-compatible chat endpoint.

Both take the same single-turn requests (text and images in order) and return text, token
counts and, where the model exposes it, the probability that the answer is "yes" (what a judge
needs for AUROC). Protocols (what to ask) live in explain.explainers; this module only moves
requests and replies.

The HTTP backend is for vLLM, SGLang, `transformers serve`, `interp serve-explainer` or OpenAI:
images go as base64 PNG data URLs in `image_url` content parts; requests run on a thread pool
under a concurrency limit, with a timeout and retries with exponential backoff on connection
errors, timeouts, 408/429/5xx and unreadable bodies; every successful reply is appended to a
JSONL response cache keyed by a hash of the request, so a re-run never asks twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from explain.prompts import yes_no

Part = str | Image.Image  # a text or an image, in the order the model should read them
YES_WORDS, NO_WORDS = ("yes", "Yes", "YES"), ("no", "No", "NO")


@dataclass
class ChatRequest:
    parts: list[Part]
    max_tokens: int = 32
    system: str | None = None
    yes_no: bool = False  # also return P(yes) when the backend can

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]


@dataclass
class Reply:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    p_yes: float | None = None  # P(yes) / (P(yes) + P(no)) of the first answer token, when known
    logprobs: list[tuple[str, float]] | None = None  # top tokens of the first answer token, when asked
    cached: bool = False


class BackendError(RuntimeError):
    """A model call that failed for good (after retries): recorded per feature and retried on the next run."""


class Backend(Protocol):
    name: str  # identifies the model (recorded with every explanation)

    def complete(self, requests: list[ChatRequest]) -> list[Reply]: ...


def p_yes_from_logprobs(logprobs: dict[str, float]) -> float | None:
    """P(yes) among the yes/no variants of a first-token distribution ({token: logprob})."""
    yes = sum(math.exp(v) for k, v in logprobs.items() if k.strip() in YES_WORDS)
    no = sum(math.exp(v) for k, v in logprobs.items() if k.strip() in NO_WORDS)
    return yes / (yes + no) if yes + no > 0 else None


# ---------------------------------------------------------------- local Hugging Face model


def yes_no_token_ids(tokenizer) -> dict[str, int]:
    """{variant: token id} of the yes/no words that are one token each (with and without a leading
    space), for reading P(yes) off the first answer token."""
    out, seen = {}, set()
    for word in (*YES_WORDS, *NO_WORDS):
        for variant in (word, " " + word):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if len(ids) == 1 and ids[0] != tokenizer.unk_token_id and ids[0] not in seen:
                seen.add(ids[0])
                out[variant] = ids[0]
    return out


class HFBackend:
    """A local image-text-to-text model (a shipped organism, a save_pretrained directory or a hub id),
    queried through its processor's chat template and `generate`, batched with left padding."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", batch_size: int = 32):
        from interp.model.models import load_model

        self.loaded = load_model(model, device=device, dtype=dtype)
        if not self.loaded.is_multimodal:
            raise ValueError(f"explainer {model!r} is a {self.loaded.kind} model: an explainer must read images "
                             "(an image-text-to-text model)")
        self.name, self.batch_size = model, batch_size
        self.processor, self.model = self.loaded.processor, self.loaded.model
        self._yes_no_ids = yes_no_token_ids(self.processor.tokenizer)
        self._lock = threading.Lock()  # one generate at a time (the server is threaded)

    def _prompt(self, req: ChatRequest) -> str:
        content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in req.parts]
        messages = [{"role": "user", "content": content}]
        if req.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": req.system}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def complete(self, requests: list[ChatRequest], top_logprobs: int = 0) -> list[Reply]:
        """Replies in order; with `top_logprobs`, each reply's `logprobs` (first answer token) is set too."""
        out: list[Reply] = []
        with self._lock:
            for s in range(0, len(requests), self.batch_size):
                out += self._batch(requests[s: s + self.batch_size], top_logprobs)
        return out

    def _batch(self, batch: list[ChatRequest], top_logprobs: int) -> list[Reply]:
        per_request = [[im.convert("RGB") for im in r.images] for r in batch]
        if all(per_request):  # nested, one list per prompt: what every processor accepts (Gemma3 requires it)
            images = per_request
        else:
            images = [im for ims in per_request for im in ims] or None
        inputs = self.processor(images=images, text=[self._prompt(r) for r in batch], return_tensors="pt",
                                padding=True)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        n_in = inputs["attention_mask"].sum(1).tolist()
        # min_new_tokens: an answer of nothing (end of sequence first) is no answer; the OpenAI client
        # rejects empty content, so a model off its training distribution gives its best non-empty one
        gen = self.model.generate(**inputs, max_new_tokens=max(r.max_tokens for r in batch), min_new_tokens=1,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[:, inputs["input_ids"].shape[1]:]
        first = torch.log_softmax(gen.logits[0].float(), dim=-1)  # [batch, vocab]: the first answer token, raw
        tok = self.processor.tokenizer
        replies = []
        for i, r in enumerate(batch):
            ids = new[i, : r.max_tokens].tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id) + 1]
            ids = [t for t in ids if t != tok.pad_token_id]
            reply = Reply(tok.decode(ids, skip_special_tokens=True).strip(), int(n_in[i]), len(ids))
            if r.yes_no and self._yes_no_ids:
                reply.p_yes = p_yes_from_logprobs({w: float(first[i, t]) for w, t in self._yes_no_ids.items()})
            if top_logprobs:
                vals, idx = first[i].topk(top_logprobs)
                reply.logprobs = [(tok.decode([int(t)]), float(v)) for v, t in zip(vals, idx)]
            replies.append(reply)
        return replies


# ---------------------------------------------------------------- OpenAI-compatible endpoint


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ResponseCache:
    """Append-only JSONL of {key, reply}: what the server answered to each request hash."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._replies: dict[str, dict] = {}
        self._log = None
        if self.path:
            from interp.infra.records import RecordLog

            self._log = RecordLog(self.path)
            for rec in self._log:
                if isinstance(rec.get("key"), str) and isinstance(rec.get("reply"), dict):
                    self._replies[rec["key"]] = rec["reply"]

    def get(self, key: str) -> Reply | None:
        rec = self._replies.get(key)
        return Reply(**rec, cached=True) if rec is not None else None

    def put(self, key: str, reply: Reply) -> None:
        rec = {k: v for k, v in asdict(reply).items() if k != "cached"}
        with self._lock:
            self._replies[key] = rec
            if self._log is not None:
                self._log.append({"key": key, "reply": rec})


@dataclass
class HTTPConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the served model's name (default: the first of GET /models)
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0  # seconds per request
    retries: int = 3  # extra attempts after the first
    backoff: float = 1.0  # seconds before the first retry, doubled each time (with jitter)
    concurrency: int = 4  # requests in flight at once
    logprobs: bool = False  # ask for the first token's top logprobs (vLLM, SGLang, OpenAI; not `transformers serve`)
    temperature: float = 0.0
    cache: str | Path | None = None  # JSONL response cache


class _Retryable(Exception):
    pass


class OpenAIBackend:
    """Chat completions over HTTP (stdlib only: no client library needed)."""

    def __init__(self, cfg: HTTPConfig):
        if not cfg.base_url.startswith(("http://", "https://")):
            raise ValueError(f"explainer URL {cfg.base_url!r} must start with http:// or https://")
        if cfg.concurrency < 1 or cfg.retries < 0 or cfg.timeout <= 0:
            raise ValueError("need concurrency >= 1, retries >= 0 and timeout > 0")
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.cache = ResponseCache(cfg.cache)
        self._model = cfg.model
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="explainer-http")

    @property
    def model(self) -> str:
        if self._model is None:
            try:
                data = self._call("GET", "/models", None)
                self._model = data["data"][0]["id"]
            except (BackendError, KeyError, IndexError, TypeError) as e:
                raise BackendError(f"cannot list the models served at {self.base} ({e}): pass the model name "
                                   "with --api-model") from None
        return self._model

    @property
    def name(self) -> str:
        return f"{self.base}#{self.cfg.model or ''}"

    def body(self, req: ChatRequest) -> dict:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(p)}} if isinstance(p, Image.Image)
                   else {"type": "text", "text": p} for p in req.parts]
        messages = [{"role": "user", "content": content}]
        if req.system:
            messages.insert(0, {"role": "system", "content": req.system})
        body = {"model": self.model, "messages": messages, "max_tokens": req.max_tokens,
                "temperature": self.cfg.temperature}
        if req.yes_no and self.cfg.logprobs:
            body.update(logprobs=True, top_logprobs=5)
        return body

    def complete(self, requests: list[ChatRequest]) -> list[Reply]:
        """Replies in order. All requests are attempted (successes are cached) before the first
        failure is raised, so a retry later only asks the ones that failed."""
        futures = [self._pool.submit(self._one, r) for r in requests]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except BackendError as e:
                errors.append(e)
        if errors:
            more = f" (and {len(errors) - 1} more failed requests)" if len(errors) > 1 else ""
            raise BackendError(f"{errors[0]}{more}")
        return results

    def _one(self, req: ChatRequest) -> Reply:
        body = self.body(req)
        key = hashlib.sha256(json.dumps([self.base, body], sort_keys=True).encode()).hexdigest()
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        reply = self._parse(self._call("POST", "/chat/completions", body), req)
        self.cache.put(key, reply)
        return reply

    def _parse(self, data: dict, req: ChatRequest) -> Reply:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"garbage answer from {self.base}: no choices[0].message.content in "
                               f"{json.dumps(data)[:200]}") from None
        if not isinstance(text, str) or not text.strip():
            raise BackendError(f"garbage answer from {self.base}: empty message content {text!r}")
        usage = data.get("usage") or {}
        reply = Reply(text.strip(), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        if req.yes_no:
            top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
            reply.p_yes = p_yes_from_logprobs({t["token"]: t["logprob"] for t in top if "token" in t})
            if reply.p_yes is None and yes_no(text) is not None:
                reply.p_yes = 1.0 if yes_no(text) else 0.0
        return reply

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        url = self.base + path
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            try:
                return self._http(method, url, body)
            except _Retryable as e:
                last = str(e)
        raise BackendError(f"{last} (after {self.cfg.retries + 1} attempts); failed features are retried "
                           "on the next run")

    def _http(self, method: str, url: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        key = self.cfg.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code in (408, 429) or e.code >= 500:
                raise _Retryable(f"explainer server {url} answered HTTP {e.code}: {detail}") from None
            raise BackendError(f"explainer server {url} refused the request with HTTP {e.code}: {detail}") from None
        except (socket.timeout, TimeoutError):
            raise _Retryable(f"explainer server {url} timed out after {self.cfg.timeout:g} s: raise --timeout "
                             "or check the server's load") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"explainer server {url} timed out after {self.cfg.timeout:g} s: raise --timeout "
                                 "or check the server's load") from None
            raise _Retryable(f"cannot reach the explainer server at {url} ({reason}): start it (e.g. "
                             "`interp serve-explainer --model shapes-explainer`) or fix --explainer") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"garbage answer from {url}: not JSON: {raw[:120]!r}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def api_key_from_env(var: str | None) -> str | None:
    """The API key from an environment variable (never from the command line, so it stays out of logs)."""
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise ValueError(f"environment variable {var} is not set: export the API key there, or drop --api-key-env")
    return key
