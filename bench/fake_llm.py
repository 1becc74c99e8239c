"""The tests' fake OpenAI server, plus a count of the LLM calls it served, for bench.py.

    python bench/fake_llm.py --latency 0.2

starts tests/support/fake_openai.py's FakeOpenAI on a free port and, on a second port, a
tiny HTTP server whose ``GET /calls`` answers ``{"calls": N}``. It prints one JSON line,
``{"base_url": ..., "calls_url": ...}``, and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fake_openai import FakeOpenAI


def calls_server(fake: FakeOpenAI) -> ThreadingHTTPServer:
    class Calls(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/calls":
                self.send_error(404)
                return
            body = json.dumps({"calls": fake.calls}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    with FakeOpenAI(latency=args.latency) as fake:
        server = calls_server(fake)
        threading.Thread(target=server.serve_forever, name="calls", daemon=True).start()
        host, port = server.server_address[:2]
        print(
            json.dumps({"base_url": fake.base_url, "calls_url": f"http://{host!s}:{port}/calls"}),
            flush=True,
        )
        while not stop.wait(timeout=0.5):
            pass
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
