"""A judge at a real local HTTP endpoint speaking OpenAI's chat API, replying with fixed judge texts in FastChat's
formats: the suite's stand-in for a served judge model (``make check-judge`` runs a real one, vLLM).

It rates an answer that starts with ``GOOD`` 8 and any other 3, prefers a ``GOOD`` answer in pairwise prompts
whichever position it is shown in, and gives no verdict at all for a question that contains ``NO-VERDICT``.
The first ``fail_first`` chat requests get a 503, which the client must retry.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "recorded-judge"


def reply_for(user_prompt: str) -> str:
    """The judge's text for one prompt, in the format FastChat's prompts ask for."""
    if "NO-VERDICT" in user_prompt:
        return "Both answers address the question; I cannot decide on a rating here."
    first_a = re.search(r"\[The Start of Assistant A's Answer\]\n(\w+)", user_prompt) or re.search(
        r"### Assistant A:\n(\w+)", user_prompt
    )
    if "Assistant B" in user_prompt:
        return (
            "Assistant A follows the instructions more closely. [[A]]"
            if first_a.group(1) == "GOOD"
            else ("Assistant B's answer is more helpful. [[B]]")
        )
    answer = re.search(r"\[The Start of Assistant's Answer\]\n(\w+)", user_prompt) or re.search(
        r"### Assistant A:\n(\w+)", user_prompt
    )
    return "The answer is accurate and detailed. Rating: [[8]]" if answer.group(1) == "GOOD" else "Rating: [3]"


class JudgeServer:
    """``with JudgeServer() as server: server.url``; ``server.chats`` counts the chat requests answered."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.chats = 0
        self.requests = 0
        self.regexes: list[str] = []  # structured-output patterns asked for
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "me"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests += 1
                    failing = judge.requests <= judge.fail_first
                if failing:
                    self._send(503, {"error": {"message": "overloaded"}})
                    return
                if body["model"] != MODEL:
                    self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
                    return
                assert body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"
                text = reply_for(body["messages"][1]["content"])
                with judge.lock:
                    judge.chats += 1
                    if "structured_outputs" in body:
                        judge.regexes.append(body["structured_outputs"]["regex"])
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": MODEL,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def judge_server(fail_first: int = 0):
    with JudgeServer(fail_first) as server:
        yield server
