"""The official `openai` Python client against the real `loraserve serve` binary.

Two servers run on free loopback ports with the shared tiny model and its
adapters: the main one with the chatml chat template and API keys (an admin,
tenants alpha and beta), and a single-user one without a chat template, where
chat must fail with a 400 that names the template while completions work.
Both must exit 0 on SIGTERM at the end. Each test names the behaviour it
checks; a failure prints the request's answer.
Usage: openai_client_test.py --binary BUILD/server/loraserve --shared ../shared
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import openai

ARGS = None
MODEL = "aidreams-260k"
ADAPTERS = ["all-r8-bf16", "attn-r8", "mlp-r16-rslora", "ocean", "qv-r4", "robot"]
ADMIN_KEY = "admin-key-0001"
ALPHA_KEY = "alpha-key-0001"
KEYS_FILE = f"""# KEY TENANT ROLE
{ADMIN_KEY} ops admin
{ALPHA_KEY} alpha tenant
beta-key-0001 beta tenant
"""
STORY = "Once upon a time"
# The base model's greedy continuation of this prompt has a "." within 48 tokens.
DOT_PROMPT = "The cat sat on the mat"
MAIN = None  # Server with --chat-template chatml and --api-keys
PLAIN = None  # Server without a chat template, single-user


class Server:
    """A `loraserve serve` process whose stderr is read on a thread."""

    def __init__(self, name, flags):
        self.name = name
        self.log = []
        self.port = None
        self._listening = threading.Event()
        self.process = subprocess.Popen(
            [ARGS.binary, "serve", f"--model={ARGS.shared}/models/{MODEL}",
             f"--adapter-dir={ARGS.shared}/adapters/{MODEL}", "--host=127.0.0.1",
             "--grpc-port=0", "--http-port=0", "--drain-seconds=10"] + flags,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self):
        # Keeps reading after the port is known so the server never blocks on a full pipe.
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(r"loraserve: HTTP listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._listening.set()

    def wait_listening(self, seconds=60):
        if not self._listening.wait(seconds):
            raise RuntimeError(f"the {self.name} server printed no 'HTTP listening on' line in "
                               f"{seconds} s (exit code {self.process.poll()}):\n" +
                               "".join(self.log[-30:]))

    def client(self, api_key):
        # No retries: a retried error would hide which request failed, and how.
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key,
                             max_retries=0, timeout=60)

    def stop(self):
        """SIGTERM; returns the exit code (None if it had not exited after 60 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None


def admin():
    return MAIN.client(ADMIN_KEY)


def complete(client, prompt=STORY, model=MODEL, max_tokens=32, **kwargs):
    """A greedy, non-streamed completion unless kwargs say otherwise."""
    kwargs.setdefault("temperature", 0)
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **kwargs)


def chat(client, model=MODEL, max_tokens=24, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, max_tokens=max_tokens,
        messages=[{"role": "system", "content": "You tell short stories."},
                  {"role": "user", "content": "Tell me a story about a cat."}], **kwargs)


class ModelsTest(unittest.TestCase):
    def test_models_list_has_base_model_and_operator_adapters(self):
        models = admin().models.list()
        ids = [m.id for m in models.data]
        for expected in [MODEL] + ADAPTERS:
            self.assertIn(expected, ids, f"GET /v1/models: {models}")
        base = next(m for m in models.data if m.id == MODEL)
        self.assertEqual(base.object, "model")


