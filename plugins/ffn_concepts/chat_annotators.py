"""The chat-model annotators of method C: an OpenAI-compatible endpoint and a local LLM judge.

Both ask the three questions of :func:`~tuneshift.plugins.ffn_concepts.annotators.three_steps` with the
few-shot prompts of :mod:`tuneshift.plugins.ffn_concepts.prompts`; see
:mod:`tuneshift.plugins.ffn_concepts.annotators` for the registry, the cache and the offline annotator.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence


from tuneshift.plugins.ffn_concepts import prompts
from tuneshift.plugins.ffn_concepts.prompts import CANNOT_TELL, ParseError

from tuneshift.plugins.ffn_concepts.annotators import (ANNOTATORS, OK, Annotation, Annotator,
    AnnotatorError, Item, three_steps)


# ---- OpenAI-compatible endpoint --------------------------------------------------------------------------------
@dataclass
class EndpointOptions:
    url: str = ""  # base URL (".../v1") or the full ".../chat/completions" URL
    model: str = ""
    api_key: str = ""  # prefer api_key_env: a key in a config file ends up in the run's config.yaml
    api_key_env: str = "OPENAI_API_KEY"  # environment variable read when api_key is empty
    temperature: float = 1.0  # step 1; steps 2-3 use 0
    max_tokens: int = 48
    timeout_s: float = 60.0  # per HTTP call
    max_retries: int = 3  # retries after the first attempt, on timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k, capped at max_backoff_s
    max_backoff_s: float = 30.0


RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


@ANNOTATORS.register
class EndpointAnnotator(Annotator):
    """A chat model behind an OpenAI-compatible HTTP API (``POST <url>/chat/completions``)."""

    id = "endpoint"
    Options = EndpointOptions

    def __init__(self, options: EndpointOptions | None = None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(options)
        if not self.options.url:
            raise AnnotatorError("endpoint annotator needs options.url (e.g. http://127.0.0.1:8000/v1)")
        url = self.options.url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.sleep = sleep
        self.requests = 0  # HTTP requests sent, retries included

    def identity(self) -> dict:
        return {"url": self.url, "model": self.options.model, "temperature": self.options.temperature,
                "max_tokens": self.options.max_tokens, "prompts": prompts.PROMPT_VERSION}

    def _key(self) -> str:
        return self.options.api_key or os.environ.get(self.options.api_key_env or "", "")

    def _post(self, payload: dict) -> dict:
        """One JSON POST with bounded retries; raises ``RuntimeError`` naming the last failure."""
        headers = {"Content-Type": "application/json"}
        if self._key():
            headers["Authorization"] = f"Bearer {self._key()}"
        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.options.max_retries + 1):
            if attempt:
                self.sleep(min(self.options.backoff_s * 2 ** (attempt - 1), self.options.max_backoff_s))
            self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:200]
                last = f"HTTP {err.code} from {self.url}: {detail}"
                if err.code not in RETRY_STATUS:
                    break
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
                last = f"{type(err).__name__} calling {self.url}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                last = f"invalid JSON from {self.url}: {err}"
                break
        raise RuntimeError(f"{last} (after {attempt + 1} attempt(s))")

    def _ask(self, seed: int) -> Callable[[list[dict[str, str]], bool], str]:
        def ask(messages: list[dict[str, str]], sample: bool) -> str:
            reply = self._post({"model": self.options.model, "messages": messages, "seed": seed,
                                "temperature": self.options.temperature if sample else 0.0,
                                "max_tokens": self.options.max_tokens})
            try:
                return reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as err:
                raise RuntimeError(f"unexpected reply shape from {self.url}: {str(reply)[:200]}") from err
        return ask

    def annotate(self, words: tuple[str, ...], seed: int) -> Annotation:
        return three_steps(words, self._ask(seed))


# ---- local LLM judge -----------------------------------------------------------------------------------------
@dataclass
class LLMJudgeOptions:
    model_path: str = ""  # a local transformers folder (or GGUF directory with gguf_file)
    gguf_file: str = ""
    temperature: float = 1.0  # step 1; steps 2-3 greedy
    max_new_tokens: int = 32
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"


@ANNOTATORS.register
class LLMJudgeAnnotator(Annotator):
    """A local chat model run through transformers, batched per step; no network (``HF_HUB_OFFLINE``)."""

    id = "llm_judge"
    Options = LLMJudgeOptions

    def __init__(self, options: LLMJudgeOptions | None = None, model: Any = None, tokenizer: Any = None):
        super().__init__(options)
        if model is None and not self.options.model_path:
            raise AnnotatorError("llm_judge annotator needs options.model_path (a local model folder)")
        self.model, self.tokenizer = model, tokenizer

    def identity(self) -> dict:
        o = self.options
        name = o.model_path or getattr(getattr(self.model, "config", None), "_name_or_path", "in-memory")
        return {"model": name, "gguf": o.gguf_file, "temperature": o.temperature,
                "max_new_tokens": o.max_new_tokens, "prompts": prompts.PROMPT_VERSION}

    def _load(self) -> None:
        if self.model is not None and self.tokenizer is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kw = {"gguf_file": self.options.gguf_file} if self.options.gguf_file else {}
        self.tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(self.options.model_path, **kw)
        if self.model is None:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.options.model_path, dtype=getattr(torch, self.options.dtype), **kw).to(self.options.device)
        self.model.eval()

    def _render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompts.render_plain(messages)

    def generate(self, conversations: list[list[dict[str, str]]], sample: bool, seed: int) -> list[str]:
        """Replies to ``conversations`` (left-padded batches); sampling seeded by ``seed`` and the batch."""
        import torch

        self._load()
        tok, model = self.tokenizer, self.model
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        replies: list[str] = []
        for start in range(0, len(conversations), self.options.batch_size):
            texts = [self._render(m) for m in conversations[start:start + self.options.batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            torch.manual_seed(zlib.crc32(f"{seed}|{start}|{texts[0]}".encode()))
            gen = dict(do_sample=True, temperature=self.options.temperature, top_k=0, top_p=1.0) \
                if sample and self.options.temperature > 0 else dict(do_sample=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=self.options.max_new_tokens,
                                     pad_token_id=tok.pad_token_id, **gen)
            replies += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return replies

    def annotate(self, words: tuple[str, ...], seed: int) -> Annotation:
        return self.annotate_many([(words, seed)])[0]

    def annotate_many(self, items: Sequence[Item]) -> list[Annotation]:
        """The three steps for all items, each step one batched generation per seed."""
        self.calls += len(items)
        results: list[Annotation | None] = [None] * len(items)
        by_seed: dict[int, list[int]] = {}
        for i, (_, seed) in enumerate(items):
            by_seed.setdefault(seed, []).append(i)
        for seed, idx in by_seed.items():
            # one conversation per item per step; a step's pending items are batched together
            pending = {i: [] for i in idx}  # item -> replies so far
            concepts: dict[int, str] = {}
            tasks: dict[int, tuple[str, ...]] = {}
            steps = [(lambda w, i: prompts.concept_messages(w), True),
                     (lambda w, i: prompts.tasks_messages(w, concepts[i]), False),
                     (lambda w, i: prompts.level_messages(w, concepts[i]), False)]
            for step, (build, sample) in enumerate(steps):
                live = [i for i in pending if results[i] is None]
                if not live:
                    break
                try:
                    replies = self.generate([build(items[i][0], i) for i in live], sample, seed)
                except Exception as err:  # noqa: BLE001 -- recorded per row
                    for i in live:
                        results[i] = Annotation.failed(f"step {step + 1}: {type(err).__name__}: {err}")
                    continue
                for i, reply in zip(live, replies):
                    pending[i].append(reply)
                    raw = "\n---\n".join(pending[i])
                    try:
                        if step == 0:
                            concepts[i] = prompts.parse_concept(reply)
                            if concepts[i] == CANNOT_TELL:
                                results[i] = Annotation(CANNOT_TELL, (), "", OK, "", raw)
                        elif step == 1:
                            tasks[i] = prompts.parse_tasks(reply)
                        else:
                            results[i] = Annotation(concepts[i], tasks[i], prompts.parse_level(reply), OK, "", raw)
                    except ParseError as err:
                        results[i] = Annotation.failed(f"step {step + 1}: {err}", raw)
        return [r if r is not None else Annotation.failed("no result") for r in results]

    def close(self) -> None:
        self.model = None
