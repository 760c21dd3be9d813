#!/usr/bin/env python3
"""The coordinator's OpenAI-compatible HTTP API driven by the official `openai` Python client
(tools/evals/requirements.txt), against an in-process coordinator serving demo_mixtral.

Numbers are checked against tests/testdata/lm_eval/reference.json (transformers, float32,
tools/fixtures/gen_lm_eval_reference.py): prompt log-probabilities of token-id prompts with
echo + max_tokens=0, and greedy completions of token-id prompts.

    build/venv-evals/bin/python tests/evals/openai_client_test.py --bin-dir build/bin
"""
import math
import pathlib
import sys
import unittest

import jinja2.sandbox
import openai

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import evalutil  # noqa: E402
from evalutil import MODEL_NAME, post, request, sse_events, tokenize  # noqa: E402

LOGPROB_TOL = 1e-3


def render_chatml(messages):
    """The chat template the coordinator is given (--chat-template chatml.jinja), rendered the
    way transformers renders chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(evalutil.CHAT_TEMPLATE.read_text())
    return template.render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                           eos_token="</s>")


class OpenAIClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.reference = evalutil.load_reference()
        cls.cluster = evalutil.Cluster(workers=0).start()
        cls.http = cls.cluster.http
        cls.client = openai.OpenAI(base_url=f"http://{cls.http}/v1", api_key="unused",
                                   max_retries=0, timeout=120)

    @classmethod
    def tearDownClass(cls):
        codes = cls.cluster.stop()
        cls.cluster.cleanup()
        assert codes == [0], f"coordinator exit codes {codes}"

    def run(self, result=None):
        # On failure, the coordinator's log helps more than the traceback.
        outcome = super().run(result)
        if result is not None and (result.failures or result.errors):
            last = (result.failures + result.errors)[-1][0]
            if last is self:
                print(self.cluster.logs(), file=sys.stderr)
        return outcome

    # --- /v1/models -------------------------------------------------------------------------

    def test_models_list(self):
        models = self.client.models.list()
        ids = [m.id for m in models.data]
        self.assertEqual(ids, [MODEL_NAME])
        self.assertEqual(models.data[0].object, "model")

    # --- /v1/completions --------------------------------------------------------------------

    def test_completion_text_finish_reason_usage(self):
        prompt = "We hold these truths"
        c = self.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8,
                                           temperature=0)
        self.assertEqual(c.object, "text_completion")
        self.assertEqual(c.model, MODEL_NAME)
        self.assertTrue(c.id)
        self.assertIsInstance(c.created, int)
        self.assertEqual(len(c.choices), 1)
        choice = c.choices[0]
        self.assertEqual(choice.index, 0)
        self.assertIsInstance(choice.text, str)
        self.assertTrue(choice.text.strip(), repr(choice.text))
        self.assertEqual(choice.finish_reason, "length")
        self.assertIsNone(choice.logprobs)
        # A string prompt is tokenized with the special tokens (BOS), as /tokenize does with
        # add_special_tokens=true (vLLM's default for completions).
        self.assertEqual(c.usage.prompt_tokens, len(tokenize(self.http, prompt, True)))
        self.assertEqual(c.usage.completion_tokens, 8)
        self.assertEqual(c.usage.total_tokens, c.usage.prompt_tokens + 8)

    def test_greedy_completions_match_transformers(self):
        # Token-id prompts (as lm-eval sends them), greedy, stop "\n": the reference's text.
        for doc in self.reference["demo_gen"]["docs"]:
            with self.subTest(doc=doc["doc_id"]):
                c = self.client.completions.create(model=MODEL_NAME, prompt=doc["prompt_ids"],
                                                   max_tokens=8, temperature=0, stop=["\n"])
                self.assertEqual(c.choices[0].text, doc["text"])
                self.assertEqual(c.choices[0].finish_reason, doc["finish_reason"])
                self.assertEqual(c.usage.prompt_tokens, len(doc["prompt_ids"]))
                if doc["finish_reason"] == "length":
                    self.assertEqual(c.usage.completion_tokens, 8)

    def test_echo_prompt_logprobs_match_transformers(self):
        # Each reference request as token ids, echo + max_tokens=0 + logprobs=1, 20 prompts per
        # HTTP request (prompt = list of lists of ints): the continuation's summed log-probs and
        # lm-eval's is_greedy (token log-prob == the top-1 entry) must be the reference's.
        requests = [r for d in self.reference["demo_mc"]["docs"] for r in d["requests"]]
        self.assertEqual(len(requests), 200)
        worst = 0.0
        for start in range(0, len(requests), 20):
            batch = requests[start:start + 20]
            prompts = [r["context_ids"] + r["continuation_ids"] for r in batch]
            c = self.client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=0,
                                               echo=True, logprobs=1, temperature=0)
            self.assertEqual(sorted(ch.index for ch in c.choices), list(range(len(batch))))
            self.assertEqual(c.usage.prompt_tokens, sum(len(p) for p in prompts))
            self.assertEqual(c.usage.completion_tokens, 0)
            for choice in c.choices:
                r, ids = batch[choice.index], prompts[choice.index]
                lp = choice.logprobs
                self.assertIsNotNone(lp, f"no logprobs for request {start + choice.index}")
                self.assertEqual(len(lp.tokens), len(ids))
                self.assertEqual(len(lp.token_logprobs), len(ids))
                self.assertEqual(len(lp.top_logprobs), len(ids))
                self.assertEqual(len(lp.text_offset), len(ids))
                self.assertIsNone(lp.token_logprobs[0])
                self.assertIsNone(lp.top_logprobs[0])
                self.assertEqual(lp.text_offset[0], 0)
                self.assertEqual(lp.text_offset, sorted(lp.text_offset))
                self.assertEqual(choice.text, self._detokenize(ids))
                ctx = len(r["context_ids"])
                cont = lp.token_logprobs[ctx:]
                got = sum(cont)
                worst = max(worst, abs(got - r["loglikelihood"]))
                self.assertAlmostEqual(got, r["loglikelihood"], delta=LOGPROB_TOL,
                                       msg=f"request {start + choice.index}: {r['context']!r} + "
                                           f"{r['continuation']!r}")
                for tok, tok_lp, top in zip(lp.tokens[1:], lp.token_logprobs[1:],
                                            lp.top_logprobs[1:]):
                    self.assertLessEqual(tok_lp, 0.0)
                    self.assertGreaterEqual(len(top), 1)
                    self.assertGreaterEqual(max(top.values()) + 1e-6, tok_lp)
                    if tok_lp == max(top.values()):
                        # The prompt token is the top-1: top_logprobs names it as `tokens` does
                        # (plain English prompts: no partial UTF-8 byte tokens here).
                        self.assertIn(tok, top, f"request {start + choice.index}")
                greedy = all(t == max(top.values())
                             for t, top in zip(cont, lp.top_logprobs[ctx:]))
                self.assertEqual(greedy, r["is_greedy"],
                                 f"is_greedy of request {start + choice.index}")
        print(f"echo logprobs: worst |sum - reference| = {worst:.2e} over 200 requests",
              file=sys.stderr)

    def _detokenize(self, ids):
        status, _, body = post(self.http, "/detokenize", {"tokens": ids})
        self.assertEqual(status, 200, body)
        return body["prompt"]

    def test_tokenize_matches_lm_eval_requests(self):
        # lm-eval's remote tokenizer: /tokenize with add_special_tokens=false; the reference's
        # ids are lm-eval's own split of context / context+continuation.
        for doc in self.reference["demo_mc"]["docs"][:10]:
            for r in doc["requests"]:
                whole = tokenize(self.http, r["context"] + r["continuation"])
                context = tokenize(self.http, r["context"])
                self.assertEqual(context, r["context_ids"])
                self.assertEqual(whole[len(context):], r["continuation_ids"])
        status, _, body = post(self.http, "/tokenize", {"prompt": "Four score",
                                                         "add_special_tokens": True})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["tokens"][0], 1)  # BOS
        self.assertEqual(body["count"], len(body["tokens"]))
        self.assertEqual(body["max_model_len"], 512)
        self.assertEqual(body["tokens"][1:], tokenize(self.http, "Four score"))
        self.assertEqual(self._detokenize(body["tokens"][1:]), "Four score")
        status, _, info = request(self.http, "GET", "/tokenizer_info")
        self.assertEqual(status, 200, info)
        self.assertEqual(info["eos_token"], "</s>")
        self.assertEqual(info["bos_token"], "<s>")
        # lm-eval's RemoteTokenizer takes tokenize(eos_token)[0] as the EOS id.
        self.assertEqual(tokenize(self.http, info["eos_token"])[0], 2)
        self.assertEqual(tokenize(self.http, info["bos_token"])[0], 1)

    def test_stream_equals_non_stream(self):
        prompt = "Four score and seven"
        full = self.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16,
                                              temperature=0)
        texts, finish, usage, chunks = [], [], None, 0
        for chunk in self.client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True}):
            chunks += 1
            self.assertEqual(chunk.object, "text_completion")
            if chunk.usage is not None:
                usage = chunk.usage
                self.assertEqual(chunk.choices, [])
                continue
            for ch in chunk.choices:
                self.assertEqual(ch.index, 0)
                texts.append(ch.text)
                if ch.finish_reason is not None:
                    finish.append(ch.finish_reason)
        self.assertGreater(chunks, 2, "expected one chunk per token or so")
        self.assertEqual("".join(texts), full.choices[0].text)
        self.assertEqual(finish, ["length"])
        self.assertIsNotNone(usage, "stream_options.include_usage: no usage chunk")
        self.assertEqual((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
                         (full.usage.prompt_tokens, 16, full.usage.prompt_tokens + 16))
        # On the wire: SSE, ending with data: [DONE].
        status, content_type, events, text = sse_events(
            self.http, "/v1/completions", {"model": MODEL_NAME, "prompt": prompt,
                                           "max_tokens": 4, "temperature": 0, "stream": True})
        self.assertEqual(status, 200, text)
        self.assertTrue(content_type.startswith("text/event-stream"), content_type)
        self.assertEqual(events[-1], "[DONE]", text[-500:])
        self.assertNotIn("[DONE]", events[:-1])

    def test_n2_seeded_sampling(self):
        kw = dict(model=MODEL_NAME, prompt="The", max_tokens=12, temperature=1.5, top_p=1.0, n=2)
        a = self.client.completions.create(seed=7, **kw)
        b = self.client.completions.create(seed=7, **kw)
        self.assertEqual(sorted(ch.index for ch in a.choices), [0, 1])
        self.assertEqual([ch.text for ch in sorted(a.choices, key=lambda c: c.index)],
                         [ch.text for ch in sorted(b.choices, key=lambda c: c.index)],
                         "same seed, same request: same samples")
        for ch in a.choices:
            self.assertIn(ch.finish_reason, ("length", "stop"))
        if all(ch.finish_reason == "length" for ch in a.choices):
            self.assertEqual(a.usage.completion_tokens, 24)
        # Different seeds give different samples (at temperature 1.5, one-word prompt).
        outs = {tuple(ch.text for ch in sorted(self.client.completions.create(
            seed=s, **kw).choices, key=lambda c: c.index)) for s in range(1, 6)}
        texts = {t for pair in outs for t in pair}
        self.assertGreater(len(texts), 1, f"5 seeds x n=2 gave one text: {texts}")

    def test_stop_strings(self):
        doc = next(d for d in self.reference["demo_gen"]["docs"]
                   if d["finish_reason"] == "length" and "," in d["text"].lstrip()[1:])
        ref = doc["text"]
        cut = ref.index(",", len(ref) - len(ref.lstrip()) + 1)
        c = self.client.completions.create(model=MODEL_NAME, prompt=doc["prompt_ids"],
                                           max_tokens=8, temperature=0, stop=[",", "zzz"])
        self.assertEqual(c.choices[0].text, ref[:cut])
        self.assertEqual(c.choices[0].finish_reason, "stop")
        # A stop string spanning tokens: the second word's first two letters.
        words = ref.split()
        stop = " " + words[1][:2]
        c = self.client.completions.create(model=MODEL_NAME, prompt=doc["prompt_ids"],
                                           max_tokens=8, temperature=0, stop=stop)
        self.assertEqual(c.choices[0].text, ref[:ref.index(stop)])
        self.assertEqual(c.choices[0].finish_reason, "stop")

    # --- /v1/chat/completions ---------------------------------------------------------------

    MESSAGES = [{"role": "system", "content": "You recite."},
                {"role": "user", "content": "We hold these truths to be"}]

    def _chat_prompt_ids(self, prompt_tokens):
        """The token ids of the rendered chat prompt, with or without BOS, whichever count the
        server reported."""
        rendered = render_chatml(self.MESSAGES)
        plain, with_bos = tokenize(self.http, rendered), tokenize(self.http, rendered, True)
        self.assertIn(prompt_tokens, (len(plain), len(with_bos)),
                      f"chat usage.prompt_tokens {prompt_tokens}: neither the rendered ChatML "
                      f"prompt ({len(plain)} tokens) nor it with BOS ({len(with_bos)})")
        return plain if prompt_tokens == len(plain) else with_bos

    def test_chat_non_stream(self):
        c = self.client.chat.completions.create(model=MODEL_NAME, messages=self.MESSAGES,
                                                max_tokens=10, temperature=0)
        self.assertEqual(c.object, "chat.completion")
        self.assertEqual(c.model, MODEL_NAME)
        self.assertEqual(len(c.choices), 1)
        msg = c.choices[0].message
        self.assertEqual(msg.role, "assistant")
        self.assertIsInstance(msg.content, str)
        self.assertIn(c.choices[0].finish_reason, ("length", "stop"))
        self.assertEqual(c.usage.total_tokens, c.usage.prompt_tokens + c.usage.completion_tokens)
        # The same tokens through /v1/completions give the same text: the chat endpoint is the
        # template + the completion engine.
        ids = self._chat_prompt_ids(c.usage.prompt_tokens)
        plain = self.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10,
                                               temperature=0)
        self.assertEqual(msg.content, plain.choices[0].text)
        self.assertEqual(c.usage.completion_tokens, plain.usage.completion_tokens)

    def test_chat_stream(self):
        full = self.client.chat.completions.create(model=MODEL_NAME, messages=self.MESSAGES,
                                                   max_tokens=10, temperature=0)
        parts, roles, finish, usage = [], [], [], None
        for chunk in self.client.chat.completions.create(
                model=MODEL_NAME, messages=self.MESSAGES, max_tokens=10, temperature=0,
                stream=True, stream_options={"include_usage": True}):
            self.assertEqual(chunk.object, "chat.completion.chunk")
            if chunk.usage is not None and not chunk.choices:
                usage = chunk.usage
                continue
            for ch in chunk.choices:
                if ch.delta.role:
                    roles.append(ch.delta.role)
                if ch.delta.content:
                    parts.append(ch.delta.content)
                if ch.finish_reason:
                    finish.append(ch.finish_reason)
        self.assertEqual(roles, ["assistant"])
        self.assertEqual("".join(parts), full.choices[0].message.content)
        self.assertEqual(finish, [full.choices[0].finish_reason])
        self.assertIsNotNone(usage)
        self.assertEqual(usage.completion_tokens, full.usage.completion_tokens)
        status, content_type, events, text = sse_events(
            self.http, "/v1/chat/completions", {"model": MODEL_NAME, "messages": self.MESSAGES,
                                                "max_tokens": 3, "stream": True})
        self.assertEqual(status, 200, text)
        self.assertEqual(events[-1], "[DONE]", text[-500:])

    def test_chat_logprobs(self):
        c = self.client.chat.completions.create(model=MODEL_NAME, messages=self.MESSAGES,
                                                max_tokens=10, temperature=0, logprobs=True,
                                                top_logprobs=3)
        content = c.choices[0].logprobs.content
        self.assertEqual(len(content), c.usage.completion_tokens)
        text = "".join(e.token for e in content)
        self.assertEqual(text, c.choices[0].message.content,
                         "the logprobs' tokens joined are not the message content")
        for e in content:
            self.assertLessEqual(e.logprob, 0.0)
            self.assertEqual(len(e.top_logprobs), 3)
            tops = [t.logprob for t in e.top_logprobs]
            self.assertEqual(tops, sorted(tops, reverse=True))
            # Greedy: the chosen token is the top-1.
            self.assertEqual(e.top_logprobs[0].token, e.token)
            self.assertAlmostEqual(e.top_logprobs[0].logprob, e.logprob, delta=1e-6)
            if "\ufffd" not in e.token:
                self.assertEqual(bytes(e.bytes), e.token.encode("utf-8"))
            for t in e.top_logprobs:
                self.assertIsInstance(t.bytes, list)
        # The same log-probs as /v1/completions reports for the same tokens.
        ids = self._chat_prompt_ids(c.usage.prompt_tokens)
        plain = self.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10,
                                               temperature=0, logprobs=3)
        self.assertEqual(len(plain.choices[0].logprobs.token_logprobs), len(content))
        for e, lp in zip(content, plain.choices[0].logprobs.token_logprobs):
            self.assertAlmostEqual(e.logprob, lp, delta=1e-5)
        # Without logprobs: none.
        c = self.client.chat.completions.create(model=MODEL_NAME, messages=self.MESSAGES,
                                                max_tokens=2, temperature=0)
        self.assertIsNone(c.choices[0].logprobs)

    def test_completion_top_logprobs_include_the_chosen_token(self):
        # OpenAI's legacy completions (and vLLM): "The API will always return the logprob of the
        # sampled token, so there may be up to logprobs+1 elements" in each top_logprobs dict;
        # with echo the same holds for the prompt tokens. Plain ASCII words (no partial UTF-8
        # byte tokens), mostly not the model's top-1, and 2 sampled tokens.
        c = self.client.completions.create(model=MODEL_NAME, prompt="The cat sat on the mat",
                                           max_tokens=2, echo=True, logprobs=1, temperature=1.5,
                                           seed=3)
        lp = c.choices[0].logprobs
        missing = []
        for i in range(1, len(lp.tokens)):
            top = lp.top_logprobs[i]
            self.assertLessEqual(len(top), 2, f"position {i}: {top}")
            if lp.tokens[i] not in top:
                missing.append(f"position {i}: token {lp.tokens[i]!r} (logprob "
                               f"{lp.token_logprobs[i]:.3f}) not in top_logprobs {top}")
            else:
                self.assertAlmostEqual(top[lp.tokens[i]], lp.token_logprobs[i], delta=1e-6)
        self.assertEqual(missing, [], "\n".join(missing))

    def test_logprobs_not_affected_by_temperature(self):
        # log_softmax of the raw logits: a sampled token's log-prob does not depend on the
        # temperature; echo over the prompt shows it without sampling in the way.
        ids = self.reference["demo_mc"]["docs"][0]["requests"][0]["context_ids"]
        got = []
        for temperature in (0.0, 0.5, 1.7):
            c = self.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0,
                                               echo=True, logprobs=2, temperature=temperature,
                                               seed=3)
            got.append(c.choices[0].logprobs.token_logprobs[1:])
        for other in got[1:]:
            for a, b in zip(got[0], other):
                self.assertAlmostEqual(a, b, delta=1e-6)

    # --- errors -----------------------------------------------------------------------------

    def test_bad_temperature_is_bad_request(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2,
                                           temperature=-1)
        self.assertEqual(cm.exception.status_code, 400)
        self.assertEqual(cm.exception.param, "temperature")
        self.assertIsInstance(cm.exception.body.get("message"), str)
        self.assertIsInstance(cm.exception.type, str)

    def test_unknown_model_is_not_found(self):
        with self.assertRaises(openai.NotFoundError) as cm:
            self.client.chat.completions.create(model="no-such-model", messages=self.MESSAGES,
                                                max_tokens=2)
        self.assertEqual(cm.exception.status_code, 404)
        self.assertIsInstance(cm.exception.body.get("message"), str)

    def test_health(self):
        status, _, _ = request(self.http, "GET", "/health")
        self.assertEqual(status, 200)


if __name__ == "__main__":
    argv = evalutil.parse_args()
    unittest.main(argv=argv, verbosity=2)
