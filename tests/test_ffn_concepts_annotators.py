"""Method C annotators: offline rules on hand word sets, the registry, the cache, the endpoint against a
local fake server (retries, failures), the local LLM judge on a tiny random model, and the reply parsers."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneshift.plugins.ffn_concepts import prompts
from tuneshift.plugins.ffn_concepts.annotators import (Annotation, AnnotationCache, Annotator, AnnotatorError,
                                                       annotate_word_sets, available_annotators, build_annotator)
from tuneshift.plugins.ffn_concepts.chat_annotators import (EndpointAnnotator, EndpointOptions, LLMJudgeAnnotator,
                                                            LLMJudgeOptions)
from tuneshift.plugins.ffn_concepts.prompts import CANNOT_TELL, ParseError

MATH = ("equation", "integer", "fraction", "divide", "multiply", "sum", "ratio", "percent", "algebra", "matrix",
        "vector", "angle", "triangle", "river", "chair")
FUNCTION = ("the", "of", "and", "to", "in", "with", "which", "would", "their", "could", "between", "although",
            "garden", "blue", "horse")
ING = ("walking", "reading", "singing", "cooking", "eating", "jumping", "thinking", "driving", "painting",
       "swimming", "table", "moon", "green", "carpet", "apple")
RHYME = ("night", "light", "fight", "might", "sight", "tight", "bright", "flight", "fright", "knight", "wight",
         "plight", "oven", "goose", "clamp")
FRUIT = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "orange", "melon",
         "apricot", "lime", "fig", "guitar")
FOOD = ("bread", "cheese", "soup", "butter", "rice", "salad", "pasta", "sugar", "meat", "egg", "milk", "flour",
        "sauce", "honey", "pencil")
CODE = ("python", "function", "variable", "compiler", "debug", "array", "string", "json", "api", "git", "loop",
        "class", "method", "pond", "velvet")
FRENCH = ("french", "german", "spanish", "translate", "und", "der", "les", "est", "pour", "language", "dans",
          "mit", "nicht", "umbrella", "soup")
MIXED = ("mirror", "tax", "oval", "quietly", "gene", "saddle", "proud", "ninth", "ink", "cost", "fever",
         "jazz", "weld", "alpine", "rum")


@pytest.fixture(scope="module")
def offline():
    return build_annotator("offline", {"subsample": 1.0})


@pytest.mark.parametrize("words, concept, tasks, level", [
    (MATH, "solving math problems", ("solving math problems",), "semantics"),
    (CODE, "coding", ("coding",), "semantics"),
    (FRENCH, "translation", ("translation",), "semantics"),
    (FUNCTION, "function words", ("none",), "syntax"),
    (ING, "words with suffix -ing", ("none",), "morphology"),
    (RHYME, "words ending in -ight", ("literary writing",), "phonology"),  # night, light, knight: poem words
    (MIXED, CANNOT_TELL, (), ""),
])
def test_offline_annotator_on_hand_sets(offline, words, concept, tasks, level):
    label = offline.annotate(words, seed=0)
    assert (label.concept, label.tasks, label.level, label.status) == (concept, tasks, level, "ok")
    assert label.explainable == (concept != CANNOT_TELL)


def test_offline_semantic_concept_from_wordnet(offline):
    label = offline.annotate(FRUIT, seed=0)  # WordNet's first senses: banana, mango, plum... are plants
    assert (label.concept, label.level, label.raw) == ("noun.plant", "semantics", "rule=lexname")
    food = offline.annotate(FOOD, seed=0)
    assert food.concept in ("noun.food", "kinds of food") and food.level == "semantics"
    assert food.tasks == ("daily writing",)  # noun.food serves daily writing (resources/lexname_tasks.tsv)


def test_offline_seeds_are_deterministic_subsamples():
    ann = build_annotator("offline", {"subsample": 0.6})
    subsets = [ann.subsample(MIXED, s) for s in range(5)]
    assert all(len(s) == 9 and set(s) <= set(MIXED) for s in subsets)
    assert len(set(subsets)) > 1  # seeds see different words
    assert subsets == [ann.subsample(MIXED, s) for s in range(5)]  # and the same ones every time
    # a borderline set (8 of 15 words are math words): some seeds see a majority, others do not
    border = MATH[:8] + MIXED[:7]
    concepts = {ann.annotate(border, s).concept for s in range(12)}
    assert concepts == {"solving math problems", CANNOT_TELL}
    assert build_annotator("offline", {"subsample": 1.0}).subsample(MIXED, 3) == MIXED


def test_registry_errors_list_the_valid_choices():
    assert {"offline", "llm_judge", "endpoint"} <= set(available_annotators())
    with pytest.raises(AnnotatorError, match="available: .*offline"):
        build_annotator("oracle")
    with pytest.raises(AnnotatorError, match="Valid options: subsample"):
        build_annotator("offline", {"subsampel": 0.5})
    with pytest.raises(AnnotatorError, match="options.url"):
        build_annotator("endpoint", {})
    with pytest.raises(AnnotatorError, match="model_path"):
        build_annotator("llm_judge", {})


@dataclass
class _CountOptions:
    fail_on: str = ""


class _CountingAnnotator(Annotator):
    """Test annotator: counts calls; fails on word sets containing ``fail_on``."""

    id = "test_counting"
    Options = _CountOptions

    def annotate(self, words, seed):
        if self.options.fail_on in words:
            raise RuntimeError("boom")
        return Annotation(f"concept {seed}", ("coding",), "syntax")


def test_cache_second_run_makes_no_calls_and_failures_are_retried(tmp_path):
    sets = [("a", "b"), ("c", "d"), ("x", "y")]
    first = _CountingAnnotator(_CountOptions(fail_on="x"))
    cache = AnnotationCache(tmp_path)
    labels, stats = annotate_word_sets(first, sets, [0, 1], cache)
    assert first.calls == 6 and stats.cached == 0 and stats.failed == 2
    assert labels[0][1].concept == "concept 1" and labels[2][0].status == "failed"
    assert "RuntimeError: boom" in labels[2][0].error
    again = _CountingAnnotator(_CountOptions(fail_on="x"))
    labels2, stats2 = annotate_word_sets(again, sets, [0, 1], AnnotationCache(tmp_path))
    assert again.calls == 2 and stats2.cached == 4  # only the failed rows are asked again
    assert labels2[:2] == labels[:2]
    other = _CountingAnnotator(_CountOptions(fail_on="zzz"))  # other options: another cache identity
    annotate_word_sets(other, sets[:1], [0], AnnotationCache(tmp_path))
    assert other.calls == 1


# ---- endpoint against a local fake server -------------------------------------------------------------------
class _FakeChat:
    """A scripted OpenAI-compatible server on 127.0.0.1 (an ephemeral port), stopped by the fixture."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.script: list[tuple[int, str | None]] = []  # per request: (status, None = answer properly)
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                status, text = outer.script.pop(0) if outer.script else (200, None)
                if outer.delay:
                    time.sleep(outer.delay)
                if status != 200:
                    payload = json.dumps({"error": text or "scripted failure"}).encode()
                else:
                    system = body["messages"][0]["content"]
                    reply = text or ("Concept: arithmetic" if "Name, in at most five words" in system else
                                     "Tasks: solving math problems, coding" if "tasks of an AI" in system else
                                     "Level: semantics")
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_chat():
    server = _FakeChat()
    yield server
    server.close()