class CompletionsTest(unittest.TestCase):
    def test_greedy_completion_has_text_usage_and_finish_reason(self):
        answer = complete(admin(), max_tokens=32)
        self.assertEqual(answer.object, "text_completion", answer)
        self.assertEqual(answer.model, MODEL, answer)
        self.assertTrue(answer.id.startswith("cmpl-"), answer)
        self.assertEqual(len(answer.choices), 1, answer)
        choice = answer.choices[0]
        self.assertEqual(choice.index, 0, answer)
        self.assertTrue(choice.text, f"empty text: {answer}")
        self.assertIn(choice.finish_reason, {"stop", "length"}, answer)
        usage = answer.usage
        self.assertGreater(usage.prompt_tokens, 0, answer)
        self.assertGreater(usage.completion_tokens, 0, answer)
        self.assertLessEqual(usage.completion_tokens, 32, answer)
        self.assertEqual(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, answer)
        if choice.finish_reason == "length":
            self.assertEqual(usage.completion_tokens, 32, answer)

    def test_greedy_completion_repeats_exactly(self):
        first = complete(admin())
        second = complete(admin())
        self.assertEqual(first.choices[0].text, second.choices[0].text)
        self.assertEqual(first.usage, second.usage)

    def test_trained_adapters_change_the_greedy_text(self):
        client = admin()
        base = complete(client).choices[0].text
        for adapter in ["ocean", "robot"]:
            answer = complete(client, model=adapter)
            self.assertEqual(answer.model, adapter, answer)
            self.assertTrue(answer.choices[0].text, f"{adapter}: empty text: {answer}")
            self.assertNotEqual(answer.choices[0].text, base,
                                f"{adapter} wrote the base model's text {base!r}")
            self.assertEqual(complete(client, model=adapter).choices[0].text,
                             answer.choices[0].text, f"{adapter}: greedy text is not repeatable")

    def test_merged_adapters_blend_the_trained_adapters(self):
        client = admin()
        ocean = complete(client, model="ocean").choices[0].text
        merged = {"ids": ["ocean", "robot"], "weights": [1.0, 0.5], "merge_strategy": "cat"}
        answer = complete(client, extra_body={"merged_adapters": merged})
        self.assertEqual(answer.model, MODEL, answer)
        text = answer.choices[0].text
        self.assertTrue(text, f"empty text: {answer}")
        self.assertNotEqual(text, ocean, "the blend wrote ocean's text alone")
        self.assertEqual(complete(client, extra_body={"merged_adapters": merged}).choices[0].text,
                         text, "the blend's greedy text is not repeatable")
        # Weights default to 1; one adapter at weight 1 is that adapter.
        alone = complete(client, extra_body={"merged_adapters": {"ids": ["ocean"]}})
        self.assertEqual(alone.choices[0].text, ocean)

    def test_stream_matches_the_non_streamed_text_and_ends_with_usage(self):
        client = admin()
        for model in [MODEL, "ocean"]:  # one ends at max_tokens, the other at end-of-sequence
            whole = complete(client, model=model, logprobs=2)
            chunks = list(complete(client, model=model, logprobs=2, stream=True,
                                   stream_options={"include_usage": True}))
            self.assertGreater(len(chunks), 1, chunks)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            self.assertEqual(text, whole.choices[0].text, f"{model}: {chunks}")
            finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
            self.assertEqual(finishes, [whole.choices[0].finish_reason],
                             f"{model}: finish_reason must be set exactly once: {chunks}")
            last = chunks[-1]
            self.assertEqual(last.choices, [], f"{model}: the usage chunk has choices: {last}")
            self.assertEqual(last.usage, whole.usage, f"{model}: {last}")
            self.assertTrue(all(c.usage is None for c in chunks[:-1]),
                            f"{model}: usage before the last chunk: {chunks}")
            self.assertEqual({c.id for c in chunks}, {chunks[0].id}, f"{model}: ids differ")
            self.assertTrue(all(ch.index == 0 for c in chunks for ch in c.choices), chunks)
            streamed = [ch.logprobs for c in chunks for ch in c.choices]
            for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"]:
                self.assertEqual([v for lp in streamed for v in getattr(lp, field)],
                                 getattr(whole.choices[0].logprobs, field),
                                 f"{model}: streamed logprobs.{field} differ: {chunks}")

    def test_stream_without_include_usage_has_no_usage(self):
        chunks = list(complete(admin(), stream=True, max_tokens=8))
        self.assertTrue(chunks)
        self.assertTrue(all(c.usage is None for c in chunks), chunks)
        self.assertTrue(all(c.choices for c in chunks), chunks)

    def test_seeded_n3_gives_three_indexed_repeatable_choices(self):
        client = admin()

        def texts():
            answer = complete(client, n=3, seed=1234, temperature=1, max_tokens=16)
            self.assertEqual(sorted(c.index for c in answer.choices), [0, 1, 2], answer)
            # One prompt, counted once however many choices it has (OpenAI's usage).
            self.assertEqual(answer.usage.prompt_tokens,
                             complete(client, max_tokens=1).usage.prompt_tokens, answer)
            return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]

        first = texts()
        self.assertEqual(texts(), first, "the same seeded request gave other texts")
        self.assertGreater(len(set(first)), 1, f"n=3 choices are all the same: {first}")

    def test_list_prompt_with_n2_gives_four_choices_in_prompt_order(self):
        client = admin()
        answer = complete(client, prompt=["a", "b"], n=2, temperature=1, seed=7, max_tokens=8)
        self.assertEqual(sorted(c.index for c in answer.choices), [0, 1, 2, 3], answer)
        prompt_tokens = [complete(client, prompt=p, max_tokens=1).usage.prompt_tokens
                         for p in ["a", "b"]]
        self.assertEqual(answer.usage.prompt_tokens, sum(prompt_tokens), answer)
        # Greedy: choice i*n + j answers prompt i.
        greedy = complete(client, prompt=["a", "b"], n=2, max_tokens=8)
        by_index = {c.index: c.text for c in greedy.choices}
        expected = [complete(client, prompt=p, max_tokens=8).choices[0].text for p in ["a", "b"]]
        self.assertEqual([by_index[i] for i in range(4)],
                         [expected[0], expected[0], expected[1], expected[1]], greedy)

    def test_logprobs_have_one_entry_per_token(self):
        client = admin()
        for model in [MODEL, "ocean"]:
            answer = complete(client, model=model, logprobs=2)
            choice = answer.choices[0]
            logprobs = choice.logprobs
            self.assertIsNotNone(logprobs, answer)
            count = answer.usage.completion_tokens
            for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"]:
                self.assertEqual(len(getattr(logprobs, field)), count,
                                 f"{model}: logprobs.{field} has not {count} entries: {answer}")
            for i, (token, logprob, top) in enumerate(
                    zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)):
                self.assertLessEqual(logprob, 0, f"{model}: token {i}: {answer}")
                self.assertTrue(1 <= len(top) <= 2, f"{model}: top_logprobs[{i}]: {top}")
                self.assertTrue(all(v <= 0 for v in top.values()), f"{model}: {top}")
                # Greedy: the chosen token is the likeliest alternative.
                self.assertAlmostEqual(logprob, max(top.values()), places=4,
                                       msg=f"{model}: token {i} {token!r} {top}")
            self.assertEqual(logprobs.text_offset[0], 0, answer)
            self.assertEqual(logprobs.text_offset, sorted(logprobs.text_offset), answer)
            if choice.finish_reason == "length":
                self.assertEqual("".join(logprobs.tokens), choice.text, answer)
                offsets = [len("".join(logprobs.tokens[:i])) for i in range(count)]
                self.assertEqual(logprobs.text_offset, offsets, answer)
        without = complete(client)
        self.assertIsNone(without.choices[0].logprobs, without)

    def test_stop_string_ends_the_text_before_it(self):
        client = admin()
        full = complete(client, prompt=DOT_PROMPT, max_tokens=48).choices[0].text
        self.assertIn(".", full, f"pick another DOT_PROMPT: its greedy text has no '.': {full!r}")
        answer = complete(client, prompt=DOT_PROMPT, max_tokens=48, stop=["."])
        choice = answer.choices[0]
        self.assertNotIn(".", choice.text, answer)
        self.assertEqual(choice.text, full[:full.index(".")], answer)
        self.assertEqual(choice.finish_reason, "stop", answer)
        chunks = list(complete(client, prompt=DOT_PROMPT, max_tokens=48, stop=["."], stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks), choice.text, chunks)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop", chunks)


