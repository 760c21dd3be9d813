#!/usr/bin/env python3
"""EleutherAI lm-evaluation-harness (the pinned lm-eval, tools/evals/requirements.txt, run as its
CLI `python -m lm_eval`) scoring demo_mixtral through the coordinator's OpenAI-compatible HTTP
API, on the local tasks of tests/testdata/lm_eval/:

- `--model local-completions` (tokenizer_backend=remote: the server's /tokenize, /detokenize,
  /tokenizer_info) on demo_mc (200 loglikelihood requests: prompt token ids, echo, logprobs=1,
  max_tokens=1) and demo_gen (10 greedy generations): every logged loglikelihood must be the
  transformers reference's (tests/testdata/lm_eval/reference.json) within 1e-3, is_greedy and
  acc / acc_norm exactly the reference's, the generations and exact_match too;
- `--model local-chat-completions --apply_chat_template` on demo_gen: 10 chat generations,
  a numeric exact_match.

Once against an in-process coordinator (plus a batched run: 8 prompts per request) and once
against a 2-worker cluster; prints the loglikelihood requests/s of both demo_mc runs.

    build/venv-evals/bin/python tests/evals/lm_eval_test.py --bin-dir build/bin
"""
import concurrent.futures
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import evalutil  # noqa: E402
from evalutil import LM_EVAL_DIR, MODEL_NAME, REPO  # noqa: E402

LOGPROB_TOL = 1e-3
LM_EVAL_TIMEOUT_S = 600
REPLAY_CONCURRENCY = 4
# mode -> {"requests", "wall_s" (the lm_eval process), "bar" (lm-eval's own "Requesting API"
# progress bar: elapsed, it/s), "replay_s" (the same 200 requests replayed here)}
THROUGHPUT = {}


def requesting_api_bar(stderr):
    """The last completed 'Requesting API' tqdm bar of lm-eval's stderr: (n, elapsed 'mm:ss',
    rate it/s as tqdm shows it) or None."""
    bars = re.findall(r"Requesting API: 100%\|[^|]*\| (\d+)/\d+ \[([\d:]+)<[^,]*, ([\d.]+)it/s\]",
                      stderr.replace("\r", "\n"))
    return bars[-1] if bars else None


def replay_loglikelihood_requests(address, docs, concurrency=REPLAY_CONCURRENCY):
    """Sends demo_mc's 200 loglikelihood requests exactly as lm-eval's local-completions does
    (prompt [[ids]], max_tokens 1, echo, logprobs 1, temperature 0, seed 1234), `concurrency`
    at a time, 3 times; returns the median seconds, after checking each answer's log-probs."""
    requests = [r for d in docs for r in d["requests"]]

    def one(r):
        ids = r["context_ids"] + r["continuation_ids"]
        status, _, body = evalutil.post(address, "/v1/completions", {
            "model": MODEL_NAME, "prompt": [ids], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True})
        assert status == 200, (status, body)
        lps = body["choices"][0]["logprobs"]["token_logprobs"]
        got = sum(lps[len(r["context_ids"]):-1])
        assert abs(got - r["loglikelihood"]) <= LOGPROB_TOL, (r, got)

    times = []
    for _ in range(3):
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, requests))
        times.append(time.monotonic() - start)
    return sorted(times)[1]  # the median of 3


