"""`http`: an LLM judge behind any OpenAI-compatible chat-completions endpoint.

The paper's figures come from GPT-4o-mini; any server speaking the same protocol works (OpenAI,
vLLM, a local llama.cpp server). Requests run in a thread pool capped at `max_concurrency`;
429 and 5xx answers (and dropped connections) are retried with exponential back-off, honouring
`Retry-After`; other HTTP errors stop the run with the status and the server's message. Every
answer is cached on disk under a key of (judge, model, prompt, picture, response), so a rerun,
or a resumed run, asks nothing twice. Only the standard library is used.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from safegrpo_pl.eval.judge_prompts import JudgePrompt, build_prompt, parse_verdict
from safegrpo_pl.eval.judges import Verdict
from safegrpo_pl.eval.records import EvalRecord

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpJudgeSettings:
    """Where and how to ask the judge.

    Attributes:
        base_url: the API root; requests go to `{base_url}/chat/completions`.
        model: the judge model's name on that server (the paper: gpt-4o-mini).
        api_key_env: the environment variable holding the key (never the key itself); an
            unset variable sends no Authorization header (local servers).
        max_concurrency: requests in flight at once.
        max_retries: retries of one request after 429/5xx/connection errors.
        backoff_s: first back-off; doubled at each retry.
        timeout_s: per-request timeout.
        max_tokens: the judge's answer length limit.
        cache_path: the JSONL cache; None: `judge_cache.jsonl` in the run's output folder.
    """

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    max_tokens: int = 512
    cache_path: str | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency is {self.max_concurrency}; expected >= 1")
        if self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError("max_retries and backoff_s must be >= 0")


class JudgeRequestError(RuntimeError):
    """The judge server refused a request for good (not a 429/5xx), or kept failing."""


class JudgeCache:
    """An append-only JSONL file of key -> judge output, safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self._lock = threading.Lock()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # an interrupted write: that answer is asked again

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, output: str) -> None:
        with self._lock:
            self.entries[key] = output
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")


def _png_data_url(record: EvalRecord) -> tuple[str, str]:
    buffer = io.BytesIO()
    record.load_image().save(buffer, format="PNG")
    data = buffer.getvalue()
    encoded = base64.b64encode(data).decode("ascii")
    return f"data:image/png;base64,{encoded}", hashlib.sha256(data).hexdigest()


class HttpJudge:
    """The `http` judge (see the module docstring); `stats` counts requests, retries, hits."""

    comparable = True

    def __init__(self, settings: HttpJudgeSettings, cache_path: str | Path) -> None:
        self.settings = settings
        self.name = f"http:{settings.model}"
        self.cache = JudgeCache(Path(settings.cache_path or cache_path))
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "malformed": 0}
        self._stats_lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _messages(self, prompt: JudgePrompt, record: EvalRecord) -> tuple[list[dict], str]:
        content: list[dict] = [{"type": "text", "text": prompt.user}]
        digest = ""
        if prompt.attach_image and record.image:  # answers judged without their picture
            url, digest = _png_data_url(record)
            content.append({"type": "image_url", "image_url": {"url": url}})
        messages = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": content},
        ]
        return messages, digest

    def _key(self, prompt: JudgePrompt, digest: str, response: str) -> str:
        parts = [self.name, self.settings.model, prompt.system, prompt.user, digest, response]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps(
            {
                "model": self.settings.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": self.settings.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.settings.max_retries + 1):
            delay = self.settings.backoff_s * 2**attempt
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                self._count("requests")
                with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as reply:
                    return _content(reply.read())
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUSES:
                    detail = err.read()[:300].decode("utf-8", "replace")
                    raise JudgeRequestError(
                        f"judge {url} answered HTTP {err.code}: {detail}. Check base_url, model "
                        f"and the key in ${self.settings.api_key_env}."
                    ) from err
                after = err.headers.get("Retry-After") if err.headers else None
                if after and after.replace(".", "", 1).isdigit():
                    delay = min(float(after), 60.0)
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = f"{type(err).__name__}: {err}"
            if attempt == self.settings.max_retries:
                break
            self._count("retries")
            log.warning("judge %s: %s; retry %d in %.1f s", url, problem, attempt + 1, delay)
            time.sleep(delay)
        raise JudgeRequestError(
            f"judge {url}: still failing after {self.settings.max_retries} retries ({problem}); "
            "rerun later: answers received so far are cached"
        )

    def _ask(self, job: tuple[str, list[dict]]) -> str:
        key, messages = job
        output = self._post(messages)
        self.cache.put(key, output)
        return output

    def judge(self, records: Sequence[EvalRecord], responses: Sequence[str]) -> list[Verdict]:
        prompts = [build_prompt(r, text) for r, text in zip(records, responses, strict=True)]
        outputs: list[str | None] = [None] * len(prompts)
        jobs: dict[str, list[dict]] = {}
        keys = []
        for i, (prompt, record, text) in enumerate(zip(prompts, records, responses, strict=True)):
            messages, digest = self._messages(prompt, record)
            key = self._key(prompt, digest, text)
            keys.append(key)
            outputs[i] = self.cache.get(key)
            if outputs[i] is not None:
                self._count("cache_hits")
            elif key not in jobs:
                jobs[key] = messages
        if jobs:
            with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
                answers = dict(zip(jobs, pool.map(self._ask, jobs.items()), strict=True))
            outputs = [
                o if o is not None else answers[k] for o, k in zip(outputs, keys, strict=True)
            ]
        verdicts = []
        for prompt, output in zip(prompts, outputs, strict=True):
            label = parse_verdict(output or "", prompt.words)
            if label == "malformed":
                self._count("malformed")
            verdicts.append(Verdict(label, self.name, output or ""))
        return verdicts


def _content(body: bytes) -> str:
    """The reply's text, or "" (read as malformed) when the body is not a chat completion."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""
