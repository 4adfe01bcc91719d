"""Google Gemini (`generateContent` / `streamGenerateContent`): OpenAI chat in, Gemini upstream, OpenAI out.

Requests go to `{base_url}/v1beta/models/{model}:generateContent` (streams:
`:streamGenerateContent?alt=sse`); a base_url that already ends in a version segment (`/v1`,
`/v1beta`, ...) is used as it is. The key travels in the `x-goog-api-key` header, never in the
URL, so it cannot leak into access logs or error messages.

Request translation (OpenAI chat -> Gemini):

- `system` and `developer` messages, wherever they are, become `systemInstruction` parts in order;
  `user` -> role "user", `assistant` -> role "model", `tool` (and legacy `function`) messages ->
  `functionResponse` parts in a "user" turn. Consecutive turns of the same role are merged (Gemini
  wants the roles to alternate; parallel tool results become one turn). Empty text is dropped.
- Content parts: text; `image_url` with a `data:` URL -> `inlineData`, an http(s)/gs URL ->
  `fileData` with the MIME type guessed from the extension (default image/jpeg); `input_audio` ->
  `inlineData` audio/<format>; `file` with `file_data` -> `inlineData` (`file_id` that is a URL ->
  `fileData`). Any other part type is a 400 from the gateway.
- Assistant `tool_calls` -> `functionCall` parts (arguments parsed; text that is not a JSON object
  is sent as `{"arguments": <text>}`). A tool message's function name comes from the earlier tool
  call with the same id (else its own `name`); its `response` is the content parsed as a JSON
  object, or `{"content": <text>}`.
- Thought signatures (Gemini 3 requires them back on the function calls of the current turn): an
  answer's `thoughtSignature` is returned on the tool call as
  `extra_content.google.thought_signature` (the convention of Google's own OpenAI-compatible
  endpoint) and sent back on the `functionCall` part when a request carries it there.
- `tools` of type function -> one `functionDeclarations` tool. Parameter schemas keep only the
  OpenAPI-subset keys Gemini's `Schema` accepts (type, format, description, enum, items, properties,
  required, nullable, anyOf, min/max bounds, pattern, title, default, ...): `additionalProperties`,
  `$schema`, `$id`, `$defs`, `strict`, `examples`, `example`, a null `default` and an empty
  `properties` are removed, `const` becomes a one-value `enum`, non-string enums and string formats
  other than date-time are dropped, `oneOf` becomes `anyOf`, `allOf` is merged, local `$ref`s are
  inlined (recursion cut at depth 8), `type: [X, "null"]` and `anyOf` with a null branch become
  `nullable: true`, `required` keeps only declared properties, and a parameters object without
  properties is left out (a function without arguments).
  Gemini-native tools given as such (`{"googleSearch": {}}`, `{"codeExecution": {}}`, ...) pass
  through unchanged.
- `tool_choice` auto / none / required / {function} -> `toolConfig.functionCallingConfig` mode AUTO
  / NONE / ANY / ANY with `allowedFunctionNames`.
- `generationConfig`: temperature, top_p -> topP, top_k -> topK, max_completion_tokens or
  max_tokens -> maxOutputTokens, stop -> stopSequences, n -> candidateCount, seed,
  presence_penalty / frequency_penalty, response_format json_object / json_schema ->
  responseMimeType application/json (+ responseSchema, cleaned as above), reasoning_effort ->
  thinkingConfig (none: budget 0; minimal 512, low 1024, medium 8192, high 24576 tokens, with
  includeThoughts so the reasoning comes back). A `generationConfig` object in the body is merged in
  last (Gemini-native settings such as thinkingConfig.thinkingLevel or responseModalities), and
  `safetySettings` / `cachedContent` (or their snake_case spellings) pass through. OpenAI params
  Gemini has no equivalent for (logprobs, logit_bias, user, parallel_tool_calls, ...) are ignored.

Response translation (Gemini -> OpenAI `chat.completion`):

- Each candidate is a choice: text parts joined as `content`; parts marked `thought: true` joined
  as `reasoning_content` (the field DeepSeek and vLLM use); `functionCall` parts -> `tool_calls`
  with ids `call_<n>_<suffix>` (n counts the calls of the answer; the suffix is random per
  answer, so ids stay unique across the turns of a conversation) unless Gemini gave an id.
- finishReason STOP -> "stop" ("tool_calls" when the candidate called functions), MAX_TOKENS ->
  "length", SAFETY / RECITATION / BLOCKLIST / PROHIBITED_CONTENT / SPII / IMAGE_SAFETY ->
  "content_filter", anything else -> "stop". A prompt blocked by `promptFeedback.blockReason`
  (no candidates) answers one choice with empty content and "content_filter".
- usage: prompt_tokens = promptTokenCount, completion_tokens = candidatesTokenCount +
  thoughtsTokenCount (thinking is billed as output), prompt_tokens_details.cached_tokens =
  cachedContentTokenCount, completion_tokens_details.reasoning_tokens = thoughtsTokenCount.
  `model` is the answer's modelVersion, else the requested upstream model.
- Streams: a role chunk per choice, then one chunk per Gemini event and choice (text, reasoning,
  and each function call whole, with its index, id, name and arguments, in one delta), a
  finish_reason chunk, then always (whenever Gemini reported usageMetadata) a usage chunk
  `{"choices": [], "usage": ...}` from the last one (the relay hides it from a client that did not
  ask), then `data: [DONE]`. Nothing
  is sent before Gemini's first event, so a fallback stage can still see an opening error. An
  `error` object inside the stream becomes `data: {"error": {"message", "type", "param", "code":
  <HTTP status>}}` and ends the stream; a stream that ends without any finishReason gets no
  [DONE], so the relay reports it as cut short.
- Errors (HTTP >= 400): Gemini's `{"error": {"code", "message", "status"}}` becomes OpenAI's
  `{"error": {"message", "type": <status, e.g. INVALID_ARGUMENT>, "param": null, "code": <status>}}`
  with the same HTTP status and the pass-through headers (retry-after, ...). A prompt longer than
  the model's window ("input token count ... exceeds the maximum") gets code
  `context_length_exceeded`, so `fallback_on_context_length` works for Gemini too.

The native passthrough (client_format "gemini", Call.endpoint "gemini.<method>", from
/api/google/gemini): generateContent, streamGenerateContent (always `alt=sse` upstream),
countTokens, embedContent and batchEmbedContents go to `{base}/models/{model}:{method}` with the
client's body as it is, except that a `model` named inside it (batchEmbedContents' requests,
countTokens' generateContentRequest) becomes the routed upstream model. Answers come back byte for
byte; an error body that is not Google's `{"error": {...}}` is wrapped into one.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

import orjson

from proxy.call import Call, Reply, Target
from proxy.errors import BadRequest
from proxy.providers.common import json_object, post_upstream
from proxy.settings import Provider, Timeouts
from proxy.sse import SSEDecoder
from proxy.sse_gemini import STATUS_NAMES, gemini_error
from proxy.upstream import UpstreamClient, UpstreamResponse

# -- request: OpenAI chat -> Gemini -------------------------------------------------------

ROLES = {"user": "user", "assistant": "model", "tool": "user", "function": "user"}
TOOL_CHOICE_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY", "any": "ANY"}
THINKING_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
NATIVE_TOOL_KEYS = frozenset({
    "googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval", "codeExecution",
    "code_execution", "urlContext", "url_context", "fileSearch", "file_search", "googleMaps", "google_maps",
})
PASSTHROUGH_KEYS = {"safetySettings": "safetySettings", "safety_settings": "safetySettings",
                    "cachedContent": "cachedContent", "cached_content": "cachedContent"}

# The JSON-schema keys Gemini's Schema object accepts (an OpenAPI 3.0 subset); the rest are dropped.
SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "items", "properties", "required",
    "minItems", "maxItems", "minProperties", "maxProperties", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "anyOf", "propertyOrdering", "default",
})
STRING_FORMATS = frozenset({"enum", "date-time"})
MAX_REF_DEPTH = 8

MIME_BY_EXTENSION = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
    "heic": "image/heic", "heif": "image/heif", "pdf": "application/pdf", "mp3": "audio/mp3",
    "wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "aac": "audio/aac", "mp4": "video/mp4",
    "mov": "video/mov", "webm": "video/webm", "txt": "text/plain",
}


def guess_mime(uri: str, default: str = "image/jpeg") -> str:
    path = urlsplit(uri).path if "://" in uri else uri
    extension = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if extension in MIME_BY_EXTENSION:
        return MIME_BY_EXTENSION[extension]
    guessed = mimetypes.guess_type(path)[0] if extension else None
    return guessed or default


def _data_url(url: str) -> dict[str, Any]:
    """`data:<mime>[;base64],<data>` -> inlineData (base64 either way)."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise BadRequest("Invalid request format: a data: URL without a comma")
    fields = header.split(";")
    mime = fields[0] or "text/plain"
    if "base64" not in fields[1:]:
        payload = base64.b64encode(unquote_to_bytes(payload)).decode()
    return {"inlineData": {"mimeType": mime, "data": payload}}


