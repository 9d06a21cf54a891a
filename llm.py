"""
A small client for OpenAI-compatible chat-completions servers, for autointerp (interpret.py).

    llm = LLM("https://api.openai.com/v1", "gpt-4o-mini", cache_dir="interp/llm-cache")
    text = llm([{"role": "user", "content": "..."}])        # key from RANK1_LLM_API_KEY
    outs = llm.map(fn, items)                                # fn(item) may call llm; threads

The key is read from the environment only. Replies are cached on disk, keyed by the whole request
(model, messages, settings), so a rerun costs nothing; temperature is 0.
"""
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import write_atomic


class LLM:
    """An OpenAI-compatible chat-completions client: key from the environment only, retries with
    backoff on 429 and 5xx, a concurrency limit, and an on-disk cache keyed by the request."""

    def __init__(self, url, model, cache_dir, key_env="RANK1_LLM_API_KEY", retries=5, concurrency=8,
                 backoff=1.0):
        self.url, self.model, self.cache_dir = url.rstrip("/"), model, cache_dir
        self.key = os.environ.get(key_env, "")
        self.retries, self.concurrency, self.backoff = retries, concurrency, backoff
        self.calls = 0
        os.makedirs(cache_dir, exist_ok=True)

    def __call__(self, messages, max_tokens=256):
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0})
        f = os.path.join(self.cache_dir, hashlib.sha256(body.encode()).hexdigest() + ".json")
        if os.path.isfile(f):
            with open(f) as fh:
                return json.load(fh)["content"]
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        req = urllib.request.Request(self.url + "/chat/completions", data=body.encode(),
                                     method="POST",
                                     headers=headers)
        for attempt in range(self.retries + 1):
            try:
                self.calls += 1
                with urllib.request.urlopen(req, timeout=120) as r:
                    content = json.load(r)["choices"][0]["message"]["content"]
                break
            except urllib.error.HTTPError as e:
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                raise RuntimeError(f"{self.url}: HTTP {e.code} after {attempt + 1} "
                                   "attempts") from None
        write_atomic(f, json.dumps({"content": content}))
        return content

    def map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(fn, items))
