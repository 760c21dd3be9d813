#!/usr/bin/env python3
"""Bad requests to the coordinator's OpenAI-compatible HTTP API (stdlib only: http.client and
raw sockets): each gets its status and an OpenAI-shaped error body
{"error": {"message", "type", "param", "code"}}, and the server goes on serving (a good request
after each succeeds). Then many idle TCP connections at once (10000, or what the hard
RLIMIT_NOFILE allows): a request still completes within seconds while they are open, the
server's RSS stays bounded, and it serves again once they are closed. Also 429 with the queue
full (--max-running 1 --max-waiting 1) and 503 (and /health 503) once an expert worker of a
2-worker cluster is killed.

    build/venv-evals/bin/python tests/evals/http_bad_requests_test.py --bin-dir build/bin
(any Python 3.11 works: nothing outside the standard library.)
"""
import concurrent.futures
import errno
import json
import pathlib
import resource
import select
import signal
import socket
import threading
import sys
import time
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import evalutil  # noqa: E402
from evalutil import MODEL_NAME, request  # noqa: E402

IDLE_CONNECTIONS = 10000
RSS_BOUND_BYTES = 500 << 20   # growth allowed while the idle connections are open
REQUEST_DEADLINE_S = 5.0      # a normal request while they are open
BIG_BODY_BYTES = 16 << 20     # over the default --http-max-body-bytes (8 MiB)
OK_BIG_BODY_BYTES = 4 << 20   # under it: read and parsed (then refused: too long a prompt)

GOOD = {"model": MODEL_NAME, "prompt": "Four score", "max_tokens": 1, "temperature": 0}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}


def with_(base, **changes):
    body = dict(base)
    body.update(changes)
    return json.dumps(body).encode()


def without(base, key):
    return json.dumps({k: v for k, v in base.items() if k != key}).encode()


