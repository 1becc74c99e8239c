"""The floor: the bare SDK call in a loop, with nothing around it, for bench.py.

    python bench/sdk_floor.py --base-url URL --threads N --duration S --warmup S

Each of N threads calls ``openai.OpenAI(base_url=URL, api_key="x", max_retries=0)
.chat.completions.create(...)`` (one client, as a server would share it) in a loop:
first for the warm-up, unrecorded, then for the duration. Prints one JSON line: the
calls made, the wall and CPU seconds of the measured part, and every call's latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import openai

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="x", max_retries=0)
    start = threading.Barrier(args.threads + 1)
    measuring = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors: list[str] = []
    deadline = [0.0]

    def call() -> None:
        client.chat.completions.create(model=args.model, messages=MESSAGES)

    def loop(mine: list[float]) -> None:
        start.wait()
        try:
            while not measuring.is_set():
                call()
            while True:
                began = time.perf_counter()
                if began >= deadline[0]:
                    return
                call()
                mine.append(time.perf_counter() - began)
        except openai.OpenAIError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(args.warmup)
    # The deadline is set before the event: a thread that sees the event sees it too.
    deadline[0] = time.perf_counter() + args.duration
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    measuring.set()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    client.close()
    samples = [round(s * 1000, 3) for mine in latencies for s in mine]
    print(
        json.dumps(
            {
                "calls": len(samples),
                "wall_s": wall,
                "cpu_s": cpu,
                "errors": errors[:5],
                "error_count": len(errors),
                "latencies_ms": samples,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
