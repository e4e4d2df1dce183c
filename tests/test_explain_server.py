"""`interp serve-explainer` under load and abuse, against real servers on 127.0.0.1: the command
started as a subprocess (so its memory and log are its own), and ExplainerServer in-process."""

import base64
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from explain.backends import BackendError, ChatRequest, HFBackend, HTTPConfig, OpenAIBackend, png_data_url
from explain.explainers import WorldExplainer
from explain.prompts import REGION_QUESTION
from explain.server import ExplainerServer, ServerLimits
from interp.shapes.world import WorldConfig, sample_scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BODY_MB, READ_TIMEOUT = 1, 1.5  # small, so the tests that pass them stay fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bomb(side: int) -> bytes:
    """A 1-bit all-black PNG of side x side pixels, written row by row: 17.6 KB for 12000 x 12000, which
    decodes to 432 MB as RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def chat_body(*parts, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") else {"type": "text", "text": p}
               for p in parts]
    return {"model": "shapes-explainer", "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def post(base: str, body, timeout: float = 60, headers: dict | None = None) -> tuple[int, dict, float]:
    """(status, JSON reply, seconds) of one POST /chat/completions; connection errors propagate."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t0


def memory_mb(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, MB."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


@pytest.fixture(scope="module")
def local():
    return HFBackend("shapes-explainer", device="cpu")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`interp serve-explainer` in its own process, on the default host; yields (base URL, pid, log path)."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    cmd = [sys.executable, "-m", "interp.cli", "serve-explainer", "--model", "shapes-explainer", "--device", "cpu",
           "--port", str(port), "--max-body-mb", str(MAX_BODY_MB), "--read-timeout", str(READ_TIMEOUT)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        yield base, proc.pid, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def scene_png(i: int) -> str:
    return png_data_url(sample_scene(WorldConfig(), i, "test", 0).render())


def test_64_concurrent_requests_all_succeed_with_the_local_answers(served, local):
    base, pid, _ = served
    bodies = [chat_body(scene_png(i), REGION_QUESTION) for i in range(64)]
    expected = [r.text for r in local.complete([ChatRequest([sample_scene(WorldConfig(), i, "test", 0).render(),
                                                              REGION_QUESTION], max_tokens=8) for i in range(64)])]
    results: list = [None] * 64
    start = threading.Barrier(64)

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = post(base, bodies[i])
        except Exception as e:  # a reset or refused connection: what the old server did to a third of these
            results[i] = (type(e).__name__, {}, 0.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert [r[0] for r in results] == [200] * 64
    assert [r[1]["choices"][0]["message"]["content"] for r in results] == expected
    lat = sorted(r[2] for r in results)
    print(f"64 concurrent: wall {wall:.2f} s, latency p50 {lat[32]:.2f} s, max {lat[-1]:.2f} s, "
          f"server RSS {memory_mb(pid)['VmRSS']:.0f} MB")


def test_a_huge_png_is_refused_fast_without_decoding(served):
    base, pid, _ = served
    bomb = png_bomb(12000)
    assert len(bomb) < 20_000
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter, so VmHWM below is the peak during this request
    before = memory_mb(pid)
    status, reply, seconds = post(base, chat_body(data_url(bomb), REGION_QUESTION))
    after = memory_mb(pid)
    print(f"12000x12000 PNG ({len(bomb)} bytes): HTTP {status} in {seconds * 1000:.1f} ms, RSS {before['VmRSS']:.0f}"
          f" -> {after['VmRSS']:.0f} MB, peak during the request {after['VmHWM']:.0f} MB")
    assert status == 400 and seconds < 1.0
    assert "12000x12000 = 144,000,000 pixels" in reply["error"]["message"]
    assert "--max-image-pixels" in reply["error"]["message"]
    assert after["VmHWM"] - before["VmRSS"] < 64  # decoding would have added 432 MB
    # several images under the per-image limit, too many pixels together: refused before any is decoded
    three = data_url(png_bomb(3000))
    status, reply, seconds = post(base, chat_body(*[three] * 4, REGION_QUESTION))
    assert status == 400 and "--max-request-pixels" in reply["error"]["message"] and seconds < 1.0
    # and the client names the problem (a 4xx is not retried)
    client = OpenAIBackend(HTTPConfig(base, model="shapes-explainer", retries=3, backoff=0.01))
    with pytest.raises(BackendError, match=r"refused the request with HTTP 400.*12000x12000"):
        client._call("POST", "/chat/completions", chat_body(data_url(bomb), REGION_QUESTION))


MALFORMED = [
    (b"{oops", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000, "nested too deeply"),
    (b"[]", "must be a JSON object"),
    ({"messages": [1]}, "messages[0] must be an object"),
    ({"messages": []}, "non-empty 'messages'"),
    ({"messages": "hi"}, "non-empty 'messages'"),
    ({"messages": [{"role": "user", "content": 5}]}, "content must be a string or a list"),
    ({"messages": [{"role": "user", "content": [7]}]}, "unsupported content part"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "needs a string 'text'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None}]}]}, "base64 data URLs"),
    (chat_body("data:image/png;base64,!!!!"), "not valid base64"),
    (chat_body("data:image/png;base64," + base64.b64encode(b"hello").decode()), "not a PNG/JPEG"),
    (chat_body(data_url(base64.b64decode(scene_png(0).split(",")[1])[:300])), "cannot decode the PNG image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "fetches nothing"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "single-turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "exactly one user"),
    ({"messages": [{"role": "system", "content": 3}, {"role": "user", "content": "a"}]}, "system content"),
    (chat_body("hi", max_tokens="8"), "max_tokens must be an integer"),
    (chat_body("hi", max_tokens=True), "max_tokens must be an integer"),
    (chat_body("hi", max_tokens=10_000), "max_tokens must be an integer in 1..512"),
    (chat_body("hi", logprobs="yes"), "logprobs must be true or false"),
    (chat_body("hi", logprobs=True, top_logprobs=99), "top_logprobs must be an integer in 0..20"),
    (chat_body("hi", stream=True), "streaming is not supported"),
]


def test_malformed_bodies_get_400_with_a_message_and_no_traceback(served):
    base, _, log = served
    for body, message in MALFORMED:
        status, reply, _ = post(base, body)
        assert (status, reply["error"]["type"]) == (400, "invalid_request_error"), (body, reply)
        assert message in reply["error"]["message"], (body, reply)
    assert post(base, chat_body(scene_png(0), "hi", logprobs=True, top_logprobs=3))[0] == 200  # still serving
    text = log.read_text()
    assert "Traceback" not in text and "refused with 400: messages[0] must be an object" in text


def test_oversize_bodies_get_413(served):
    base, _, _ = served
    limit = MAX_BODY_MB * 2**20
    big = json.dumps(chat_body("x" * limit)).encode()
    status, reply, seconds = post(base, big)
    assert status == 413 and "over this server's limit of 1,048,576" in reply["error"]["message"]
    # no Content-Length (chunked): counted while reading, refused once past the limit
    host, port = base.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "--max-body-mb" in json.loads(resp.read())["error"]["message"]
    conn.close()
    assert post(base, chat_body("hi"))[0] == 200


def test_slow_clients_are_cut_off_and_do_not_block_others(served):
    base, _, _ = served
    host, port = base.removeprefix("http://").removesuffix("/v1").split(":")
    head_only = socket.create_connection((host, int(port)))
    head_only.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
    slow_body = socket.create_connection((host, int(port)))
    slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"messages\"")
    assert post(base, chat_body("hi"))[0] == 200  # others are served meanwhile
    t0 = time.perf_counter()
    for s in (head_only, slow_body):
        s.settimeout(READ_TIMEOUT + 5)
    assert head_only.recv(1024) == b""  # closed by the server
    reply = b""
    while chunk := slow_body.recv(4096):  # the server answers, then closes
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"--read-timeout" in reply
    assert time.perf_counter() - t0 < READ_TIMEOUT + 2
    head_only.close()
    slow_body.close()


def test_binds_loopback_by_default(served):
    _, _, log = served
    assert f"at {served[0]} " in log.read_text() and served[0].startswith("http://127.0.0.1:")


class Slow:
    """A backend that takes `delay` seconds per batch (and answers a fixed text)."""

    name = "slow"

    def __init__(self, delay: float):
        self.delay, self.batches = delay, []

    def complete(self, requests, top_logprobs: int = 0):
        from explain.backends import Reply

        self.batches.append(len(requests))
        time.sleep(self.delay)
        return [Reply("red circle", 5, 2) for _ in requests]


def test_a_full_queue_answers_429_which_clients_retry():
    slow = Slow(0.8)  # long enough that all four arrive while the first runs
    srv = ExplainerServer(slow, "slow", port=0, limits=ServerLimits(max_concurrency=1, max_queue=1)).start()
    try:
        assert srv.sock.getsockname()[0] == "127.0.0.1"
        statuses: list = []
        start = threading.Barrier(4)

        def one() -> None:
            start.wait()
            statuses.append(post(srv.url, chat_body("hi"))[:2])

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(s for s, _ in statuses)
        assert codes == [200, 200, 429, 429]  # one running, one queued, two refused
        assert all("server busy" in r["error"]["message"] for s, r in statuses if s == 429)
        slow.delay = 0.1
        client = OpenAIBackend(HTTPConfig(srv.url, model="slow", concurrency=4, retries=8, backoff=0.2))
        replies = client.complete([ChatRequest([f"question {i}"]) for i in range(4)])
        assert [r.text for r in replies] == ["red circle"] * 4
    finally:
        srv.close()


def test_bad_flags_and_a_busy_port_are_one_line(capsys):
    import interp.cli

    assert interp.cli.main(["serve-explainer", "--max-queue", "0"]) == 2
    assert "max_queue (--max-queue) must be > 0, got 0" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert interp.cli.main(["serve-explainer", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


class Counting:
    """A backend wrapper that counts the requests the server hands it."""

    def __init__(self, backend):
        self.backend, self.name, self.asked = backend, backend.name, 0

    def complete(self, requests, top_logprobs: int = 0):
        self.asked += len(requests)
        return self.backend.complete(requests, top_logprobs=top_logprobs)


def test_served_explainer_answers_as_the_local_one(local, tmp_path, red_examples):
    srv = ExplainerServer(Counting(local), "shapes-explainer", port=0).start()
    try:
        examples = red_examples()
        here = WorldExplainer(local).explain(examples)
        assert here.text == "a red object"
        cache = tmp_path / "cache.jsonl"

        def http(**kw):
            return OpenAIBackend(HTTPConfig(srv.url, model="shapes-explainer", **kw))

        remote = WorldExplainer(http(cache=cache, logprobs=True))
        there = remote.explain(examples)
        assert (there.text, there.raw, there.tokens_in, there.tokens_out) == (here.text, here.raw, here.tokens_in,
                                                                               here.tokens_out)
        images = [ex.original for ex in examples] + [sample_scene(WorldConfig(), i, "val", 0).render()
                                                    for i in range(4)]
        np.testing.assert_allclose(remote.judge(there, images), WorldExplainer(local).judge(here, images), atol=1e-4)
        # the response cache: a new client with the same cache asks the server nothing
        asked = srv.batcher.backend.asked
        again = WorldExplainer(http(cache=cache, logprobs=True))
        assert again.explain(examples).text == "a red object" and again.judge(there, images)
        assert srv.batcher.backend.asked == asked
        models = json.loads(urllib.request.urlopen(srv.url + "/models").read())
        assert models["data"][0]["id"] == "shapes-explainer"
        with pytest.raises(BackendError, match="HTTP 400.*base64 data URLs"):
            http(retries=0)._call("POST", "/chat/completions", {
                "model": "x", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]})
        with pytest.raises(BackendError, match="HTTP 404.*/v1/nowhere"):
            http(retries=0)._call("GET", "/nowhere", None)
    finally:
        srv.close()