def _media(url: str, default_mime: str) -> dict[str, Any]:
    if url.startswith("data:"):
        return _data_url(url)
    if url.startswith(("http://", "https://", "gs://")):
        return {"fileData": {"mimeType": guess_mime(url, default_mime), "fileUri": url}}
    raise BadRequest("Invalid request format: an image or file URL must be a data:, http(s):// or gs:// URL")


def content_part(part: Any) -> dict[str, Any] | None:
    """One OpenAI content part as a Gemini part (None: nothing to send)."""
    if isinstance(part, str):
        return {"text": part} if part else None
    if not isinstance(part, dict):
        raise BadRequest("Invalid request format: a content part must be an object")
    kind = part.get("type")
    if kind in ("text", "refusal", "input_text", "output_text"):
        text = part.get("text") if kind != "refusal" else part.get("refusal")
        return {"text": text} if isinstance(text, str) and text else None
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise BadRequest("Invalid request format: image_url.url must be a string")
        return _media(url, "image/jpeg")
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise BadRequest("Invalid request format: input_audio.data must be a base64 string")
        return {"inlineData": {"mimeType": f"audio/{audio.get('format') or 'wav'}", "data": audio["data"]}}
    if kind == "file":
        file = part.get("file") or {}
        if not isinstance(file, dict):
            raise BadRequest("Invalid request format: file must be an object")
        filename = file.get("filename") if isinstance(file.get("filename"), str) else ""
        data = file.get("file_data")
        if isinstance(data, str):
            if data.startswith("data:"):
                return _data_url(data)
            return {"inlineData": {"mimeType": guess_mime(filename, "application/pdf"), "data": data}}
        file_id = file.get("file_id")
        if isinstance(file_id, str) and file_id.startswith(("http://", "https://", "gs://")):
            return {"fileData": {"mimeType": guess_mime(filename or file_id, "application/pdf"), "fileUri": file_id}}
        raise BadRequest("Invalid request format: a file part needs file_data, or a file_id that is a URL")
    raise BadRequest(f"Invalid request format: content part type {kind!r} is not supported for Gemini models")


