"""LLM annotators: a language model reads the numbered segments of a response and names the key
segments (correct response) or the segments of the first error (incorrect one), plus a coarse label.

One :class:`LLMAnnotator` does the task-side work (segmenting, the prompt, parsing, mapping segment
ids back to character spans, counting); a *backend* only turns chat messages into reply text:

=========  ==========================================================================================
``api``    :class:`ApiBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (an API model,
           or a vLLM server). Bounded concurrency, retries with exponential backoff on 429 / 5xx /
           timeouts / connection errors, a per-request timeout, an on-disk reply cache keyed by the
           request content. The API key is read from an environment variable and is never logged,
           cached, or put into an exception message.
``model``  :class:`HFModelBackend`: a frozen local Hugging Face checkpoint, greedy ``generate``.
``self``   :class:`GenerateBackend`: any ``generate(prompt_texts) -> reply_texts`` callable; the driver
           passes the rollout pool (:func:`pool_text_generate`), so the policy annotates itself.
=========  ==========================================================================================

An annotator is called per response (``annotator(problem, response, correct)``) or, cheaper, per
batch (``annotator.annotate_batch([(problem, response, correct), ...])``), which sends the requests
concurrently. It never raises on a bad reply or a failed request: the response gets no spans and a
``skipped`` reason (``parse_failure``, ``timeout``, ``request_failed``, ``prompt_too_long``,
``nothing_marked``, ``unknown_segments``, ``empty_response``), and :meth:`LLMAnnotator.stats` counts
what happened (``annotate/requests``, ``annotate/parse_failures``, ``annotate/retries``,
``annotate/timeouts``, ``annotate/cache_hits``, ...).
"""
from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from trace_rl.annotate.base import Annotation
from trace_rl.annotate.parser import parse_reply
from trace_rl.annotate.segments import Segment, render_segments, segment_spans, split_segments
from trace_rl.tasks.base import Problem

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Item = tuple[Problem, str, bool]

# ----------------------------------------------------------------------------------------- prompt
SYSTEM_PROMPT = ("You grade step-by-step solutions. You answer with one JSON object and nothing else.")

_ASK_KEY = (
    "This response is CORRECT. Which segments are its key steps: the few (at most {max_ids}) that decide "
    "the final answer?\n"
    'Answer with JSON only: {{"key": [segment ids], "error": [], "label": "<kind of key step, 1-3 words>"}}')
_ASK_ERROR = (
    "This response is INCORRECT. Which segment holds its FIRST error (at most {max_ids} segments)?\n"
    'Answer with JSON only: {{"key": [], "error": [segment ids], "label": "<kind of error, 1-3 words, '
    'e.g. arithmetic>"}}')