class ChatTest(unittest.TestCase):
    def test_chat_answers_as_assistant(self):
        answer = chat(admin())
        self.assertEqual(answer.object, "chat.completion", answer)
        self.assertTrue(answer.id.startswith("chatcmpl-"), answer)
        self.assertEqual(answer.model, MODEL, answer)
        message = answer.choices[0].message
        self.assertEqual(message.role, "assistant", answer)
        self.assertTrue(message.content, f"empty content: {answer}")
        self.assertIn(answer.choices[0].finish_reason, {"stop", "length"}, answer)
        usage = answer.usage
        self.assertLessEqual(usage.completion_tokens, 24, answer)
        self.assertEqual(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, answer)

    def test_chat_stream_matches_the_non_streamed_content(self):
        client = admin()
        # The base model's chat answer ends at max_tokens, ocean's at end-of-sequence.
        for model in [MODEL, "ocean"]:
            whole = chat(client, model=model, logprobs=True)
            chunks = list(chat(client, model=model, logprobs=True, stream=True,
                               stream_options={"include_usage": True}))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            self.assertTrue(deltas, chunks)
            self.assertEqual(deltas[0].role, "assistant", f"{model}: {chunks}")
            self.assertEqual("".join(d.content or "" for d in deltas),
                             whole.choices[0].message.content, f"{model}: {chunks}")
            finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
            self.assertEqual(finishes, [whole.choices[0].finish_reason], f"{model}: {chunks}")
            self.assertEqual(chunks[-1].choices, [], f"{model}: {chunks[-1]}")
            self.assertEqual(chunks[-1].usage, whole.usage, f"{model}: {chunks[-1]}")
            self.assertTrue(all(c.object == "chat.completion.chunk" for c in chunks), chunks)
            self.assertEqual(
                [e.token for c in chunks for ch in c.choices for e in ch.logprobs.content],
                [e.token for e in whole.choices[0].logprobs.content], f"{model}: {chunks}")

    def test_chat_logprobs_have_content_entries(self):
        answer = chat(admin(), logprobs=True, top_logprobs=2)
        content = answer.choices[0].logprobs.content
        self.assertEqual(len(content), answer.usage.completion_tokens, answer)
        for entry in content:
            self.assertLessEqual(entry.logprob, 0, entry)
            self.assertTrue(1 <= len(entry.top_logprobs) <= 2, entry)
            self.assertEqual(entry.bytes, list(entry.token.encode()), entry)
        self.assertIsNone(chat(admin()).choices[0].logprobs)