def content_parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if isinstance(content, list):
        return [p for p in map(content_part, content) if p is not None]
    raise BadRequest("Invalid request format: message content must be a string or an array of parts")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {"arguments": raw}
        return parsed if isinstance(parsed, dict) else {"arguments": raw}
    return {"arguments": raw}


def _thought_signature(tool_call: dict[str, Any]) -> str | None:
    extra = tool_call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def _function_response(name: str, content: Any) -> dict[str, Any]:
    text = _text_of(content)
    response: Any = None
    if text.lstrip()[:1] == "{":
        try:
            response = orjson.loads(text)
        except orjson.JSONDecodeError:
            response = None
    if not isinstance(response, dict):
        response = {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def to_contents(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(contents, systemInstruction parts) of an OpenAI `messages` array."""
    if not isinstance(messages, list):
        raise BadRequest("Invalid request format: `messages` must be an array")
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # tool call id -> function name, from the assistant turns so far
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"Invalid request format: messages[{i}] must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(content_parts(message.get("content")))
            continue
        if role not in ROLES:
            raise BadRequest(f"Invalid request format: messages[{i}].role {role!r} is not supported")
        if role == "tool":
            call_id = message.get("tool_call_id")
            name = tool_names.get(call_id) if isinstance(call_id, str) else None
            name = name or message.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(
                    f"Invalid request format: messages[{i}] (tool) has a tool_call_id that matches no earlier "
                    "assistant tool call"
                )
            parts = [_function_response(name, message.get("content"))]
        elif role == "function":  # the legacy function-calling shape
            name = message.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"Invalid request format: messages[{i}] (function) needs a name")
            parts = [_function_response(name, message.get("content"))]
        else:
            parts = content_parts(message.get("content"))
            if role == "assistant":
                parts.extend(_function_calls(message, tool_names, i))
        if not parts:
            continue
        gemini_role = ROLES[role]
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    return contents, system


def _function_calls(message: dict[str, Any], tool_names: dict[str, str], i: int) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if not calls and isinstance(legacy, dict):
        calls = [{"id": None, "type": "function", "function": legacy}]
    if not calls:
        return []
    if not isinstance(calls, list):
        raise BadRequest(f"Invalid request format: messages[{i}].tool_calls must be an array")
    parts = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest(f"Invalid request format: messages[{i}].tool_calls needs function names")
        if isinstance(call.get("id"), str):
            tool_names[call["id"]] = name
        part: dict[str, Any] = {"functionCall": {"name": name, "args": _arguments(function.get("arguments"))}}
        signature = _thought_signature(call)
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def clean_schema(schema: Any, defs: dict[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """A JSON schema cut down to what Gemini's Schema accepts (see the module docstring)."""
    if not isinstance(schema, dict):
        return {}
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        target = defs.get(name) if ref.startswith(("#/$defs/", "#/definitions/")) else None
        if target is None or depth >= MAX_REF_DEPTH:  # unknown or too deeply recursive: any object
            return {"type": "object", **({"description": schema["description"]} if "description" in schema else {})}
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return clean_schema(merged, defs, depth + 1)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in SCHEMA_KEYS:
            continue
        if key == "properties":
            if isinstance(value, dict) and value:  # Gemini rejects an empty `properties`
                out[key] = {name: clean_schema(sub, defs, depth) for name, sub in value.items()}
        elif key == "items":
            out[key] = clean_schema(value, defs, depth)
        elif key == "anyOf":
            if isinstance(value, list):
                out[key] = [clean_schema(sub, defs, depth) for sub in value]
        elif value is not None or key != "default":  # a null default is left out
            out[key] = value
    if "const" in schema and "enum" not in out:
        out["enum"] = [schema["const"]]
    if "oneOf" in schema and "anyOf" not in out and isinstance(schema["oneOf"], list):
        out["anyOf"] = [clean_schema(sub, defs, depth) for sub in schema["oneOf"]]
    all_of = schema.get("allOf")
    if isinstance(all_of, list):
        for sub in all_of:
            part = clean_schema(sub, defs, depth)
            props = part.pop("properties", None)
            required = part.pop("required", None)
            for key, value in part.items():
                out.setdefault(key, value)
            if props:
                out["properties"] = {**out.get("properties", {}), **props}
            if required:
                out["required"] = [*out.get("required", []), *(r for r in required if r not in out.get("required", []))]
    kind = out.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) < len(kind):
            out["nullable"] = True
        if len(kinds) == 1:
            out["type"] = kinds[0]
        else:
            del out["type"]
            if kinds:
                out["anyOf"] = [{"type": k} for k in kinds]
    if "anyOf" in out:
        branches = [b for b in out["anyOf"] if b != {"type": "null"}]
        if len(branches) < len(out["anyOf"]):
            out["nullable"] = True
        if len(branches) == 1:
            del out["anyOf"]
            for key, value in branches[0].items():
                out.setdefault(key, value)
        else:
            out["anyOf"] = branches
    if "enum" in out:
        values = out["enum"]
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            out.setdefault("type", "string")
        else:
            del out["enum"]  # Gemini enums are strings only
    if out.get("type") == "string" and "format" in out and out["format"] not in STRING_FORMATS:
        del out["format"]
    if isinstance(out.get("required"), list):
        props = out.get("properties") or {}
        required = [r for r in out["required"] if r in props]
        if required:
            out["required"] = required
        else:
            del out["required"]
    return out


def _has_properties(schema: dict[str, Any]) -> bool:
    return bool(schema.get("properties")) or schema.get("type") not in ("object", None)


def to_tools(tools: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(Gemini tools, function names) of an OpenAI `tools` array."""
    if tools is None:
        return [], []
    if not isinstance(tools, list):
        raise BadRequest("Invalid request format: `tools` must be an array")
    declarations: list[dict[str, Any]] = []
    native: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"Invalid request format: tools[{i}] must be an object")
        if tool.get("type") == "function" or (tool.get("type") is None and "function" in tool):
            function = tool.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name:
                raise BadRequest(f"Invalid request format: tools[{i}].function.name is required")
            declaration: dict[str, Any] = {"name": name}
            if isinstance(function.get("description"), str):
                declaration["description"] = function["description"]
            parameters = clean_schema(function.get("parameters"))
            if parameters and _has_properties(parameters):
                declaration["parameters"] = parameters
            declarations.append(declaration)
        elif "type" not in tool and tool.keys() & NATIVE_TOOL_KEYS:
            native.append(tool)
        else:
            raise BadRequest(f"Invalid request format: tools[{i}] of type {tool.get('type')!r} is not supported for "
                             "Gemini models")
    out = [{"functionDeclarations": declarations}] if declarations else []
    return out + native, [d["name"] for d in declarations]


def to_tool_config(choice: Any, names: list[str]) -> dict[str, Any] | None:
    if choice is None or not names:
        return None
    if isinstance(choice, str):
        mode = TOOL_CHOICE_MODES.get(choice)
        if mode is None:
            raise BadRequest(f"Invalid request format: tool_choice {choice!r} is not one of auto, none, required")
        return {"functionCallingConfig": {"mode": mode}}
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    raise BadRequest("Invalid request format: tool_choice must be auto, none, required or {\"type\": \"function\", ...}")


def to_generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for source, target in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("seed", "seed"),
                           ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
        value = body.get(source)
        if isinstance(value, int | float) and not isinstance(value, bool):
            config[target] = value
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool):
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if isinstance(stop, str) and stop:
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = [s for s in stop if isinstance(s, str)]
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != 1:
        config["candidateCount"] = n
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            config["responseMimeType"] = "application/json"
        elif kind == "json_schema":
            config["responseMimeType"] = "application/json"
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if isinstance(schema, dict):
                config["responseSchema"] = clean_schema(schema)
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort in THINKING_BUDGETS:
        budget = THINKING_BUDGETS[effort]
        config["thinkingConfig"] = {"thinkingBudget": budget, "includeThoughts": True} if budget else {
            "thinkingBudget": 0}
    native = body.get("generationConfig")
    if isinstance(native, dict):
        for key, value in native.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    return config


def to_gemini(body: dict[str, Any]) -> dict[str, Any]:
    """The generateContent request body for an OpenAI chat request body."""
    contents, system = to_contents(body.get("messages"))
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    tools, names = to_tools(body.get("tools"))
    if tools:
        request["tools"] = tools
    tool_config = to_tool_config(body.get("tool_choice"), names)
    if tool_config:
        request["toolConfig"] = tool_config
    config = to_generation_config(body)
    if config:
        request["generationConfig"] = config
    for key, target in PASSTHROUGH_KEYS.items():
        if body.get(key) is not None:
            request[target] = body[key]
    return request


# -- response: Gemini -> OpenAI -----------------------------------------------------------

FINISH_REASONS = {
    "STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter", "IMAGE_PROHIBITED_CONTENT": "content_filter",
}
CONTEXT_LENGTH = re.compile(r"input token count.*exceeds the maximum", re.IGNORECASE | re.DOTALL)


def finish_reason(reason: Any, called_functions: bool) -> str:
    mapped = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if mapped == "stop" and called_functions else mapped


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and value > 0 else 0


def to_usage(metadata: Any) -> dict[str, Any] | None:
    if not isinstance(metadata, dict):
        return None
    prompt = _count(metadata, "promptTokenCount")
    thoughts = _count(metadata, "thoughtsTokenCount")
    completion = _count(metadata, "candidatesTokenCount") + thoughts
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion,
                             "prompt_tokens_details": {"cached_tokens": _count(metadata, "cachedContentTokenCount")}}
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return usage


class _Ids:
    """Tool call ids for one answer: call_<n>_<suffix>, unique across the turns of a conversation."""

    __slots__ = ("suffix", "n")

    def __init__(self) -> None:
        self.suffix = os.urandom(4).hex()
        self.n = 0

    def next(self, given: Any) -> str:
        n, self.n = self.n, self.n + 1
        return given if isinstance(given, str) and given else f"call_{n}_{self.suffix}"


def _tool_call(part: dict[str, Any], ids: _Ids) -> dict[str, Any]:
    call = part["functionCall"]
    args = call.get("args")
    out: dict[str, Any] = {
        "id": ids.next(call.get("id")), "type": "function",
        "function": {"name": call.get("name") or "", "arguments": orjson.dumps(args if args is not None else {}).decode()},
    }
    signature = part.get("thoughtSignature")
    if isinstance(signature, str) and signature:
        out["extra_content"] = {"google": {"thought_signature": signature}}
    return out


def split_parts(parts: Any, ids: _Ids) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(text pieces, thought pieces, tool calls) of a candidate's parts."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    if not isinstance(parts, list):
        return texts, thoughts, calls
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("functionCall"), dict):
            calls.append(_tool_call(part, ids))
        elif isinstance(part.get("text"), str) and part["text"]:
            (thoughts if part.get("thought") is True else texts).append(part["text"])
    return texts, thoughts, calls


def _parts_of(candidate: dict[str, Any]) -> Any:
    content = candidate.get("content")
    return content.get("parts") if isinstance(content, dict) else None


def _response_id(data: dict[str, Any]) -> str:
    given = data.get("responseId")
    return f"chatcmpl-{given}" if isinstance(given, str) and given else f"chatcmpl-{os.urandom(12).hex()}"


def from_gemini(data: dict[str, Any], model: str) -> dict[str, Any]:
    """The OpenAI chat.completion for a generateContent answer."""
    ids = _Ids()
    choices = []
    candidates = data.get("candidates")
    for position, candidate in enumerate(candidates if isinstance(candidates, list) else ()):
        if not isinstance(candidate, dict):
            continue
        texts, thoughts, calls = split_parts(_parts_of(candidate), ids)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if calls:
            message["tool_calls"] = calls
        index = candidate.get("index")
        choices.append({"index": index if isinstance(index, int) else position, "message": message,
                        "logprobs": None, "finish_reason": finish_reason(candidate.get("finishReason"), bool(calls))})
    if not choices:  # the prompt was blocked (promptFeedback.blockReason), or nothing came back
        feedback = data.get("promptFeedback")
        blocked = isinstance(feedback, dict) and feedback.get("blockReason")
        choices.append({"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": "content_filter" if blocked else "stop"})
    version = data.get("modelVersion")
    out: dict[str, Any] = {
        "id": _response_id(data), "object": "chat.completion", "created": int(time.time()),
        "model": version if isinstance(version, str) and version else model, "choices": choices,
    }
    usage = to_usage(data.get("usageMetadata"))
    if usage is not None:
        out["usage"] = usage
    return out


def _error_object(data: Any) -> dict[str, Any] | None:
    if isinstance(data, list) and data:  # the non-SSE stream endpoint answers errors as a one-item array
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else None


def openai_error(status: int, error: dict[str, Any] | None, fallback_message: str = "") -> dict[str, Any]:
    """{"error": {"message", "type": <Gemini status>, "param": null, "code": <Gemini status>}}."""
    kind = error.get("status") if error is not None else None
    if not isinstance(kind, str) or not kind:
        kind = STATUS_NAMES.get(status, "UNKNOWN")
    message = error.get("message") if error is not None else None
    if not isinstance(message, str) or not message:
        message = fallback_message or f"Gemini returned HTTP {status}"
    code = "context_length_exceeded" if status == 400 and CONTEXT_LENGTH.search(message) else kind
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_body(status: int, raw: bytes) -> bytes:
    try:
        error = _error_object(orjson.loads(raw)) if raw else None
        text = ""
    except orjson.JSONDecodeError:
        error = None
        text = raw[:1000].decode(errors="replace").strip()
    return orjson.dumps(openai_error(status, error, text))


class StreamTranslator:
    """Gemini SSE event payloads in, OpenAI chat.completion.chunk SSE events out."""

    __slots__ = ("model", "id", "created", "ids", "opened", "tool_counts", "finished", "usage", "stopped")

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = ""
        self.created = int(time.time())
        self.ids = _Ids()
        self.opened: set[int] = set()  # choices whose role chunk went out
        self.tool_counts: dict[int, int] = {}
        self.finished: dict[int, str] = {}
        self.usage: dict[str, Any] | None = None
        self.stopped = False  # an error event went out: nothing more

    def _chunk(self, index: int | None, delta: dict[str, Any] | None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> bytes:
        choices = [] if index is None else [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
        data: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def event(self, payload: bytes) -> list[bytes]:
        if self.stopped or not payload.strip():
            return []
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return []  # not JSON: skipped (Gemini sends none)
        error = _error_object(data)
        if error is not None:
            self.stopped = True
            code = error.get("code")
            status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 502
            body = openai_error(status, error)
            body["error"]["code"] = status
            return [b"data: " + orjson.dumps(body) + b"\n\n"]
        if not isinstance(data, dict):
            return []
        if not self.id:
            self.id = _response_id(data)
            version = data.get("modelVersion")
            if isinstance(version, str) and version:
                self.model = version
        if isinstance(data.get("usageMetadata"), dict):
            self.usage = to_usage(data["usageMetadata"])
        out: list[bytes] = []
        candidates = data.get("candidates")
        if isinstance(candidates, list) and candidates:
            for position, candidate in enumerate(candidates):
                if isinstance(candidate, dict):
                    self._candidate(candidate, position, out)
        else:
            feedback = data.get("promptFeedback")
            if isinstance(feedback, dict) and feedback.get("blockReason") and 0 not in self.finished:
                self._open(0, out)
                self.finished[0] = "content_filter"
                out.append(self._chunk(0, {}, "content_filter"))
        return out

    def _open(self, index: int, out: list[bytes]) -> None:
        if index not in self.opened:
            self.opened.add(index)
            out.append(self._chunk(index, {"role": "assistant", "content": ""}))

    def _candidate(self, candidate: dict[str, Any], position: int, out: list[bytes]) -> None:
        index = candidate.get("index")
        index = index if isinstance(index, int) else position
        if index in self.finished:
            return
        self._open(index, out)
        texts, thoughts, calls = split_parts(_parts_of(candidate), self.ids)
        delta: dict[str, Any] = {}
        if thoughts:
            delta["reasoning_content"] = "".join(thoughts)
        if texts:
            delta["content"] = "".join(texts)
        if calls:
            first = self.tool_counts.get(index, 0)
            self.tool_counts[index] = first + len(calls)
            delta["tool_calls"] = [{"index": first + k, **call} for k, call in enumerate(calls)]
        if delta:
            out.append(self._chunk(index, delta))
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason and reason != "FINISH_REASON_UNSPECIFIED":
            mapped = finish_reason(reason, index in self.tool_counts)
            self.finished[index] = mapped
            out.append(self._chunk(index, {}, mapped))

    def finish(self) -> bytes:
        """At the end of Gemini's stream: the usage chunk, and [DONE] when every choice finished."""
        if self.stopped:
            return b""
        out = []
        if self.usage is not None:
            out.append(self._chunk(None, None, usage=self.usage))
        if self.finished and self.opened <= self.finished.keys():
            out.append(b"data: [DONE]\n\n")
        return b"".join(out)


async def translate_stream(response: UpstreamResponse, translator: StreamTranslator) -> AsyncIterator[bytes]:
    """The OpenAI SSE stream for a Gemini SSE response. Closing it closes the upstream response;
    a break in Gemini's stream raises UpstreamStreamError (from response.chunks())."""
    chunks = response.chunks()
    decoder = SSEDecoder()
    try:
        async for data in chunks:
            out: list[bytes] = []
            for _name, payload in decoder.feed(data):
                out.extend(translator.event(payload))
            if out:
                yield b"".join(out)
            if translator.stopped:
                return  # the finally closes the upstream response
        out = []
        for _name, payload in decoder.flush():
            out.extend(translator.event(payload))
        tail = translator.finish()
        if out or tail:
            yield b"".join(out) + tail
    finally:
        await chunks.aclose()


# -- the adapter --------------------------------------------------------------------------

VERSIONED = re.compile(r"/v\d+[a-z0-9]*$")


def model_path(model: str) -> str:
    """`models/<model>` (or a `tunedModels/...` name as it is), each segment URL-quoted."""
    if not model.startswith(("models/", "tunedModels/")):
        model = f"models/{model}"
    return "/".join(quote(segment, safe="-._~@") for segment in model.split("/"))


# The native passthrough: Call.endpoint "gemini.<method>" -> `models/{model}:<method>` upstream
NATIVE_METHODS = ("generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents")
NATIVE_ENDPOINTS = frozenset(f"gemini.{method}" for method in NATIVE_METHODS)


def native_body(body: dict[str, Any], model: str, nested_model: str | None) -> dict[str, Any]:
    """The client's body, with the `model` of nested requests set to `nested_model` (dropped when None)."""
    requests = body.get("requests")
    inner = body.get("generateContentRequest")
    if not isinstance(requests, list) and not isinstance(inner, dict):
        return body
    body = dict(body)

    def renamed(request: Any) -> Any:
        if not isinstance(request, dict) or "model" not in request:
            return request
        request = {k: v for k, v in request.items() if k != "model"}
        if nested_model is not None:
            request["model"] = nested_model
        return request

    if isinstance(requests, list):
        body["requests"] = [renamed(r) for r in requests]
    if isinstance(inner, dict):
        body["generateContentRequest"] = renamed(inner)
    return body


def native_error_body(status: int, raw: bytes) -> bytes:
    """An upstream error for a native Gemini client: Google's own error body as it is, or one in its shape."""
    try:
        error = _error_object(orjson.loads(raw)) if raw else None
    except orjson.JSONDecodeError:
        error = None
    if error is not None:
        return raw
    message = raw[:500].decode("utf-8", "replace").strip() or f"upstream returned HTTP {status}"
    return orjson.dumps(gemini_error(status, message))


async def send_native(adapter: Any, call: Call, target: Target, url: str, headers: dict[str, str],
                      body: dict[str, Any]) -> Reply:
    """POST a native Gemini request; the answer's bytes (whole, or the SSE stream) come back unchanged."""
    response, raw = await post_upstream(adapter, call, target, url, headers, orjson.dumps(body))
    reply_headers = response.pass_headers()
    if raw is None:
        return Reply(200, stream=response.chunks(), headers=reply_headers, media_type="text/event-stream")
    if response.status >= 400:
        return Reply(response.status, body=native_error_body(response.status, raw), headers=reply_headers)
    return Reply(response.status, body=raw, headers=reply_headers)


def native_method(call: Call) -> str:
    method = call.endpoint.partition(".")[2]
    return method + "?alt=sse" if call.stream else method


class GeminiGenerateContent:
    endpoints = frozenset({"chat", *NATIVE_ENDPOINTS})

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        self.config = config
        self.timeouts = config.timeouts or timeouts
        self.upstream = upstream
        self.static_headers = {"Content-Type": "application/json", **config.headers}

    def url(self, target: Target, stream: bool) -> str:
        method = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        return f"{self.base(target)}/{model_path(target.model)}{method}"

    def request_headers(self, target: Target) -> dict[str, str]:
        own_url = not target.base_url or target.base_url == self.config.base_url
        # a request-supplied credential never travels with the configured headers to a URL the client chose
        headers = dict(self.static_headers) if own_url or not target.custom_credential else {
            "Content-Type": "application/json"}
        if target.api_key:
            headers["x-goog-api-key"] = target.api_key
        if target.extra_headers:
            headers.update(target.extra_headers)
        return headers

    def base(self, target: Target) -> str:
        base = (target.base_url or self.config.base_url).rstrip("/")
        return base if VERSIONED.search(base) else base + "/v1beta"

    async def send(self, call: Call, target: Target) -> Reply:
        if call.client_format == "gemini":
            url = f"{self.base(target)}/{model_path(target.model)}:{native_method(call)}"
            body = native_body(call.body, target.model, model_path(target.model))
            return await send_native(self, call, target, url, self.request_headers(target), body)
        body = orjson.dumps(to_gemini(call.body))  # a malformed request is the gateway's 400, before any I/O
        response, raw = await post_upstream(self, call, target, self.url(target, call.stream),
                                            self.request_headers(target), body)
        headers = response.pass_headers()
        if raw is None:
            stream = translate_stream(response, StreamTranslator(target.model))
            return Reply(200, stream=stream, headers=headers, media_type="text/event-stream")
        if response.status >= 400:
            return Reply(response.status, body=error_body(response.status, raw), headers=headers)
        data = json_object(raw)
        if data is None:
            message = f"Provider '{target.provider}' answered with a body that is not a Gemini response"
            return Reply(502, body=orjson.dumps({"error": {"message": message, "type": "upstream_error",
                                                           "param": None, "code": "bad_upstream_response"}}),
                         headers=headers)
        return Reply(200, body=orjson.dumps(from_gemini(data, target.model)), headers=headers)

    async def close(self) -> None:
        return None
