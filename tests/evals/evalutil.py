"""Shared helpers of the evaluation tests (tests/evals/): the --bin-dir argument, a coordinator
with the OpenAI-compatible HTTP API (in-process experts, or a 2-worker cluster on loopback), and
a plain JSON-over-HTTP client (stdlib http.client, so that what is asserted is the wire format,
not a client library's reading of it)."""
import argparse
import http.client
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pyutil"))
from servers import ServerProcess  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = REPO / "tests" / "testdata" / "models" / "demo_mixtral"
MODEL_NAME = "demo_mixtral"  # the default served name: the basename of --model
CHAT_TEMPLATE = REPO / "tests" / "testdata" / "chat_templates" / "chatml.jinja"
LM_EVAL_DIR = REPO / "tests" / "testdata" / "lm_eval"
REFERENCE = LM_EVAL_DIR / "reference.json"
START_TIMEOUT_S = 120

BIN_DIR = None  # set by parse_args (--bin-dir, else $MOE_BIN_DIR, else build/bin)


def parse_args():
    """Takes --bin-dir DIR off sys.argv; the rest is for unittest."""
    global BIN_DIR
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bin-dir", type=pathlib.Path,
                        default=os.environ.get("MOE_BIN_DIR", REPO / "build" / "bin"))
    args, rest = parser.parse_known_args()
    BIN_DIR = pathlib.Path(args.bin_dir).resolve()
    return [sys.argv[0]] + rest


def load_reference():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


class Cluster:
    """A coordinator serving HTTP on 127.0.0.1 (port 0), with its experts in-process
    (workers=0) or on `workers` expert workers (the 8 experts split evenly), as scripts/demo.sh
    runs them. Use as a context manager; `http` is HOST:PORT of the HTTP API."""

    def __init__(self, workers=0, extra_args=(), name="coordinator"):
        self.workers, self.extra_args, self.name = workers, list(extra_args), name
        self.tmp = tempfile.TemporaryDirectory(prefix="moe-evals-")
        self.processes = []
        self.coordinator = None
        self.http = self.grpc = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()

    def _check_binary(self, name):
        path = BIN_DIR / name
        if not os.access(path, os.X_OK):
            raise AssertionError(f"{path} is not built (pass --bin-dir or set MOE_BIN_DIR)")
        return path

    def start(self):
        # Exact kernels: the log-likelihoods are compared with transformers' to 1e-3, and the
        # fast paths round activations to bf16 where the CPU has AVX512-BF16 (about 1e-2 over a
        # 7-token continuation; their own bounds are tested in kernels_fast_test).
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MOE_KERNELS="exact")
        addresses = []
        if self.workers:
            worker_bin = self._check_binary("moe-expert-worker")
            per = 8 // self.workers
            for i in range(self.workers):
                experts = f"{i * per}-{(i + 1) * per - 1}" if i < self.workers - 1 else f"{i * per}-7"
                w = ServerProcess(f"worker{i}", [worker_bin, "--model", MODEL, "--experts", experts,
                                                 "--listen", "127.0.0.1:0", "--threads", "1"],
                                  self.tmp.name, env=env)
                self.processes.append(w)
                addresses.append(w.wait_ready(START_TIMEOUT_S))
        command = [self._check_binary("moe-coordinator"), "--model", MODEL,
                   "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                   "--chat-template", CHAT_TEMPLATE]
        if addresses:
            command += ["--workers", ",".join(addresses)]
        command += self.extra_args
        self.coordinator = ServerProcess(self.name, command, self.tmp.name, env=env)
        self.processes.append(self.coordinator)
        self.grpc = self.coordinator.wait_ready(START_TIMEOUT_S)
        if "HTTP" not in self.coordinator.announced:
            raise AssertionError(f"the coordinator printed READY but no 'HTTP HOST:PORT' line "
                                 f"before it: {self.coordinator.announced}")
        self.http = self.coordinator.announced["HTTP"]
        return self

    @property
    def pid(self):
        return self.coordinator.proc.pid

    def logs(self, tail=3000):
        return "\n".join(f"--- {p.name} ---\n{p.log.read_text()[-tail:]}" for p in self.processes)

    def stop(self):
        codes = [p.stop() for p in reversed(self.processes)]
        self.processes = []
        return codes

    def cleanup(self):
        self.tmp.cleanup()


def request(address, method, path, body=None, headers=None, timeout=60, raw=None):
    """(status, headers dict (lower-case names), parsed JSON or raw bytes) of one HTTP request on
    a fresh connection. `body` is JSON-encoded; `raw` bytes are sent as they are."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload
        return resp.status, resp_headers, parsed
    finally:
        conn.close()


def post(address, path, body, **kw):
    return request(address, "POST", path, body, **kw)


def tokenize(address, text, add_special_tokens=False):
    status, _, body = post(address, "/tokenize", {"prompt": text,
                                                   "add_special_tokens": add_special_tokens})
    assert status == 200, (status, body)
    return body["tokens"]


def sse_events(address, path, body, timeout=120):
    """The `data:` payloads of a streamed response, in order (strings), and the status."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        content_type = resp.getheader("Content-Type", "")
        text = resp.read().decode("utf-8")
        events = [line[len("data:"):].strip() for line in text.split("\n")
                  if line.startswith("data:")]
        return resp.status, content_type, events, text
    finally:
        conn.close()