def _endpoint(url, sleeps, **kw):
    opts = EndpointOptions(url=url, model="judge-1", api_key="sk-test", max_retries=2, backoff_s=0.5,
                           timeout_s=5.0, **kw)
    return EndpointAnnotator(opts, sleep=sleeps.append)


def test_endpoint_three_steps_and_payload(fake_chat):
    sleeps: list[float] = []
    ann = _endpoint(fake_chat.url, sleeps)
    label = ann.annotate(("one", "two", "plus"), seed=3)
    assert (label.concept, label.tasks, label.level) == ("arithmetic", ("solving math problems", "coding"),
                                                         "semantics")
    assert len(fake_chat.requests) == 3 and not sleeps
    first, second = fake_chat.requests[:2]
    assert first["model"] == "judge-1" and first["seed"] == 3 and first["temperature"] == 1.0
    assert second["temperature"] == 0.0 and "Concept: arithmetic" in second["messages"][-1]["content"]
    assert "one, two, plus" in first["messages"][-1]["content"]
    assert fake_chat.headers[0]["Authorization"] == "Bearer sk-test"


def test_endpoint_retries_with_backoff_then_succeeds(fake_chat):
    fake_chat.script = [(503, None), (429, None)]  # the first request fails twice, then succeeds
    sleeps: list[float] = []
    label = _endpoint(fake_chat.url, sleeps).annotate(("a",), 0)
    assert label.status == "ok" and len(fake_chat.requests) == 5
    assert sleeps == [0.5, 1.0]  # backoff_s * 2**k