def run_lm_eval(out_dir, model, model_args, tasks, extra=()):
    """Runs the lm-eval CLI in the repository root (the tasks' data_files are relative to it),
    offline, caches in out_dir; returns (results dict, {task: [samples]}, wall seconds)."""
    env = dict(os.environ, HF_HOME=str(out_dir / "hf"), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OPENAI_API_KEY="unused")
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args,
               "--tasks", ",".join(tasks), "--include_path", str(LM_EVAL_DIR),
               "--num_fewshot", "0", "--log_samples", "--output_path", str(out_dir / "out"),
               *extra]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=LM_EVAL_TIMEOUT_S)
    wall = time.monotonic() - start
    log = proc.stdout[-4000:] + "\n" + proc.stderr[-8000:]
    if proc.returncode != 0:
        raise AssertionError(f"lm_eval exited {proc.returncode}: {' '.join(command)}\n{log}")
    results_files = glob.glob(str(out_dir / "out" / "**" / "results_*.json"), recursive=True)
    if len(results_files) != 1:
        raise AssertionError(f"expected one results_*.json, found {results_files}\n{log}")
    results = json.loads(pathlib.Path(results_files[0]).read_text())
    samples = {}
    for task in tasks:
        files = glob.glob(str(out_dir / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        if len(files) != 1:
            raise AssertionError(f"expected one samples file of {task}, found {files}\n{log}")
        lines = pathlib.Path(files[0]).read_text().splitlines()
        samples[task] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    return results, samples, wall, proc.stderr


class LmEvalTest(unittest.TestCase):
    reference = None

    @classmethod
    def setUpClass(cls):
        cls.reference = evalutil.load_reference()

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="moe-lm-eval-")
        self.addCleanup(self.tmp.cleanup)
        self.tmp_path = pathlib.Path(self.tmp.name)

    def _out(self, name):
        path = self.tmp_path / name
        path.mkdir()
        return path

    def check_demo_mc(self, results, samples):
        ref = self.reference["demo_mc"]
        got = samples["demo_mc"]
        self.assertEqual([s["doc_id"] for s in got], [d["doc_id"] for d in ref["docs"]])
        worst = 0.0
        for sample, doc in zip(got, ref["docs"]):
            args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(doc["requests"]))]
            self.assertEqual(len(sample["arguments"]), len(doc["requests"]))
            for i, (arg, req) in enumerate(zip(args, doc["requests"])):
                self.assertEqual((arg["arg_0"], arg["arg_1"]),
                                 (req["context"], req["continuation"]))
                ll, greedy = sample["filtered_resps"][i]
                ll = float(ll)
                worst = max(worst, abs(ll - req["loglikelihood"]))
                self.assertAlmostEqual(
                    ll, req["loglikelihood"], delta=LOGPROB_TOL,
                    msg=f"doc {doc['doc_id']} choice {i}: {req['context']!r} + "
                        f"{req['continuation']!r}: lm-eval logged {ll}, transformers "
                        f"{req['loglikelihood']}")
                self.assertEqual(str(greedy), str(req["is_greedy"]),
                                 f"is_greedy of doc {doc['doc_id']} choice {i}")
            self.assertEqual(sample["acc"], doc["acc"], f"acc of doc {doc['doc_id']}")
            self.assertEqual(sample["acc_norm"], doc["acc_norm"],
                             f"acc_norm of doc {doc['doc_id']}")
        r = results["results"]["demo_mc"]
        self.assertEqual(r["acc,none"], ref["acc"])
        self.assertEqual(r["acc_norm,none"], ref["acc_norm"])
        print(f"demo_mc: acc {r['acc,none']} acc_norm {r['acc_norm,none']} (reference "
              f"{ref['acc']} / {ref['acc_norm']}), worst |loglikelihood - reference| = "
              f"{worst:.2e}", file=sys.stderr)

    def check_demo_gen_completions(self, results, samples):
        ref = self.reference["demo_gen"]
        got = samples["demo_gen"]
        self.assertEqual(len(got), len(ref["docs"]))
        for sample, doc in zip(got, ref["docs"]):
            self.assertEqual(sample["doc_id"], doc["doc_id"])
            self.assertEqual(sample["resps"][0][0], doc["text"],
                             f"demo_gen doc {doc['doc_id']}: {doc['context']!r}")
            self.assertEqual(sample["filtered_resps"][0], doc["filtered"])
        self.assertEqual(results["results"]["demo_gen"]["exact_match,first_word"],
                         ref["exact_match"])

    def check_demo_gen_numeric(self, results, samples):
        em = results["results"]["demo_gen"]["exact_match,first_word"]
        self.assertIsInstance(em, float)
        self.assertTrue(0.0 <= em <= 1.0, em)
        self.assertEqual(len(samples["demo_gen"]), len(self.reference["demo_gen"]["docs"]))
        for sample in samples["demo_gen"]:
            self.assertIsInstance(sample["resps"][0][0], str)
        return em

    def completions_args(self, cluster, **extra):
        return dict(model=MODEL_NAME, base_url=f"http://{cluster.http}/v1/completions",
                    tokenizer_backend="remote", tokenized_requests=True, max_retries=1,
                    timeout=120, **extra)

    def run_completions(self, cluster, mode, batch_size=1, **extra):
        # demo_mc alone (its run time gives the loglikelihood requests/s), then demo_gen.
        results, samples = {"results": {}}, {}
        for task in ("demo_mc", "demo_gen"):
            out = self._out(f"completions-{mode}-{task}")
            try:
                r, s, wall, stderr = run_lm_eval(out, "local-completions",
                                            self.completions_args(cluster, **extra), [task],
                                            extra=["--batch_size", str(batch_size)])
            except AssertionError as e:
                raise AssertionError(f"{e}\n{cluster.logs()}") from None
            results["results"].update(r["results"])
            samples.update(s)
            if task == "demo_mc":
                THROUGHPUT[mode] = {
                    "requests": self.reference["demo_mc"]["num_requests"], "wall_s": wall,
                    "bar": requesting_api_bar(stderr),
                    "replay_s": replay_loglikelihood_requests(
                        cluster.http, self.reference["demo_mc"]["docs"])}
        self.check_demo_mc(results, samples)
        self.check_demo_gen_completions(results, samples)

    def run_chat(self, cluster):
        out = self._out("chat")
        try:
            results, samples, _, log = run_lm_eval(
                out, "local-chat-completions",
                dict(model=MODEL_NAME, base_url=f"http://{cluster.http}/v1/chat/completions",
                     num_concurrent=2, max_retries=1, timeout=120),
                ["demo_gen"], extra=["--apply_chat_template"])
        except AssertionError as e:
            raise AssertionError(f"{e}\n{cluster.logs()}") from None
        em = self.check_demo_gen_numeric(results, samples)
        print(f"demo_gen via chat completions: exact_match {em}", file=sys.stderr)

    def test_in_process(self):
        with evalutil.Cluster(workers=0) as cluster:
            self.run_completions(cluster, "in-process", num_concurrent=4)
            # Batched: 8 prompts per /v1/completions request (choices matched by index).
            self.run_completions(cluster, "in-process-batch8", num_concurrent=1, batch_size=8)
            self.run_chat(cluster)
            self.assertIsNone(cluster.coordinator.proc.poll(), "coordinator died")

    def test_two_worker_cluster(self):
        with evalutil.Cluster(workers=2) as cluster:
            self.run_completions(cluster, "2-worker", num_concurrent=4)
            self.run_chat(cluster)
            for p in cluster.processes:
                self.assertIsNone(p.proc.poll(), f"{p.name} died")


