"""
A small client for OpenAI-compatible chat-completions servers, for autointerp (interpret.py).

    llm = LLM("https://api.openai.com/v1", "gpt-4o-mini", cache_dir="interp/llm-cache")
    text = llm([{"role": "user", "content": "..."}])        # key from RANK1_LLM_API_KEY
    outs = llm.map(fn, items)                                # fn(item) may call llm; threads

The key is read from the environment only. Temperature is 0. A reply is cached on disk, keyed by
the whole request, only when it is a well-formed completion with text, so a rerun costs nothing
and never replays a failure. Rate limits (429), server errors (5xx), timeouts, refused
connections and malformed replies are retried with exponential backoff; what still fails raises
LLMError naming the URL and the last status.
"""
import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import write_atomic


class LLMError(RuntimeError):
    pass


class LLM:
    """An OpenAI-compatible chat-completions client: key from the environment only, retries with
    backoff, a concurrency limit, and an on-disk cache of good replies keyed by the request."""

    def __init__(self, url, model, cache_dir, key_env="RANK1_LLM_API_KEY", retries=5, concurrency=8,
                 backoff=1.0, timeout=120):
        self.url, self.model, self.cache_dir = url.rstrip("/"), model, cache_dir
        self.key = os.environ.get(key_env, "")
        self.retries, self.concurrency = retries, concurrency
        self.backoff, self.timeout = backoff, timeout
        self.calls = 0
        os.makedirs(cache_dir, exist_ok=True)

    def __call__(self, messages, max_tokens=256):
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0})
        f = os.path.join(self.cache_dir, hashlib.sha256(body.encode()).hexdigest() + ".json")
        try:
            with open(f, encoding="utf-8") as fh:
                content = json.load(fh).get("content")
            if isinstance(content, str):
                return content
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError):  # a damaged cache entry is a miss, then replaced
            pass
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        req = urllib.request.Request(self.url + "/chat/completions", data=body.encode(),
                                     method="POST", headers=headers)
        for attempt in range(self.retries + 1):
            self.calls += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    content = json.load(r)["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise ValueError(f"content is {type(content).__name__}")
                break
            except urllib.error.HTTPError as e:
                status = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:  # the request is wrong: retrying cannot help
                    raise LLMError(f"{self.url}: {status}") from None
            except urllib.error.URLError as e:  # refused, unreachable, or a timeout inside urllib
                status = f"connection failed ({e.reason})"
            except (socket.timeout, TimeoutError):
                status = f"no reply within {self.timeout} s"
            except (ValueError, KeyError, IndexError, TypeError) as e:  # JSON, or not a completion
                status = f"malformed reply ({type(e).__name__}: {e})"
            if attempt == self.retries:
                raise LLMError(f"{self.url}: {status} after {attempt + 1} attempts")
            time.sleep(self.backoff * 2 ** attempt)
        write_atomic(f, json.dumps({"content": content}))
        return content

    def map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(fn, items))