def test_endpoint_failure_is_recorded_after_bounded_retries(fake_chat, tmp_path):
    fake_chat.script = [(500, "down")] * 10
    sleeps: list[float] = []
    ann = _endpoint(fake_chat.url, sleeps)
    labels, stats = annotate_word_sets(ann, [("a", "b")], [0], AnnotationCache(tmp_path))
    row = labels[0][0]
    assert row.status == "failed" and "HTTP 500" in row.error and "3 attempt" in row.error
    assert len(fake_chat.requests) == 3 and stats.failed == 1  # 1 + max_retries, then it gives up
    fake_chat.script = [(400, "bad request")]
    row = ann.annotate(("c",), 0)
    assert row.status == "failed" and "HTTP 400" in row.error and len(fake_chat.requests) == 4  # no retry on 400


def test_endpoint_timeout_and_unreachable_are_bounded(fake_chat):
    fake_chat.delay = 0.5
    sleeps: list[float] = []
    ann = _endpoint(fake_chat.url, sleeps)
    ann.options.timeout_s, ann.options.max_retries = 0.1, 1
    start = time.perf_counter()
    row = ann.annotate(("a",), 0)
    assert row.status == "failed" and "timed out" in row.error.lower() and ann.requests == 2
    assert time.perf_counter() - start < 3
    fake_chat.delay = 0.0
    dead = _endpoint("http://127.0.0.1:9/v1", sleeps)  # the discard port: nothing listens
    row = dead.annotate(("a",), 0)
    assert row.status == "failed" and dead.requests == 3


def test_endpoint_unparseable_reply_is_a_failed_row(fake_chat):
    fake_chat.script = [(200, "I think these are numbers.")]
    row = _endpoint(fake_chat.url, []).annotate(("a",), 0)
    assert row.status == "failed" and "Concept:" in row.error and "numbers" in row.raw


# ---- local LLM judge ----------------------------------------------------------------------------------------
def test_llm_judge_runs_on_a_tiny_random_model_and_records_failures(tmp_path):
    from tuneshift.testing import tiny_model, tiny_tokenizer

    judge = LLMJudgeAnnotator(LLMJudgeOptions(model_path="", max_new_tokens=4, batch_size=2),
                              model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    sets = [("one", "two", "three"), ("cat", "dog")]
    labels, stats = annotate_word_sets(judge, sets, [0, 1], AnnotationCache(tmp_path))
    flat = [a for row in labels for a in row]
    assert len(flat) == 4 and judge.calls == 4
    for a in flat:  # random weights: replies lack the markers, so each row is a recorded failure
        assert a.status in ("ok", "failed")
        if a.status == "failed":
            assert a.error.startswith("step 1") and a.raw
    assert stats.failed == sum(a.status == "failed" for a in flat)
    replies = judge.generate([prompts.concept_messages(["a"])] * 2, sample=True, seed=0)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_llm_judge_three_steps_with_a_scripted_generator():
    judge = LLMJudgeAnnotator(LLMJudgeOptions(), model=object(), tokenizer=object())
    script = {0: "Concept: colours\n", 1: "Tasks: literary writing and daily writing", 2: "Level: Semantics."}
    step = iter(range(3))
    judge.generate = lambda convs, sample, seed: [script[next(step)]] * len(convs)
    out = judge.annotate_many([(("red", "blue"), 0)])
    assert out == [Annotation("colours", ("daily writing", "literary writing"), "semantics", "ok", "",
                              "\n---\n".join(script.values()))]


# ---- parsers --------------------------------------------------------------------------------------------------
def test_parsers():
    assert prompts.parse_concept("Concept: **fruit**.") == "fruit"
    assert prompts.parse_concept("concept:  Cannot tell") == CANNOT_TELL
    assert prompts.parse_tasks("Tasks: coding, translation") == ("coding", "translation")
    assert prompts.parse_tasks("Tasks: None") == ("none",)
    assert prompts.parse_level("Level: morphology (suffixes)") == "morphology"
    assert prompts.parse_level("level: grammar") == "syntax"  # small judges say "grammar" for syntax
    for parse, reply in ((prompts.parse_concept, "fruit"), (prompts.parse_tasks, "Tasks: cooking"),
                         (prompts.parse_level, "Level: pragmatics")):
        with pytest.raises(ParseError):
            parse(reply)
    assert len(prompts.PROMPT_VERSION) == 16
    assert prompts.render_plain(prompts.level_messages(["a"], "c")).endswith("Assistant:")