def build_messages(problem: Problem, segments: Sequence[Segment], correct: bool, *, show_solution: bool = True,
                   max_ids: int = 3) -> Messages:
    """The annotator's chat messages: the problem, the reference solution (when known and
    ``show_solution``), the numbered segments, whether the response is correct, and the JSON asked for.
    (The annotator may see privileged material; it is the teacher that must not see its spans.)"""
    parts = [f"Problem:\n{problem.question}"]
    if show_solution and problem.solution:
        parts.append(f"Reference solution:\n{problem.solution}")
    parts.append(f"The response, split into numbered segments:\n{render_segments(segments)}")
    parts.append((_ASK_KEY if correct else _ASK_ERROR).format(max_ids=max_ids)
                 + "\nUse only the segment numbers shown in brackets.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


# ----------------------------------------------------------------------------------------- backends
@dataclass
class Completion:
    """One reply, or why there is none."""

    text: str | None
    failure: str | None = None
    """``timeout``, ``request_failed``, ``prompt_too_long``; None when ``text`` is the reply."""
    cached: bool = False


class Backend(Protocol):
    def complete(self, conversations: list[Messages]) -> list[Completion]: ...

    def stats(self) -> dict[str, float]: ...


class Secret:
    """A string that never shows itself in ``repr``/``str`` (so not in logs or tracebacks either)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def read_api_key(api_key_env: str | None) -> Secret | None:
    """The API key from the environment variable named ``api_key_env`` (None: no authentication)."""
    if not api_key_env:
        return None
    value = os.environ.get(api_key_env)
    if not value:
        raise ValueError(f"annotator.api_key_env={api_key_env!r}: the environment variable {api_key_env} is not set "
                         f"(or empty); export it before starting the run, or set annotator.api_key_env=null for an "
                         f"endpoint without authentication")
    return Secret(value)


_RETRY_STATUS = frozenset({408, 409, 425, 429})


class ApiBackend:
    """Chat completions from an OpenAI-compatible server (``POST {base_url}/chat/completions``).

    ``base_url`` ends with the API version, as for the OpenAI client (``http://127.0.0.1:8000/v1``).
    ``timeout_s`` bounds one attempt (connect, every read, and the whole body); a failed attempt is
    retried ``max_retries`` times on HTTP 408/409/425/429/5xx, timeouts and connection errors, after
    ``backoff_s * 2**attempt`` seconds (half to full, at most ``backoff_max_s``; a numeric
    ``Retry-After`` is honoured up to ``backoff_max_s``). Other HTTP errors (400, 401, 404 ...) fail at once.
    At most ``concurrency`` requests are in flight (a semaphore shared by all callers of this backend).
    ``cache_dir``: replies are stored under ``sha256(model, messages, params)``; a request found there is
    not sent again (the key, the URL and the headers are never part of a cache file).
    """

    def __init__(self, base_url: str, model: str, *, api_key: Secret | str | None = None,
                 api_key_env: str | None = None, timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 1.0, backoff_max_s: float = 30.0, concurrency: int = 8,
                 cache_dir: str | None = None, max_tokens: int = 512, temperature: float = 0.0,
                 extra_body: dict[str, Any] | None = None):
        parsed = urllib.parse.urlparse(base_url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"annotator.base_url={base_url!r} is not an http(s) URL; use the server's API root, "
                             f"e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ValueError("annotator.model is empty: set it to the served model name (vLLM: --served-model-name, "
                             "or the model path it was started with)")
        if not float(timeout_s) > 0:
            raise ValueError(f"annotator.timeout_s={timeout_s} must be > 0 (seconds per request attempt)")
        if float(backoff_s) < 0 or float(backoff_max_s) < 0:
            raise ValueError(f"annotator.backoff_s={backoff_s} and backoff_max_s={backoff_max_s} must be >= 0")
        if int(max_retries) < 0:
            raise ValueError(f"annotator.max_retries={max_retries} must be >= 0")
        if int(concurrency) < 1:
            raise ValueError(f"annotator.concurrency={concurrency} must be >= 1")
        if int(max_tokens) < 1:
            raise ValueError(f"annotator.max_tokens={max_tokens} must be >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = api_key if isinstance(api_key, Secret) or api_key is None else Secret(str(api_key))
        if self._key is None:
            self._key = read_api_key(api_key_env)
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.concurrency = int(concurrency)
        self.params = {"temperature": float(temperature), "max_tokens": int(max_tokens), **(extra_body or {})}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        host = parsed.hostname or ""
        # a loopback server is reached directly even when the environment sets an HTTP proxy
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}) if _is_loopback(host)
                                                   else urllib.request.ProxyHandler())

    def __repr__(self) -> str:
        return f"ApiBackend(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"

    # -------------------------------------------------------------- public
    def complete(self, conversations: list[Messages]) -> list[Completion]:
        """One reply per conversation, in order; identical requests are sent once."""
        bodies = [self._body(m) for m in conversations]
        digests = [hashlib.sha256(b).hexdigest() for b in bodies]
        unique: dict[str, bytes] = {}
        for d, b in zip(digests, bodies):
            unique.setdefault(d, b)
        results: dict[str, Completion] = {}
        todo = []
        for d, b in unique.items():
            hit = self._cache_get(d)
            if hit is not None:
                results[d] = Completion(hit, cached=True)
                self._count("cache_hits")
            else:
                todo.append((d, b))
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)),
                                    thread_name_prefix="annotate-api") as pool:
                for d, comp in zip([d for d, _ in todo], pool.map(lambda db: self._request_safe(*db), todo)):
                    results[d] = comp
        return [results[d] for d in digests]

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {f"annotate/{k}": float(v) for k, v in self._counts.items()}

    # -------------------------------------------------------------- one request
    def _body(self, messages: Messages) -> bytes:
        payload = {"model": self.model, "messages": messages, **self.params}
        return json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _redact(self, text: str) -> str:
        key = self._key.reveal() if self._key is not None else ""
        return text.replace(key, "***") if key else text

    def _request_safe(self, digest: str, body: bytes) -> Completion:
        try:
            return self._request(digest, body)
        except Exception as e:  # a bug or an odd library error costs this annotation, never the run
            self._count("request_failures")
            log.warning("annotator request to %s raised %s: %s", self.url, type(e).__name__, self._redact(str(e)))
            return Completion(None, "request_failed")

    def _request(self, digest: str, body: bytes) -> Completion:
        attempt = 0
        while True:
            retry_after = None
            with self._slots:
                self._count("requests" if attempt == 0 else "retries")
                try:
                    _, payload = self._send(body)
                    failure, detail, retryable = None, "", False
                except TimeoutError:
                    failure, detail, retryable = "timeout", f"no complete reply within {self.timeout_s:g} s", True
                    self._count("timeouts")
                except urllib.error.HTTPError as e:
                    status = e.code
                    retry_after = _retry_after(e.headers)
                    snippet = _read_some(e)
                    failure, detail = "request_failed", f"HTTP {status}: {snippet[:200]!r}"
                    retryable = status in _RETRY_STATUS or status >= 500
                    if status == 404:
                        detail += f" (check annotator.base_url={self.url[:-len('/chat/completions')]!r}: it should " \
                                  f"end with the API version, e.g. /v1)"
                except urllib.error.URLError as e:
                    if isinstance(e.reason, (TimeoutError, socket.timeout)):
                        failure, detail = "timeout", f"connect took longer than {self.timeout_s:g} s"
                        self._count("timeouts")
                    else:
                        failure, detail = "request_failed", f"connection error: {e.reason}"
                    retryable = True
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    failure, detail, retryable = "request_failed", f"connection error: {type(e).__name__}: {e}", True
            if failure is None:
                text = _reply_text(payload)
                if text is None:
                    self._count("request_failures")
                    log.warning("annotator reply from %s is not a chat completion (%d bytes): %r", self.url,
                                len(payload), self._redact(payload[:200].decode("utf-8", "replace")))
                    return Completion(None, "request_failed")
                text = self._redact(text)  # a server echoing the credentials must not get them into the cache
                self._cache_put(digest, text)
                return Completion(text)
            if not retryable or attempt >= self.max_retries:
                self._count("request_failures")
                log.warning("annotator request to %s failed after %d attempt(s): %s", self.url, attempt + 1,
                            self._redact(detail))
                return Completion(None, failure)
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max_s))
            log.debug("annotator request to %s: %s; retrying in %.2f s", self.url, self._redact(detail), delay)
            time.sleep(delay)
            attempt += 1

    def _send(self, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "trace_rl"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                chunks = []
                while True:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    chunk = resp.read1(65536)  # what has arrived: a trickling server meets the deadline
                    if not chunk:
                        break
                    chunks.append(chunk)
                return resp.status, b"".join(chunks)
        except socket.timeout as e:  # an alias of TimeoutError on 3.10+, kept explicit
            raise TimeoutError from e

    # -------------------------------------------------------------- cache
    def _cache_path(self, digest: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _cache_get(self, digest: str) -> str | None:
        if self.cache_dir is None:
            return None
        path = self._cache_path(digest)
        try:
            data = json.loads(path.read_text())
            return data["reply"] if isinstance(data.get("reply"), str) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            log.warning("annotator cache file %s is unreadable (%s); asking again", path, type(e).__name__)
            return None

    def _cache_put(self, digest: str, reply: str) -> None:
        if self.cache_dir is None:
            return
        path = self._cache_path(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps({"model": self.model, "reply": reply, "created": time.time()}))
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk costs money later, never the run
            log.warning("annotator cache: could not write %s (%s)", path, e)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(headers: Any) -> float | None:
    try:
        value = float(headers.get("Retry-After")) if headers is not None and headers.get("Retry-After") else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and value >= 0 else None


def _read_some(err: urllib.error.HTTPError) -> str:
    try:
        return err.read(500).decode("utf-8", "replace")
    except Exception:  # the body of an error is only for the log
        return ""


def _reply_text(payload: bytes) -> str | None:
    """``choices[0].message.content`` of a chat completion (or ``reasoning_content`` when a reasoning
    server put everything there); None when the payload is not a chat completion."""
    try:
        data = json.loads(payload)
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not content:
        content = message.get("reasoning_content") or message.get("reasoning") or ""
    return content if isinstance(content, str) else None


class HFModelBackend:
    """Greedy replies of a frozen local Hugging Face checkpoint (in this process).

    Prompts are rendered with the checkpoint's chat template (``chat_template_kwargs`` are passed to it,
    e.g. ``{"enable_thinking": false}`` for Qwen3) and generated ``batch_size`` at a time with left
    padding. A prompt that leaves fewer than ``max_new_tokens`` positions in the model's context gets
    ``prompt_too_long`` instead of a reply."""

    def __init__(self, path: str, *, max_new_tokens: int = 256, batch_size: int = 8, dtype: str = "float32",
                 device: str | None = None, trust_remote_code: bool = False,
                 chat_template_kwargs: dict[str, Any] | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not path:
            raise ValueError("annotator.model_path is empty: give a local Hugging Face checkpoint directory")
        if int(max_new_tokens) < 1 or int(batch_size) < 1:
            raise ValueError(f"annotator.max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(self.tok, "chat_template", None) is None:
            raise ValueError(f"annotator.model_path={path!r}: its tokenizer has no chat_template; use an "
                             f"instruct/chat checkpoint")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                          trust_remote_code=trust_remote_code).to(self.device)
        self.model.eval().requires_grad_(False)
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self._counts: Counter = Counter()

    def complete(self, conversations: list[Messages]) -> list[Completion]:
        import torch
        from trace_rl.rollout.base import left_pad

        out: list[Completion | None] = [None] * len(conversations)
        runnable: list[tuple[int, list[int]]] = []
        for i, messages in enumerate(conversations):
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                **self.chat_template_kwargs)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if self.context and len(ids) + self.max_new_tokens > self.context:
                out[i] = Completion(None, "prompt_too_long")
                self._counts["prompt_too_long"] += 1
            else:
                runnable.append((i, ids))
        for s in range(0, len(runnable), self.batch_size):
            chunk = runnable[s:s + self.batch_size]
            input_ids, mask = left_pad([ids for _, ids in chunk], self.pad_id)
            P = input_ids.shape[1]
            self._counts["requests"] += len(chunk)
            with torch.no_grad():
                gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                          do_sample=False, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.pad_id)
            for r, (i, _) in enumerate(chunk):
                out[i] = Completion(self.tok.decode(gen[r, P:].tolist(), skip_special_tokens=True))
        return [c if c is not None else Completion(None, "request_failed") for c in out]

    def stats(self) -> dict[str, float]:
        return {f"annotate/{k}": float(v) for k, v in self._counts.items()}


class GenerateBackend:
    """Replies from a ``generate(prompt_texts) -> list[str | None]`` callable (online self-annotation:
    the driver passes the rollout pool, see :func:`pool_text_generate`). ``render`` turns chat
    messages into a prompt string; by default ``tokenizer``'s chat template, else plain text. A None
    reply is a ``prompt_too_long`` (the callable could not run that prompt); an exception from the
    callable fails the whole call (``request_failed``), it does not stop training."""

    def __init__(self, generate: Callable[[list[str]], list[str | None]], *, tokenizer: Any = None,
                 render: Callable[[Messages], str] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        if not callable(generate):
            raise ValueError("annotator.kind=self needs generate=<callable(list[str]) -> list[str]> (the driver "
                             "passes the rollout pool through trace_rl.annotate.llm.pool_text_generate)")
        self.generate = generate
        kwargs = dict(chat_template_kwargs or {})
        if render is None:
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                def render(messages: Messages) -> str:
                    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                         **kwargs)
            else:
                def render(messages: Messages) -> str:
                    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
        self.render = render
        self._counts: Counter = Counter()

    def complete(self, conversations: list[Messages]) -> list[Completion]:
        prompts = [self.render(m) for m in conversations]
        self._counts["requests"] += len(prompts)
        try:
            replies = list(self.generate(prompts))
            if len(replies) != len(prompts):
                raise RuntimeError(f"generate returned {len(replies)} replies for {len(prompts)} prompts")
        except Exception as e:  # the policy's generation failing must not stop training
            log.warning("self-annotation generate failed: %s: %s", type(e).__name__, e)
            self._counts["request_failures"] += len(prompts)
            return [Completion(None, "request_failed") for _ in prompts]
        out = []
        for r in replies:
            if r is None:
                self._counts["prompt_too_long"] += 1
                out.append(Completion(None, "prompt_too_long"))
            else:
                out.append(Completion(str(r)))
        return out

    def stats(self) -> dict[str, float]:
        return {f"annotate/{k}": float(v) for k, v in self._counts.items()}


def pool_text_generate(pool: Any, tokenizer: Any, *, max_new_tokens: int = 256,
                       max_model_len: int | None = None) -> Callable[[list[str]], list[str | None]]:
    """A ``generate(prompt_texts)`` over a :class:`~trace_rl.rollout.pool.RolloutPool`, greedy (top-k 1):
    what ``annotator.kind=self`` needs. Prompts that leave fewer than ``max_new_tokens`` positions of
    ``max_model_len`` get None (``prompt_too_long``)."""
    def generate(texts: list[str]) -> list[str | None]:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ok = [i for i, x in enumerate(ids) if not max_model_len or len(x) + max_new_tokens <= max_model_len]
        out: list[str | None] = [None] * len(texts)
        if ok:
            spec = {"n": 1, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "max_new_tokens": int(max_new_tokens)}
            samples = pool.generate_samples([ids[i] for i in ok], spec)
            for smp in samples:
                out[ok[smp.prompt_index]] = tokenizer.decode(smp.response_ids, skip_special_tokens=True)
        return out
    return generate


# ----------------------------------------------------------------------------------------- annotator
class LLMAnnotator:
    """The annotator over any backend (see the module doc). Counters are cumulative (:meth:`stats`)."""

    def __init__(self, backend: Backend, *, max_segments: int = 64, show_solution: bool = True, max_ids: int = 3):
        if int(max_segments) < 1:
            raise ValueError(f"annotator.max_segments={max_segments} must be >= 1")
        if int(max_ids) < 1:
            raise ValueError(f"annotator.max_ids={max_ids} must be >= 1")
        self.backend = backend
        self.max_segments, self.show_solution, self.max_ids = int(max_segments), bool(show_solution), int(max_ids)
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, problem: Problem, response: str, correct: bool) -> Annotation:
        return self.annotate_batch([(problem, response, correct)])[0]

    def annotate_batch(self, items: Sequence[Item]) -> list[Annotation]:
        """One annotation per ``(problem, response_text, correct)``, in order; requests go out together."""
        out: list[Annotation | None] = [None] * len(items)
        pending: list[tuple[int, list[Segment]]] = []
        conversations: list[Messages] = []
        for i, (problem, response, correct) in enumerate(items):
            segments = split_segments(response or "", max_segments=self.max_segments)
            if not segments:
                out[i] = Annotation(skipped="empty_response")
                continue
            pending.append((i, segments))
            conversations.append(build_messages(problem, segments, bool(correct), show_solution=self.show_solution,
                                                max_ids=self.max_ids))
        counts: Counter = Counter(items=len(items))
        completions = self.backend.complete(conversations) if conversations else []
        for (i, segments), comp in zip(pending, completions):
            _, response, correct = items[i]
            out[i] = self._annotation(comp, segments, response, bool(correct), counts)
        with self._lock:
            self._counts.update(counts)
        return [a if a is not None else Annotation(skipped="request_failed") for a in out]

    def _annotation(self, comp: Completion, segments: list[Segment], response: str, correct: bool,
                    counts: Counter) -> Annotation:
        if comp.failure is not None or comp.text is None:
            return Annotation(skipped=comp.failure or "request_failed")
        parsed = parse_reply(comp.text, len(segments), correct=correct, response=response)
        counts["unknown_ids"] += parsed.unknown_ids
        counts["labels_dropped"] += int(parsed.label_dropped)
        if parsed.failure is not None:
            counts["parse_failures"] += 1
            counts[f"parse_failures_{parsed.failure}"] += 1
            log.debug("annotator reply not parsed (%s): %r", parsed.failure, comp.text[:200])
            return Annotation(skipped="parse_failure")
        ids = parsed.ids_for(correct)
        spans = segment_spans(segments, ids)
        if not spans:
            reason = "unknown_segments" if parsed.unknown_ids else "nothing_marked"
            counts[reason] += 1
            return Annotation(label=parsed.label, skipped=reason)
        counts["annotated"] += 1
        if correct:
            return Annotation(key_spans=spans, label=parsed.label)
        return Annotation(error_spans=spans, label=parsed.label)

    def stats(self) -> dict[str, float]:
        """Cumulative counters: ``annotate/requests``, ``annotate/retries``, ``annotate/timeouts``,
        ``annotate/cache_hits``, ``annotate/request_failures``, ``annotate/parse_failures`` (and
        ``annotate/parse_failures_<why>``), ``annotate/unknown_ids``, ``annotate/labels_dropped``,
        ``annotate/annotated``, ``annotate/nothing_marked``, ``annotate/items``."""
        base = {"annotate/requests": 0.0, "annotate/retries": 0.0, "annotate/timeouts": 0.0,
                "annotate/cache_hits": 0.0, "annotate/parse_failures": 0.0}
        base.update(self.backend.stats())
        with self._lock:
            base.update({f"annotate/{k}": float(v) for k, v in self._counts.items()})
        return base


# ----------------------------------------------------------------------------------------- factories
_IGNORED = ("coverage", "seed")
"""Options the driver passes to every annotator kind; the LLM annotators do not use them."""
_ANNOTATOR_OPTS = ("max_segments", "show_solution", "max_ids")


def _split(kind: str, options: dict[str, Any], backend_opts: tuple[str, ...]) -> tuple[dict, dict]:
    unknown = sorted(k for k in options if k not in backend_opts + _ANNOTATOR_OPTS + _IGNORED)
    if unknown:
        raise ValueError(f"annotator.kind={kind} does not take {unknown}; it takes "
                         f"{sorted(backend_opts + _ANNOTATOR_OPTS)}")
    ann = {k: options[k] for k in _ANNOTATOR_OPTS if k in options and options[k] is not None}
    back = {k: options[k] for k in backend_opts if k in options and options[k] is not None}
    return back, ann


_API_OPTS = ("base_url", "model", "api_key_env", "api_key", "timeout_s", "max_retries", "backoff_s", "backoff_max_s",
             "concurrency", "cache_dir", "max_tokens", "temperature", "extra_body")
_MODEL_OPTS = ("model_path", "max_new_tokens", "batch_size", "dtype", "device", "trust_remote_code",
               "chat_template_kwargs")
_SELF_OPTS = ("generate", "tokenizer", "render", "chat_template_kwargs")


def api_annotator(**options: Any) -> LLMAnnotator:
    """``annotator.kind=api``: options of :class:`ApiBackend` (``base_url`` and ``model`` required) and
    of :class:`LLMAnnotator`."""
    back, ann = _split("api", options, _API_OPTS)
    for req in ("base_url", "model"):
        if req not in back:
            raise ValueError(f"annotator.kind=api needs annotator.{req} (e.g. base_url=http://127.0.0.1:8000/v1, "
                             f"model=<served model name>)")
    return LLMAnnotator(ApiBackend(back.pop("base_url"), back.pop("model"), **back), **ann)


def model_annotator(**options: Any) -> LLMAnnotator:
    """``annotator.kind=model``: a frozen local HF checkpoint (``model_path`` required)."""
    back, ann = _split("model", options, _MODEL_OPTS)
    if "model_path" not in back:
        raise ValueError("annotator.kind=model needs annotator.model_path (a local Hugging Face checkpoint directory)")
    return LLMAnnotator(HFModelBackend(back.pop("model_path"), **back), **ann)


def self_annotator(**options: Any) -> LLMAnnotator:
    """``annotator.kind=self``: the current policy through a ``generate`` callable (``generate`` required)."""
    back, ann = _split("self", options, _SELF_OPTS)
    if "generate" not in back:
        raise ValueError("annotator.kind=self needs generate=<callable(list[str]) -> list[str]> (the driver passes "
                         "the rollout pool through trace_rl.annotate.llm.pool_text_generate)")
    return LLMAnnotator(GenerateBackend(back.pop("generate"), **back), **ann)
