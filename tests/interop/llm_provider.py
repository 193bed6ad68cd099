"""A stand-in LLM provider for the AI gateway's interoperability test: OpenAI's chat completions
and embeddings under /openai/v1, Anthropic's Messages API under /anthropic/v1, streaming
included, following the published wire formats. Standard library only.

Answers are deterministic: the text is "echo:" and the last user message's words; a token is a
word. With tools in the request and no tool result yet, it calls the first tool. A model whose
name starts with "fail-429" answers 429 (for fallbacks).

Usage: llm_provider.py PORT_FILE OPENAI_KEY ANTHROPIC_KEY
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT_FILE, OPENAI_KEY, ANTHROPIC_KEY = sys.argv[1], sys.argv[2], sys.argv[3]


def words(s):
    return len(s.split())


def text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text") or (p.get("content") if isinstance(p.get("content"), str) else "") or ""
                        for p in content if isinstance(p, dict))
    return ""


def read_messages(body):
    n = words(text_of(body.get("system", "")))
    last_user, tool_result = "", False
    for m in body.get("messages", []):
        t = text_of(m.get("content"))
        n += words(t)
        blocks = m.get("content") if isinstance(m.get("content"), list) else []
        has_result = any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks)
        if m.get("role") == "tool" or has_result:
            tool_result = True
        if m.get("role") == "user" and not has_result:
            last_user, tool_result = t, False
    return max(n, 1), last_user, tool_result


def first_tool(body):
    tools = body.get("tools") or []
    if not tools:
        return None
    t = tools[0]
    return (t.get("function") or {}).get("name") or t.get("name")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True

    def event(self, data, name=None):
        s = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
        self.wfile.write(s.encode())
        self.wfile.flush()

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        anthropic = self.path.startswith("/anthropic/")
        if anthropic:
            ok = self.headers.get("x-api-key") == ANTHROPIC_KEY and self.headers.get("anthropic-version")
        else:
            ok = self.headers.get("authorization") == f"Bearer {OPENAI_KEY}"
        if not ok:
            err = {"type": "error", "error": {"type": "authentication_error", "message": "invalid key"}} if anthropic \
                else {"error": {"message": "invalid key", "type": "invalid_request_error", "code": "invalid_api_key"}}
            return self.send_json(401, err)
        if str(body.get("model", "")).startswith("fail-429"):
            return self.send_json(429, {"error": {"message": "slow down", "type": "rate_limit_error"}})
        if self.path == "/openai/v1/chat/completions":
            return self.chat(body)
        if self.path == "/openai/v1/embeddings":
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            n = sum(max(words(i), 1) for i in inputs)
            data = [{"object": "embedding", "index": i, "embedding": [(len(s) + k) % 7 / 7 for k in range(8)]}
                    for i, s in enumerate(inputs)]
            return self.send_json(200, {"object": "list", "data": data, "model": body.get("model"),
                                        "usage": {"prompt_tokens": n, "total_tokens": n}})
        if self.path == "/anthropic/v1/messages":
            return self.messages(body)
        self.send_json(404, {"error": {"message": "no such endpoint", "type": "invalid_request_error"}})

    def chat(self, body):
        model = body.get("model")
        n_in, last_user, tool_result = read_messages(body)
        tool = None if tool_result else first_tool(body)
        reply = ["echo:"] + last_user.split()
        n_out = 5 if tool else len(reply)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        if not body.get("stream"):
            if tool:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": tool, "arguments": "{\"q\": \"x\"}"}}]}
            else:
                message = {"role": "assistant", "content": " ".join(reply)}
            return self.send_json(200, {
                "id": "chatcmpl-py", "object": "chat.completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop",
                             "logprobs": None}],
                "usage": usage})
        self.start_sse()

        def chunk(delta, finish=None):
            return json.dumps({"id": "chatcmpl-py", "object": "chat.completion.chunk", "created": 1700000000,
                               "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        self.event(chunk({"role": "assistant", "content": ""}))
        if tool:
            self.event(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                              "function": {"name": tool, "arguments": ""}}]}))
            self.event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\": \"x\"}"}}]}))
            self.event(chunk({}, "tool_calls"))
        else:
            for i, w in enumerate(reply):
                self.event(chunk({"content": w if i == 0 else " " + w}))
            self.event(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            self.event(json.dumps({"id": "chatcmpl-py", "object": "chat.completion.chunk", "created": 1700000000,
                                   "model": model, "choices": [], "usage": usage}))
        self.event("[DONE]")

    def messages(self, body):
        if not isinstance(body.get("max_tokens"), int):
            return self.send_json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                   "message": "max_tokens: Field required"}})
        model = body.get("model")
        n_in, last_user, tool_result = read_messages(body)
        tool = None if tool_result else first_tool(body)
        reply = ["echo:"] + last_user.split()
        n_out = 5 if tool else len(reply)
        stop = "tool_use" if tool else "end_turn"
        if not body.get("stream"):
            content = [{"type": "tool_use", "id": "toolu_1", "name": tool, "input": {"q": "x"}}] if tool \
                else [{"type": "text", "text": " ".join(reply)}]
            return self.send_json(200, {
                "id": "msg_py", "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": n_in, "output_tokens": n_out}})
        self.start_sse()
        ev = lambda name, obj: self.event(json.dumps(obj), name)  # noqa: E731
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_py", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": n_in, "output_tokens": 1}}})
        ev("ping", {"type": "ping"})
        if tool:
            ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}})
            ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": "{\"q\": \"x\"}"}})
        else:
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})
            for i, w in enumerate(reply):
                ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "text_delta", "text": w if i == 0 else " " + w}})
        ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                             "usage": {"output_tokens": n_out}})
        ev("message_stop", {"type": "message_stop"})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(PORT_FILE + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.replace(PORT_FILE + ".tmp", PORT_FILE)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