def print_throughput():
    if not THROUGHPUT:
        return
    print("\nloglikelihood requests/s, demo_mc (200 requests): lm-eval's whole run (its start, "
          "~15 s, dominates), lm-eval's 'Requesting API' bar (tqdm's smoothed rate), and the "
          f"same requests replayed here, {REPLAY_CONCURRENCY} at a time, one prompt per request "
          "(median of 3):", file=sys.stderr)
    for mode, t in THROUGHPUT.items():
        n = t["requests"]
        bar = t["bar"]
        bar_text = f"bar {bar[1]} {float(bar[2]):7.1f} it/s" if bar else "bar not found"
        print(f"  {mode:18s} lm_eval run {t['wall_s']:5.1f} s ({n / t['wall_s']:5.1f} req/s); "
              f"{bar_text}; replay {t['replay_s']:5.2f} s ({n / t['replay_s']:6.1f} req/s)",
              file=sys.stderr)
    if "in-process" in THROUGHPUT and "2-worker" in THROUGHPUT:
        a, b = THROUGHPUT["in-process"], THROUGHPUT["2-worker"]
        print(f"  2-worker / in-process requests/s (replay): {a['replay_s'] / b['replay_s']:.2f}",
              file=sys.stderr)


if __name__ == "__main__":
    argv = evalutil.parse_args()
    program = unittest.main(argv=argv, verbosity=2, exit=False)
    print_throughput()
    sys.exit(not program.result.wasSuccessful())