class ErrorsTest(unittest.TestCase):
    def assert_error(self, error_class, status, request, mentions=None):
        with self.assertRaises(error_class) as caught:
            request()
        error = caught.exception
        self.assertEqual(error.status_code, status, error)
        self.assertIsInstance(error.body, dict, error)
        self.assertTrue(error.body.get("message"), f"no error message: {error.body}")
        if mentions:
            self.assertIn(mentions, error.body["message"], error.body)
        answer = complete(admin(), max_tokens=4)
        self.assertTrue(answer.choices[0].text, f"no completion after the error: {answer}")

    def test_unknown_model_is_not_found(self):
        self.assert_error(openai.NotFoundError, 404,
                          lambda: complete(admin(), model="no-such-model"), "no-such-model")
        self.assert_error(openai.NotFoundError, 404,
                          lambda: complete(admin(), model="no-such-model", stream=True))
        self.assert_error(openai.NotFoundError, 404,
                          lambda: admin().chat.completions.create(
                              model="no-such-model", messages=[{"role": "user", "content": "hi"}]))

    def test_negative_max_tokens_is_bad_request(self):
        self.assert_error(openai.BadRequestError, 400, lambda: complete(admin(), max_tokens=-1),
                          "max_tokens")

    def test_too_many_choices_is_bad_request(self):
        self.assert_error(openai.BadRequestError, 400, lambda: complete(admin(), n=1000))

    def test_unknown_field_is_bad_request(self):
        self.assert_error(openai.BadRequestError, 400,
                          lambda: complete(admin(), extra_body={"bogus": 1}), "bogus")

    def test_wrong_api_key_is_unauthenticated(self):
        self.assert_error(openai.AuthenticationError, 401,
                          lambda: complete(MAIN.client("wrong-key-0001")))
        self.assert_error(openai.AuthenticationError, 401,
                          lambda: MAIN.client("wrong-key-0001").models.list())


