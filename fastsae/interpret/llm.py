"""Chat completions from any OpenAI-compatible endpoint, cached on disk and sent concurrently.

The key comes from OPENAI_API_KEY (or OPENAI_KEY_SAE, the original scripts' name) and the base
URL from OPENAI_BASE_URL, so vLLM, Ollama or a local server work too. The key is never printed,
logged or written. Retries with backoff on 429, 5xx, timeouts and dropped connections are the
`openai` client's own (it honours Retry-After); a rejected key (401) stops at once, and any other
refusal (a wrong model's 404, a 400), a rate limit or server error that outlasts the retries, an
endpoint still unreachable after them, or a reply that is no chat completion (a web page, cut JSON:
OPENAI_BASE_URL names the wrong address) stops with the status and what to check. A reply without
an answer (no choices, or empty content) is unreadable, like an answer that cannot be parsed, and is
not cached, so a rerun asks again. Every other answer is cached under a hash of its request and
endpoint, so a rerun or a resumed run never pays twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastsae.common.atomic_files import write_atomically
from fastsae.common.errors import UserError

logger = logging.getLogger(__name__)

API_KEY_VARIABLES = ("OPENAI_API_KEY", "OPENAI_KEY_SAE")

Messages = list[dict[str, str]]


def api_key() -> str | None:
    for name in API_KEY_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def base_url() -> str | None:
    """The endpoint OPENAI_BASE_URL names; None: the OpenAI API."""
    return os.environ.get("OPENAI_BASE_URL") or None


def _answer(response: object, endpoint: object, kept: str) -> str:
    """The reply's text; "" when a chat completion carries none (no choices, no content). A reply that is no chat
    completion at all (a web page, cut or foreign JSON) stops the run: every request to that address would get one."""
    from openai.types.chat import ChatCompletion

    if not isinstance(response, ChatCompletion):
        raise UserError(
            f"the endpoint {endpoint} answered with something other than a chat completion ({str(response)[:80]!r}). "
            f"Check that OPENAI_BASE_URL is the API's address (an OpenAI-compatible server's usually ends in /v1); {kept}."
        )
    if not response.choices and (error := getattr(response, "error", None)):  # a proxy's failure sent as a 200 reply
        reason = error.get("message", error) if isinstance(error, dict) else error
        logger.warning("The endpoint %s answered with no choices but an error: %s. The answer is unreadable.", endpoint, str(reason)[:300])
    message = getattr(response.choices[0], "message", None) if response.choices else None
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else ""


class CachedChatClient:
    """Sends chat requests (concurrently, at most `concurrency` at a time) and remembers every answer."""

    def __init__(self, model: str, cache_dir: Path, concurrency: int = 4, max_retries: int = 6, timeout: float = 120.0) -> None:
        from openai import OpenAI

        key = api_key()
        if key is None:
            raise UserError(f"no API key: set {' or '.join(API_KEY_VARIABLES)} (and OPENAI_BASE_URL for a local server).")
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.concurrency = concurrency
        self.requests_sent = 0
        self._counting = threading.Lock()  # complete() runs on LLM_CONCURRENCY threads, and += is no atomic step
        self._client = OpenAI(api_key=key, base_url=base_url(), max_retries=max_retries, timeout=timeout)

    def _cache_path(self, messages: Messages, max_tokens: int) -> Path:
        # The endpoint is part of the key: a local server's answers under the name "gpt-4.1" are not gpt-4.1's.
        request = json.dumps(
            {"endpoint": str(self._client.base_url), "model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
            sort_keys=True,
        )
        digest = hashlib.sha256(request.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def cached(self, messages: Messages, max_tokens: int) -> str | None:
        """The cached answer; None when there is none, or its file is damaged (a disk that filled up, a hand edit): that
        request is asked again and its file rewritten, where a damaged file would otherwise stop every rerun."""
        path = self._cache_path(messages, max_tokens)
        try:
            answer = json.loads(path.read_bytes())["answer"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # not JSON (ValueError, UnicodeDecodeError), or not our record
            answer = None
        if not isinstance(answer, str):
            logger.warning("The LLM answer cache file %s is damaged: its request is asked again.", path)
            return None
        return answer

    def complete(self, messages: Messages, max_tokens: int = 300, whole: bool = False) -> str:
        """One answer: from the cache, or from the endpoint (then cached). `whole`: an answer stopped at `max_tokens`
        is unreadable, not used or cached (an explanation cut mid-sentence, or a thinking model's reasoning that
        filled the budget); delphi's scorers read a cut verdict list, so scoring does not ask for it."""
        from openai import (
            APIConnectionError,
            APIStatusError,
            AuthenticationError,
            InternalServerError,
            PermissionDeniedError,
            RateLimitError,
        )

        answer = self.cached(messages, max_tokens)
        if answer is not None:
            return answer
        endpoint, retries, kept = self._client.base_url, self._client.max_retries, "answers already received are cached"
        try:
            with self._counting:
                self.requests_sent += 1
            response = self._client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens, temperature=0)
        except (AuthenticationError, PermissionDeniedError) as error:
            raise UserError(
                f"the API rejected the key ({error.status_code}). Check {' / '.join(API_KEY_VARIABLES)} and OPENAI_BASE_URL; {kept}."
            ) from None
        except RateLimitError as error:
            raise UserError(
                f"the endpoint {endpoint} still refused requests after {retries} retries ({error.message}): a rate limit, or the "
                f"account's quota is spent. Lower LLM_CONCURRENCY or check the quota, then rerun; {kept}."
            ) from None
        except InternalServerError as error:
            raise UserError(
                f"the endpoint {endpoint} still failed after {retries} retries ({error.message}): the server is down or overloaded. "
                f"Rerun when it is back; {kept}."
            ) from None
        except APIStatusError as error:
            raise UserError(
                f"the endpoint {endpoint} refused a request for EXPLANATION_MODEL {self.model!r} ({error.message}). Check that OPENAI_BASE_URL is the endpoint you mean and EXPLANATION_MODEL a chat model it serves; "
                f"{kept}."
            ) from None
        except APIConnectionError as error:
            raise UserError(
                f"could not reach the endpoint {endpoint} ({error.message}, after {retries} retries). "
                f"Check OPENAI_BASE_URL and that the server is up; {kept}."
            ) from None
        except json.JSONDecodeError as error:
            response = error.doc  # a body cut short, or not JSON: no chat completion
        answer = _answer(response, endpoint, kept)
        stopped_at_limit = bool(response.choices) and getattr(response.choices[0], "finish_reason", None) == "length"
        if stopped_at_limit and (whole or not answer):  # no answer at all: a server that returns the reasoning apart
            logger.warning(
                "An answer stopped at its limit of %d tokens before it ended, and is not used: %r. A thinking model can fill "
                "the limit with its reasoning; choose EXPLANATION_MODEL without it.",
                max_tokens,
                answer[:80],
            )
            return ""
        if not answer:
            return answer  # unreadable, and not cached: a rerun asks again
        path = self._cache_path(messages, max_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"model": self.model, "answer": answer})  # another run sharing the cache may write it too
        write_atomically(path, lambda partial: partial.write_text(record, encoding="utf-8"), private_partial=True)
        return answer

    def complete_all(self, requests: Sequence[Messages], max_tokens: int = 300, whole: bool = False) -> list[str]:
        """Answers in request order; the first error (after the client's retries) stops the rest.

        A request made twice is sent once (two features with the same windows ask the same): in flight at once, both
        copies would be paid for. Requests not yet sent when one fails are dropped, not sent: a rejected key would
        refuse them all.
        """
        failed = threading.Event()

        def complete_unless_failed(messages: Messages) -> str | None:
            if failed.is_set():
                return None  # never returned: the failure that set the flag is raised when its result is read
            try:
                return self.complete(messages, max_tokens, whole)
            except BaseException:
                failed.set()
                raise

        keys = [json.dumps(messages, sort_keys=True) for messages in requests]
        distinct = dict(zip(keys, requests))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = dict(zip(distinct, pool.map(complete_unless_failed, distinct.values())))
        return [answers[key] for key in keys]
