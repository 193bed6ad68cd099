"""The AI gateway driven by the official `openai` and `anthropic` client libraries from PyPI
(issue 16): keygate tokens as their API keys, keygate's `ai` route as their base URL, in front
of two upstreams — the stand-in provider of tests/interop/llm_provider.py (OpenAI and Anthropic
formats) and, when it runs, LiteLLM's proxy in its mock-response mode (an OpenAI-compatible
server nobody here wrote). Chat completions plain and streamed, tools, embeddings, Anthropic
messages plain and streamed, and keygate's refusals read as those libraries' own errors.

Environment: KEYGATE_ADMIN_URL, KEYGATE_GATEWAY_URL, KEYGATE_ROOT_KEY, INTEROP_RESULTS, and
LITELLM (set when LiteLLM's proxy is one of the providers).
"""

import os

import anthropic
import openai

from checks import Checks, create_token


def main():
    checks = Checks("ai-clients")
    check = checks.check
    admin, gateway, root = (os.environ[k] for k in ("KEYGATE_ADMIN_URL", "KEYGATE_GATEWAY_URL", "KEYGATE_ROOT_KEY"))
    base = gateway + "/llm/v1"
    vk = create_token(admin, root, {"name": "ai-interop", "scopes": ["llm:*"]})["token"]
    narrow = create_token(admin, root, {"name": "ai-narrow", "scopes": ["llm:gpt-mini"]})["token"]
    oa = openai.OpenAI(api_key=vk, base_url=base, max_retries=0, timeout=20)

    # Chat completions, plain: an OpenAI model and an Anthropic one (translated by keygate).
    for model in ("gpt-mini", "claude"):
        try:
            r = oa.chat.completions.create(model=model, messages=[
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}])
            check(f"openai chat {model}: the answer", r.choices[0].message.content == "echo: hello world", r)
            check(f"openai chat {model}: usage", r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3, r.usage)
            check(f"openai chat {model}: finish_reason", r.choices[0].finish_reason == "stop", r)
        except Exception as e:  # noqa: BLE001
            check(f"openai chat {model}", False, repr(e))

    # Streamed, with the usage chunk asked for.
    for model in ("gpt-mini", "claude"):
        try:
            stream = oa.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "one two three"}])
            text, usage = "", None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage:
                    usage = chunk.usage
            check(f"openai stream {model}: the text", text == "echo: one two three", text)
            check(f"openai stream {model}: usage", usage is not None and usage.completion_tokens == 4, usage)
        except Exception as e:  # noqa: BLE001
            check(f"openai stream {model}", False, repr(e))

    # Tools: the Anthropic model's tool_use read as an OpenAI tool call.
    tools = [{"type": "function", "function": {"name": "weather", "description": "the weather",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    for model in ("gpt-mini", "claude"):
        try:
            r = oa.chat.completions.create(model=model, tools=tools, messages=[{"role": "user", "content": "weather?"}])
            call = r.choices[0].message.tool_calls[0]
            check(f"openai tools {model}: a tool call", call.function.name == "weather"
                  and '"q"' in call.function.arguments and r.choices[0].finish_reason == "tool_calls", r)
            follow = oa.chat.completions.create(model=model, tools=tools, messages=[
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
            # With the tool's result, the stand-in answers the question instead of calling again.
            check(f"openai tools {model}: the tool's result sent back",
                  follow.choices[0].message.content == "echo: weather?" and not follow.choices[0].message.tool_calls,
                  follow)
        except Exception as e:  # noqa: BLE001
            check(f"openai tools {model}", False, repr(e))

    try:
        e = oa.embeddings.create(model="gpt-mini", input=["a b", "c"])
        check("openai embeddings", len(e.data) == 2 and len(e.data[0].embedding) == 8 and e.usage.prompt_tokens == 3, e)
    except Exception as ex:  # noqa: BLE001
        check("openai embeddings", False, repr(ex))

    try:
        ids = sorted(m.id for m in oa.models.list())
        check("openai models list", ids == sorted(["claude", "fast", "gpt-mini"] + (["litellm"] if os.environ.get("LITELLM") else [])), ids)
    except Exception as ex:  # noqa: BLE001
        check("openai models list", False, repr(ex))

    # A fallback: the first deployment of "fast" answers 429, the next one answers.
    try:
        raw = oa.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "go"}])
        r = raw.parse()
        check("fallback after a provider's 429", r.choices[0].message.content == "echo: go"
              and raw.headers.get("x-keygate-fallbacks") == "1", raw.headers)
    except Exception as ex:  # noqa: BLE001
        check("fallback after a provider's 429", False, repr(ex))

    # keygate's refusals as the library's errors.
    try:
        openai.OpenAI(api_key=narrow, base_url=base, max_retries=0).chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "x"}])
        check("a model outside the key's scopes is refused", False, "no error")
    except openai.PermissionDeniedError as ex:
        check("a model outside the key's scopes: PermissionDeniedError, code model_not_allowed",
              ex.status_code == 403 and ex.code == "model_not_allowed", ex)
    try:
        openai.OpenAI(api_key="kg_bogus", base_url=base, max_retries=0).chat.completions.create(
            model="gpt-mini", messages=[{"role": "user", "content": "x"}])
        check("a bogus key is refused", False, "no error")
    except openai.AuthenticationError as ex:
        check("a bogus key: AuthenticationError", ex.status_code == 401, ex)
    try:
        oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        check("an unknown model is refused", False, "no error")
    except openai.NotFoundError as ex:
        check("an unknown model: NotFoundError, code model_not_found", ex.code == "model_not_found", ex)

    # Anthropic's own client, on the Messages API: an Anthropic model (passed through), and an
    # OpenAI model (keygate translates the request, the answer and the streamed events).
    an = anthropic.Anthropic(api_key=vk, base_url=gateway + "/llm", max_retries=0, timeout=20)
    for model in ("claude", "gpt-mini"):
        try:
            m = an.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "hi there"}])
            check(f"anthropic messages {model}: the answer",
                  m.content[0].text == "echo: hi there" and m.stop_reason == "end_turn", m)
            check(f"anthropic messages {model}: usage", m.usage.input_tokens == 2 and m.usage.output_tokens == 3,
                  m.usage)
        except Exception as ex:  # noqa: BLE001
            check(f"anthropic messages {model}", False, repr(ex))
        try:
            with an.messages.stream(model=model, max_tokens=50,
                                    messages=[{"role": "user", "content": "a b c"}]) as s:
                text = "".join(s.text_stream)
                final = s.get_final_message()
            check(f"anthropic stream {model}: the text", text == "echo: a b c", text)
            check(f"anthropic stream {model}: usage", final.usage.output_tokens == 4, final.usage)
            check(f"anthropic stream {model}: stop_reason", final.stop_reason == "end_turn", final)
        except Exception as ex:  # noqa: BLE001
            check(f"anthropic stream {model}", False, repr(ex))
    try:
        m = an.messages.create(model="gpt-mini", max_tokens=50, messages=[{"role": "user", "content": "weather?"}],
                               tools=[{"name": "weather", "description": "the weather",
                                       "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}])
        uses = [b for b in m.content if b.type == "tool_use"]
        check("anthropic tools on an OpenAI model: tool_use", m.stop_reason == "tool_use" and len(uses) == 1
              and uses[0].name == "weather" and uses[0].input == {"q": "x"}, m)
    except Exception as ex:  # noqa: BLE001
        check("anthropic tools on an OpenAI model", False, repr(ex))
    try:
        anthropic.Anthropic(api_key=narrow, base_url=gateway + "/llm", max_retries=0).messages.create(
            model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        check("anthropic: a model outside the key's scopes is refused", False, "no error")
    except anthropic.PermissionDeniedError as ex:
        check("anthropic: PermissionDeniedError for a model outside the key's scopes", ex.status_code == 403, ex)

    # LiteLLM's proxy (mock responses) as an OpenAI-compatible upstream.
    if os.environ.get("LITELLM"):
        try:
            r = oa.chat.completions.create(model="litellm", messages=[{"role": "user", "content": "hi"}])
            check("litellm upstream: the mock answer", r.choices[0].message.content == "keygate-litellm-mock", r)
            check("litellm upstream: usage", r.usage is not None and r.usage.total_tokens > 0, r.usage)
            stream = oa.chat.completions.create(model="litellm", stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            check("litellm upstream: streamed", text == "keygate-litellm-mock", text)
            m = an.messages.create(model="litellm", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
            check("litellm upstream through the anthropic client: the mock answer",
                  m.content[0].text == "keygate-litellm-mock" and m.usage.output_tokens > 0, m)
            with an.messages.stream(model="litellm", max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as s:
                text = "".join(s.text_stream)
            check("litellm upstream through the anthropic client: streamed", text == "keygate-litellm-mock", text)
        except Exception as ex:  # noqa: BLE001
            check("litellm upstream", False, repr(ex))
    checks.finish()


if __name__ == "__main__":
    main()