C, CC = "/v1/completions", "/v1/chat/completions"
# (name, method, path, raw body or None, expected status, param the error must name or None)
CASES = [
    ("malformed JSON", "POST", C, b'{"model": "demo_mixtral", "prompt": ', 400, None),
    ("JSON not an object", "POST", C, b'[1, 2, 3]', 400, None),
    ("empty body", "POST", C, b'', 400, None),
    ("trailing garbage", "POST", C, json.dumps(GOOD).encode() + b' x', 400, None),
    ("max_tokens a string", "POST", C, with_(GOOD, max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens negative", "POST", C, with_(GOOD, max_tokens=-1), 400, "max_tokens"),
    ("max_tokens 10**9", "POST", C, with_(GOOD, max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens 0 without echo", "POST", C, with_(GOOD, max_tokens=0), 400, "max_tokens"),
    ("max_tokens fractional", "POST", C, with_(GOOD, max_tokens=2.5), 400, "max_tokens"),
    ("prompt a number", "POST", C, with_(GOOD, prompt=5), 400, "prompt"),
    ("prompt missing", "POST", C, without(GOOD, "prompt"), 400, "prompt"),
    ("prompt empty list", "POST", C, with_(GOOD, prompt=[]), 400, "prompt"),
    ("prompt mixed list", "POST", C, with_(GOOD, prompt=["a", 5]), 400, "prompt"),
    ("prompt token id out of vocabulary", "POST", C, with_(GOOD, prompt=[5, 999999]), 400,
     "prompt"),
    ("prompt negative token id", "POST", C, with_(GOOD, prompt=[5, -3]), 400, "prompt"),
    ("prompt longer than max_model_len", "POST", C, with_(GOOD, prompt=[300] * 600), 400, None),
    ("prompt + max_tokens over max_model_len", "POST", C,
     with_(GOOD, prompt=[300] * 500, max_tokens=100), 400, None),
    ("temperature negative", "POST", C, with_(GOOD, temperature=-1), 400, "temperature"),
    ("temperature a string", "POST", C, with_(GOOD, temperature="hot"), 400, "temperature"),
    ("top_p over 1", "POST", C, with_(GOOD, top_p=2), 400, "top_p"),
    ("top_k a string", "POST", C, with_(GOOD, top_k="x"), 400, "top_k"),
    ("seed a string", "POST", C, with_(GOOD, seed="abc"), 400, "seed"),
    ("stop a number", "POST", C, with_(GOOD, stop=5), 400, "stop"),
    ("n 0", "POST", C, with_(GOOD, n=0), 400, "n"),
    ("n 100000", "POST", C, with_(GOOD, n=100000), 400, "n"),
    ("logprobs 1000", "POST", C, with_(GOOD, logprobs=1000), 400, "logprobs"),
    ("logprobs 21", "POST", C, with_(GOOD, logprobs=21), 400, "logprobs"),
    ("echo a string", "POST", C, with_(GOOD, echo="yes"), 400, "echo"),
    ("stream a number", "POST", C, with_(GOOD, stream=3), 400, "stream"),
    ("unknown field", "POST", C, with_(GOOD, frobnicate=1), 400, "frobnicate"),
    ("model a number", "POST", C, with_(GOOD, model=7), 400, "model"),
    ("unknown model", "POST", C, with_(GOOD, model="gpt-17"), 404, None),
    ("invalid UTF-8 in a string", "POST", C,
     b'{"model": "demo_mixtral", "prompt": "ab\xff\xfecd", "max_tokens": 1}', 400, None),
    ("lone surrogate escape", "POST", C,
     b'{"model": "demo_mixtral", "prompt": "ab\\ud800cd", "max_tokens": 1}', 400, None),
    ("deeply nested JSON", "POST", C,
     b'{"model": "demo_mixtral", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400, None),
    ("deeply nested, unterminated", "POST", C, b"[" * 100000, 400, None),
    ("messages not a list", "POST", CC, with_(CHAT, messages="hi"), 400, "messages"),
    ("messages empty", "POST", CC, with_(CHAT, messages=[]), 400, "messages"),
    ("message without role", "POST", CC, with_(CHAT, messages=[{"content": "hi"}]), 400,
     "messages"),
    ("message content a number", "POST", CC,
     with_(CHAT, messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("chat top_logprobs 100", "POST", CC, with_(CHAT, logprobs=True, top_logprobs=100), 400,
     "top_logprobs"),
    ("chat logprobs a number", "POST", CC, with_(CHAT, logprobs=5), 400, "logprobs"),
    ("chat unknown field", "POST", CC, with_(CHAT, prompt="x"), 400, "prompt"),
    ("chat unknown model", "POST", CC, with_(CHAT, model="gpt-17"), 404, None),
    ("tokenize prompt a number", "POST", "/tokenize", b'{"prompt": 5}', 400, "prompt"),
    ("detokenize id out of vocabulary", "POST", "/detokenize", b'{"tokens": [5, 1000000]}',
     400, "tokens"),
    ("detokenize tokens not a list", "POST", "/detokenize", b'{"tokens": "abc"}', 400, "tokens"),
    ("GET on completions", "GET", C, None, (404, 405), None),
    ("DELETE on chat completions", "DELETE", CC, None, (404, 405), None),
    ("POST on models", "POST", "/v1/models", b"{}", (404, 405), None),
    ("unknown path", "POST", "/v1/nothing", b"{}", 404, None),
    ("unknown path GET", "GET", "/nothing/at/all", None, 404, None),
    ("completions with a query string to nowhere", "GET", "/v2/completions?x=1", None, 404, None),
]


class BadRequestsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cluster = evalutil.Cluster(workers=0).start()
        cls.http = cls.cluster.http

    @classmethod
    def tearDownClass(cls):
        codes = cls.cluster.stop()
        log = cls.cluster.logs()
        cls.cluster.cleanup()
        assert codes == [0], f"coordinator exit codes {codes}\n{log}"

    def assert_error_shape(self, body, what):
        self.assertIsInstance(body, dict, f"{what}: error body is not JSON: {body!r}")
        self.assertEqual(list(body), ["error"], f"{what}: {body}")
        err = body["error"]
        self.assertIsInstance(err, dict, f"{what}: {body}")
        for key in ("message", "type", "param", "code"):
            self.assertIn(key, err, f"{what}: error has no {key!r}: {body}")
        self.assertIsInstance(err["message"], str, what)
        self.assertTrue(err["message"], what)
        self.assertIsInstance(err["type"], str, what)
        self.assertTrue(err["param"] is None or isinstance(err["param"], str), what)
        return err

    def assert_serving(self, what):
        status, _, body = request(self.http, "POST", C, GOOD, timeout=30)
        self.assertEqual(status, 200, f"after {what}: a good request got {status} {body}")
        self.assertEqual(body["usage"]["completion_tokens"], 1, f"after {what}")

    def test_bad_requests(self):
        self.assert_serving("start")
        for name, method, path, raw, want, param in CASES:
            with self.subTest(name):
                status, headers, body = request(self.http, method, path, raw=raw, timeout=30)
                wanted = want if isinstance(want, tuple) else (want,)
                if status not in wanted:
                    self.fail(f"{name}: {method} {path} {(raw or b'')[:80]!r} -> expected "
                              f"{want}, got {status} {str(body)[:300]}")
                self.assertIn("application/json", headers.get("content-type", ""), name)
                err = self.assert_error_shape(body, name)
                if param is not None:
                    self.assertEqual(err["param"], param, f"{name}: error.param does not name "
                                                          f"{param!r}: {err}")
                self.assert_serving(name)

    def test_error_codes_of_shape(self):
        # 404 of an unknown model names the model; a 400 is an invalid_request_error.
        status, _, body = request(self.http, "POST", C, raw=with_(GOOD, model="gpt-17"))
        self.assertEqual(status, 404)
        self.assertIn("gpt-17", body["error"]["message"])
        status, _, body = request(self.http, "POST", C, raw=with_(GOOD, temperature=-1))
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["type"], "invalid_request_error", body)

    def _raw_exchange(self, head, body_len, body_byte=b" ", timeout=30):
        """Sends `head` then body_len bytes of body in 1 MiB chunks while watching for an early
        response; returns the response bytes read until the server closes (or timeout)."""
        host, port = self.http.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=timeout)
        got = b""
        try:
            sock.sendall(head)
            sent, chunk = 0, body_byte * (1 << 20)
            while sent < body_len:
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if poller.poll(0):
                    break  # the server answered before the whole body: stop sending
                try:
                    n = min(len(chunk), body_len - sent)
                    sock.sendall(chunk[:n])
                    sent += n
                except (BrokenPipeError, ConnectionResetError):
                    break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                except socket.timeout:
                    break
                if not data:
                    break
                got += data
                if b"\r\n\r\n" in got:
                    head_end = got.index(b"\r\n\r\n") + 4
                    length = [int(line.split(b":")[1]) for line in got[:head_end].split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(got) >= head_end + length[0]:
                        break
        finally:
            sock.close()
        return got

    def test_body_too_large(self):
        head = (f"POST {C} HTTP/1.1\r\nHost: {self.http}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {BIG_BODY_BYTES}\r\n\r\n").encode()
        got = self._raw_exchange(head, BIG_BODY_BYTES)
        self.assertTrue(got.startswith(b"HTTP/1.1 413"), f"expected 413, got {got[:300]!r}")
        body = json.loads(got.split(b"\r\n\r\n", 1)[1])
        self.assert_error_shape(body, "413")
        self.assert_serving("413")

    def test_body_under_limit_is_read(self):
        # A 4 MiB body (under the limit) is read and parsed: the prompt is then far too long
        # (400), not too big to read (413).
        prompt = "a " * (OK_BIG_BODY_BYTES // 2)
        status, _, body = request(self.http, "POST", C, raw=with_(GOOD, prompt=prompt),
                                  timeout=120)
        self.assertEqual(status, 400, str(body)[:300])
        self.assert_error_shape(body, "4 MiB prompt")
        self.assert_serving("4 MiB prompt")

    def test_many_idle_connections(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        count = IDLE_CONNECTIONS if soft == resource.RLIM_INFINITY else min(IDLE_CONNECTIONS,
                                                                             soft - 200)
        self.assertGreater(count, 500, f"RLIMIT_NOFILE {soft}/{hard} leaves too few descriptors")
        print(f"idle connections: {count} (RLIMIT_NOFILE soft {soft}, hard {hard})",
              file=sys.stderr)
        self.assert_serving("warm-up")
        rss_before = self.rss()
        host, port = self.http.rsplit(":", 1)
        socks, pending = [], []
        start = time.monotonic()
        try:
            for i in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                rc = s.connect_ex((host, int(port)))
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    self.fail(f"connection {i}: connect error {errno.errorcode.get(rc, rc)}")
                socks.append(s)
                pending.append(s)
                if len(pending) >= 256:
                    self.finish_connects(pending)
            self.finish_connects(pending)
            # One in ten has sent half a request line and stalls there.
            for s in socks[::10]:
                s.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            opened = time.monotonic() - start
            # Let the server see them all (accept queue, readers).
            time.sleep(1.0)
            t0 = time.monotonic()
            status, _, body = request(self.http, "POST", C, GOOD, timeout=30)
            took = time.monotonic() - t0
            self.assertEqual(status, 200, body)
            self.assertLess(took, REQUEST_DEADLINE_S,
                            f"a request took {took:.1f} s with {count} idle connections open")
            rss_open = self.rss()
            print(f"opened {count} connections in {opened:.1f} s; a request took {took:.3f} s; "
                  f"coordinator RSS {rss_before >> 20} MiB before, {rss_open >> 20} MiB with "
                  f"them open", file=sys.stderr)
            self.assertLess(rss_open - rss_before, RSS_BOUND_BYTES,
                            f"RSS grew {(rss_open - rss_before) >> 20} MiB")
            # Are they still open (not closed by the server)? Informational.
            closed = sum(1 for s in socks[1::10] if self.peer_closed(s))
            print(f"{closed} of {len(socks[1::10])} sampled idle connections were closed by the "
                  f"server", file=sys.stderr)
        finally:
            for s in socks:
                s.close()
        time.sleep(1.0)
        t0 = time.monotonic()
        self.assert_serving("closing the idle connections")
        took = time.monotonic() - t0
        self.assertLess(took, REQUEST_DEADLINE_S)
        rss_after = self.rss()
        print(f"after closing them: a request took {took:.3f} s, RSS {rss_after >> 20} MiB",
              file=sys.stderr)
        self.assertLess(rss_after - rss_before, RSS_BOUND_BYTES)
        self.assertIsNone(self.cluster.coordinator.proc.poll(), "coordinator died")

    def finish_connects(self, pending, timeout=30):
        """Waits (poll: descriptors beyond FD_SETSIZE) until every connect in `pending` is done;
        empties the list."""
        deadline = time.monotonic() + timeout
        by_fd = {s.fileno(): s for s in pending}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLOUT)
        while by_fd:
            left = deadline - time.monotonic()
            self.assertGreater(left, 0, f"{len(by_fd)} connects did not complete in {timeout} s")
            for fd, _ in poller.poll(int(min(left, 1.0) * 1000)):
                s = by_fd.pop(fd)
                poller.unregister(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self.assertEqual(err, 0, f"connect failed: {errno.errorcode.get(err, err)}")
        pending.clear()

    @staticmethod
    def peer_closed(s):
        try:
            return s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def rss(self):
        for line in pathlib.Path(f"/proc/{self.cluster.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        self.fail("no VmRSS")


class OverloadAndFailureTest(unittest.TestCase):
    """429 when the queue is full, 503 once an expert worker is gone (own coordinators)."""

    def assert_error(self, status, body, want, what):
        self.assertEqual(status, want, f"{what}: {body}")
        self.assertIsInstance(body, dict, what)
        err = body.get("error")
        self.assertIsInstance(err, dict, f"{what}: {body}")
        for key in ("message", "type", "param", "code"):
            self.assertIn(key, err, f"{what}: {body}")

    def test_queue_full_is_429(self):
        # One running, one waiting: of 16 long requests sent at once most are refused.
        with evalutil.Cluster(workers=0, extra_args=["--max-running", "1",
                                                     "--max-waiting", "1"]) as cluster:
            barrier = threading.Barrier(16)

            def one(i):
                barrier.wait()
                return request(cluster.http, "POST", C, dict(GOOD, max_tokens=400, temperature=1,
                                                             seed=i), timeout=120)
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = list(pool.map(one, range(16)))
            statuses = [status for status, _, _ in results]
            self.assertIn(200, statuses, statuses)
            self.assertIn(429, statuses, statuses)
            self.assertEqual(set(statuses), {200, 429}, statuses)
            for status, _, body in results:
                if status == 429:
                    self.assert_error(status, body, 429, "queue full")
            status, _, body = request(cluster.http, "POST", C, GOOD)
            self.assertEqual(status, 200, f"after the 429s: {body}")

    def test_worker_down_is_503(self):
        with evalutil.Cluster(workers=2) as cluster:
            status, _, _ = request(cluster.http, "GET", "/health")
            self.assertEqual(status, 200)
            status, _, body = request(cluster.http, "POST", C, GOOD)
            self.assertEqual(status, 200, body)
            worker = cluster.processes[1]
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait()
            status, _, body = request(cluster.http, "POST", C, GOOD, timeout=60)
            self.assert_error(status, body, 503, "completion with a worker down")
            status, _, body = request(cluster.http, "POST", CC, CHAT, timeout=60)
            self.assert_error(status, body, 503, "chat completion with a worker down")
            status, _, body = request(cluster.http, "GET", "/health")
            self.assertEqual(status, 503, f"/health with a worker down: {body}")
            # The coordinator itself stays up and answers what needs no expert.
            status, _, body = request(cluster.http, "GET", "/v1/models")
            self.assertEqual(status, 200, body)
            self.assertIsNone(cluster.coordinator.proc.poll(), "coordinator died")


if __name__ == "__main__":
    argv = evalutil.parse_args()
    unittest.main(argv=argv, verbosity=2)