class TenantTest(unittest.TestCase):
    def test_tenant_cannot_name_another_tenants_adapter(self):
        alpha = MAIN.client(ALPHA_KEY)
        with self.assertRaises(openai.NotFoundError) as caught:
            complete(alpha, model="beta/anything")
        self.assertEqual(caught.exception.status_code, 404)
        self.assertTrue(complete(alpha, model="ocean").choices[0].text)

    def test_tenant_cannot_merge_another_tenants_adapter(self):
        alpha = MAIN.client(ALPHA_KEY)
        merged = {"ids": ["ocean", "beta/anything"]}
        with self.assertRaises(openai.NotFoundError) as caught:
            complete(alpha, extra_body={"merged_adapters": merged})
        self.assertIn("beta/anything", caught.exception.body["message"])
        answer = complete(alpha, extra_body={"merged_adapters": {"ids": ["ocean", "robot"]}})
        self.assertTrue(answer.choices[0].text, answer)

    def test_tenant_lists_base_model_and_operator_adapters_only(self):
        ids = sorted(m.id for m in MAIN.client(ALPHA_KEY).models.list().data)
        self.assertEqual(ids, sorted([MODEL] + ADAPTERS))


class NoChatTemplateTest(unittest.TestCase):
    def test_chat_without_a_template_is_bad_request_naming_it(self):
        client = PLAIN.client("unused-in-single-user-mode")
        with self.assertRaises(openai.BadRequestError) as caught:
            chat(client)
        message = caught.exception.body["message"]
        self.assertRegex(message.lower(), r"chat[ _]template", message)

    def test_completions_work_without_a_template(self):
        client = PLAIN.client("unused-in-single-user-mode")
        answer = complete(client)
        self.assertTrue(answer.choices[0].text, answer)
        self.assertEqual(answer.choices[0].text, complete(admin()).choices[0].text,
                         "the two servers' greedy texts differ")


def main():
    global ARGS, MAIN, PLAIN
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--shared", required=True)
    ARGS, rest = parser.parse_known_args()
    # The binary may be relinked while the test starts: give it a moment.
    for _ in range(60):
        if os.access(ARGS.binary, os.X_OK):
            break
        time.sleep(1)
    with tempfile.TemporaryDirectory() as tmp:
        keys = os.path.join(tmp, "keys")
        with open(keys, "w") as f:
            f.write(KEYS_FILE)
        MAIN = Server("main", ["--chat-template=chatml", f"--api-keys={keys}"])
        PLAIN = Server("plain", [])
        try:
            MAIN.wait_listening()
            PLAIN.wait_listening()
            result = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2).result
        finally:
            codes = {server.name: server.stop() for server in [MAIN, PLAIN]}
    failed = not result.wasSuccessful()
    for name, code in codes.items():
        if code != 0:
            server = MAIN if name == "main" else PLAIN
            print(f"the {name} server exited with {code} after SIGTERM, expected 0; its log:\n" +
                  "".join(server.log[-30:]), file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
