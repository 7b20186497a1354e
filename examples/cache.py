"""A dictionary with a time-to-live as a cache in front of a slow call."""
import os
import tempfile
import time

from beaver import BeaverDB

TTL = 0.5      # seconds; a real cache would use minutes or hours


def expensive_api_call(prompt):
    print(f"  ... making the expensive call for {prompt!r}")
    time.sleep(0.05)
    return "Quito"


def cached_answer(cache, prompt):
    answer = cache.get(prompt)
    if answer is None:
        print("cache miss")
        answer = expensive_api_call(prompt)
        cache.set(prompt, answer, ttl_seconds=TTL)
    else:
        print("cache hit")
    return answer


def main(path):
    with BeaverDB(path) as db:
        cache = db.dict("api_cache")
        prompt = "capital of Ecuador"
        print("1:", cached_answer(cache, prompt))      # miss: calls and caches
        print("2:", cached_answer(cache, prompt))      # hit, while the TTL runs
        time.sleep(TTL + 0.1)
        print("expired key visible?", prompt in cache, "| len:", len(cache))
        print("3:", cached_answer(cache, prompt))      # miss again after expiry

        cache.set("exchange_rates", {"USD": 1.0}, ttl_seconds=3600)
        print(f"exchange_rates expire in {cache.ttl('exchange_rates') / 60:.0f} minutes")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "cache.db"))
