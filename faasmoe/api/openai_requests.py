"""The OpenAI wire format at the edge: errors, and `/v1/completions` + `/v1/chat/completions` bodies.

Everything a client sends is checked here, before a model is touched: a wrong type, an out-of-range
number or an option we do not implement is a 400 that names the parameter, as OpenAI's API does.
Response shapes live in `faasmoe.openai_responses`; nothing here knows about aiohttp.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from faasmoe.api.structured_requests import FIELDS as STRUCTURED_FIELDS
from faasmoe.api.structured_requests import parse_structured
from faasmoe.api.tool_parsers import MARKERS
from faasmoe.api.tool_requests import ToolRequest, forced_grammar, parse_tools, template_tool_calls
from faasmoe.engine.sampling import SamplingParams
from faasmoe.engine.structured import StructuredOutput, compiler_for
from faasmoe.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy `logprobs` integer
MAX_CHAT_TOP_LOGPROBS = 20
MAX_PROMPT_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_CHOICES = 16  # n: each choice is a sequence with its own KV cache and concurrency slot
# Batched completions prompts (`prompt` as a list of strings or of token-id lists, as lm-eval's --batch_size
# sends): each prompt's every choice is a sequence of its own, admitted as one request; at most this many
# prompts, and prompts x n at most this many sequences, in one HTTP request (vLLM has no limit).
MAX_PROMPTS = 64
MAX_BATCH_SEQUENCES = 64
# Chat requests may omit max_tokens (OpenAI: "up to the context"). The engine reserves KV room
# and admission charges the tenant for the whole budget up front, so the default is bounded.
DEFAULT_CHAT_MAX_TOKENS = 4096
DEFAULT_COMPLETION_MAX_TOKENS = 16
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# A bound, not an estimate (English text averages ~4 characters a token): a text prompt longer than
# this many characters per token of the context cannot fit, so it is refused without tokenizing it.
MAX_CHARS_PER_TOKEN = 32
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A failure to report to the client as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` exactly as OpenAI renders errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> ApiError:
    # The same answer for a model that does not exist and one the caller may not see: a tenant
    # must not learn another tenant's private model names by probing.
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    "not_found_error", "model", "model_not_found")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says why not."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request ({exc}). Send a JSON object with "
                      "Content-Type: application/json.", code="invalid_json") from None
    except RecursionError:  # [[[[… a few thousand deep: the parser's stack, not our bug
        raise invalid("The JSON body of your request is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, got {_json_type(body)}.", code="invalid_json")
    _reject_lone_surrogates(body)
    return body


def _reject_lone_surrogates(body: dict) -> None:
    """JSON may escape half a UTF-16 pair ("\\ud800"); such a string is no text, and the tokenizer or
    the response's encoder would fail on it later. Walked without recursion: depth is the client's."""
    stack: list[Any] = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise invalid("The JSON body of your request holds a lone UTF-16 surrogate escape (such as "
                                  "\\ud800), which is not text.", code="invalid_json") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


@dataclass
class GenerationBody:
    """A validated completions or chat body, before its model's tokenizer is applied."""

    chat: bool
    model: str
    prompt: str | list[int] | None = None  # completions: the (first) prompt
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: every prompt of a batch
    messages: list[dict] | None = None  # chat: [{"role", "content": str}]
    max_tokens: int | None = None  # None: chat's default, resolved against the context window
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    n: int = 1  # choices, each its own sequence
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top alternatives per token (0 = the sampled token only); None = off
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's: top-N logprobs of every prompt token; None = off
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N"
    structured: StructuredOutput | None = None  # what the output must match (JSON schema, regex, ...)
    tools: ToolRequest | None = None  # chat: the functions the model may call, and how it must
    tool_parser: str | None = None  # set once the model is known: how its output names calls (None: not parsed)
    add_generation_prompt: bool = True  # chat: end the templated prompt with the assistant's turn
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat: extra template variables


def prompt_top_logprobs(body: GenerationBody) -> int | None:
    """How many alternatives the engine keeps per prompt token: vLLM's prompt_logprobs, or the completions
    logprobs when echo shows the prompt (what lm-eval's loglikelihood asks for); None = none computed."""
    wanted = [n for n in (body.prompt_logprobs, body.logprobs if body.echo else None) if n is not None]
    return max(wanted) if wanted else None


@dataclass
class PreparedPrompt:
    """The body resolved against one model: prompt token ids and the engine's sampling params."""

    token_ids: list[int]
    params: SamplingParams
    echo_text: str = ""  # the prompt text to prepend when echo is on


# Sampling options beyond OpenAI's chat basics, vLLM's among them (what `vllm bench` and others send): every
# generation endpoint takes them, checked by `_parse_common` (/v1/responses too).
SAMPLING_EXTRAS = ("stop", "stop_token_ids", "ignore_eos", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "logit_bias")
# Options accepted by both endpoints; values other than their neutral ones are rejected below.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stream", "stream_options", "logprobs",
           "user", "prompt_logprobs", "return_tokens_as_token_ids", *STRUCTURED_FIELDS, *SAMPLING_EXTRAS}
# vLLM's extra sampling options that clients send with their neutral value: accepted only as that.
_NEUTRAL_EXTRAS: dict[str, tuple] = {"min_tokens": (0,), "skip_special_tokens": (True,),
                                     "include_stop_str_in_output": (False,)}
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
_COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}
_CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
              "function_call", "parallel_tool_calls", "metadata", "store", "service_tier",
              "modalities", "chat_template_kwargs", "add_generation_prompt"}
# Unknown fields are ignored, as vLLM does, and logged once per name (at most this many names, so a client
# sending random names cannot grow the set without bound).
MAX_LOGGED_UNKNOWN = 1024
_logged_unknown: set[str] = set()
_logged_unknown_lock = threading.Lock()


def parse_completion(body: dict) -> GenerationBody:
    """Validate a `/v1/completions` body."""
    _ignore_unknown(body, _COMMON | _COMPLETION_ONLY)
    out = _parse_common(body, chat=False)
    out.prompts = _parse_prompts(body.get("prompt"))
    out.prompt = out.prompts[0]
    if len(out.prompts) * out.n > MAX_BATCH_SEQUENCES:
        raise invalid(f"{len(out.prompts)} prompts with n={out.n} are {len(out.prompts) * out.n} sequences; one "
                      f"request may hold at most {MAX_BATCH_SEQUENCES} (prompts x n).", "n")
    out.max_tokens = _int(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, lo=1)
    out.logprobs = _int(body, "logprobs", None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
    out.echo = _bool(body, "echo", False)
    if _int(body, "best_of", 1, lo=1) != 1:
        raise invalid("best_of must be 1: one completion is generated per request.", "best_of")
    if body.get("suffix") not in (None, ""):
        raise invalid("suffix is not supported (no insertion mode).", "suffix")
    return out


def parse_chat(body: dict) -> GenerationBody:
    """Validate a `/v1/chat/completions` body."""
    _ignore_unknown(body, _COMMON | _CHAT_ONLY)
    out = _parse_common(body, chat=True)
    out.messages = _parse_messages(body.get("messages"))
    out.add_generation_prompt, out.chat_template_kwargs = _template_options(body)
    out.max_tokens = _int(body, "max_tokens", None, lo=1)
    out.max_tokens = _int(body, "max_completion_tokens", out.max_tokens, lo=1)  # the newer name wins
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_CHAT_TOP_LOGPROBS)
    if _bool(body, "logprobs", False):
        out.logprobs = top or 0
    elif top is not None:
        raise invalid("top_logprobs needs logprobs set to true.", "top_logprobs")
    if body.get("functions") or body.get("function_call") not in (None, "none", "auto"):
        param = "functions" if body.get("functions") else "function_call"
        raise invalid("functions and function_call are deprecated and not supported; send tools and tool_choice.",
                      param)
    out.tools = parse_tools(body)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise invalid("modalities must be [\"text\"].", "modalities")
    return out


def _template_options(body: dict) -> tuple[bool, dict[str, Any]]:
    """add_generation_prompt and the extra chat template variables (vLLM's chat_template_kwargs)."""
    kwargs = body.get("chat_template_kwargs")
    add = True
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise invalid(f"chat_template_kwargs must be an object, got {_json_type(kwargs)}.", "chat_template_kwargs")
        if "messages" in kwargs:
            raise invalid("chat_template_kwargs must not set messages.", "chat_template_kwargs")
        kwargs = dict(kwargs)
        add = _bool(kwargs, "add_generation_prompt", True, param="chat_template_kwargs.add_generation_prompt")
        kwargs.pop("add_generation_prompt", None)
    return _bool(body, "add_generation_prompt", add), kwargs or {}


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """The chat template applied to validated messages; a template that refuses them is a 400."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}))
    except Exception as exc:  # jinja raise_exception() in a template: the conversation's fault
        raise invalid(f"the model's chat template rejected these messages: {exc}", "messages") from None


def tokenize_body(body: dict, tokenizer: Tokenizer) -> dict:
    """vLLM's POST /tokenize: a prompt, or chat messages through the template -> token ids."""
    if body.get("messages") is not None:
        add, kwargs = _template_options(body)
        tools = parse_tools(body)
        if tools is not None:
            kwargs = {**kwargs, "tools": [dict(t) for t in tools.tools]}
        text = render_chat(tokenizer, _parse_messages(body["messages"]), add, kwargs)
        ids = tokenizer.encode(text, add_special_tokens=_bool(body, "add_special_tokens", False))
    elif isinstance(body.get("prompt"), str):
        ids = tokenizer.encode(body["prompt"], add_special_tokens=_bool(body, "add_special_tokens", True))
    else:
        raise invalid("send a prompt (a string) or messages to tokenize.", "prompt")
    strs = [tokenizer.id_to_token(t) for t in ids] if _bool(body, "return_token_strs", False) else None
    return {"count": len(ids), "tokens": ids, "token_strs": strs}


def detokenize_body(body: dict, tokenizer: Tokenizer, vocab_size: int) -> dict:
    """vLLM's POST /detokenize: token ids -> {"prompt": text}."""
    ids = _int_list(body, "tokens")
    if ids is None:
        raise invalid("send tokens, a list of token ids.", "tokens")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is out of range: this model's ids are 0..{vocab_size - 1}.", "tokens")
    return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}


def _parse_common(body: dict, chat: bool) -> GenerationBody:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter (a non-empty string)." if model is None else
                      f"model must be a non-empty string, got {_json_type(model)}.", "model")
    out = GenerationBody(chat=chat, model=model)
    out.temperature = _number(body, "temperature", 1.0, lo=0.0, hi=2.0)
    out.top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if out.top_p == 0.0:
        raise invalid("top_p must be greater than 0 and at most 1, got 0.", "top_p")
    out.n = _int(body, "n", 1, lo=1, hi=MAX_CHOICES)
    out.seed = _int(body, "seed", None, lo=_SEED_RANGE[0], hi=_SEED_RANGE[1])
    out.stop = _parse_stop(body.get("stop"))
    out.stop_token_ids = _int_list(body, "stop_token_ids")
    out.ignore_eos = _bool(body, "ignore_eos", False)
    out.presence_penalty = _number(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0)
    out.frequency_penalty = _number(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0)
    out.repetition_penalty = _number(body, "repetition_penalty", 1.0, lo=0.0, hi=math.inf)
    if out.repetition_penalty == 0.0:
        raise invalid("repetition_penalty must be greater than 0 (1 = off).", "repetition_penalty")
    out.top_k = _int(body, "top_k", 0, lo=-1)
    out.min_p = _number(body, "min_p", 0.0, lo=0.0, hi=1.0)
    out.logit_bias = _parse_logit_bias(body.get("logit_bias"))
    out.prompt_logprobs = _int(body, "prompt_logprobs", None, lo=0, hi=MAX_PROMPT_LOGPROBS)
    out.tokens_as_ids = _bool(body, "return_tokens_as_token_ids", False)
    out.structured = parse_structured(body)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f"user must be a string, got {_json_type(user)}.", "user")
    out.stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not out.stream:
            raise invalid("stream_options is only allowed when stream is true.", "stream_options")
        if not isinstance(options, dict):
            raise invalid(f"stream_options must be an object, got {_json_type(options)}.", "stream_options")
        out.include_usage = _bool(options, "include_usage", False, param="stream_options.include_usage")
    return out


def _parse_logit_bias(bias: Any) -> dict[int, float] | None:
    """OpenAI's {"token id": bias in [-100, 100]} (keys are strings in JSON)."""
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise invalid(f"logit_bias must be an object mapping token ids to numbers, got {_json_type(bias)}.", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise invalid(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise invalid(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key}.", "logit_bias")
        out[int(key)] = float(value)
    return out


def _parse_prompts(prompt: Any) -> list[str | list[int]]:
    """`prompt` as OpenAI and vLLM take it: a string, a list of token ids, or a batch: a list of strings or of
    token-id lists (each one prompt; one is what the openai client sends for a single prompt)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if prompt is None:
        raise invalid("you must provide a prompt (a string or a list of token ids).", "prompt")
    if isinstance(prompt, list) and not prompt:
        raise invalid("prompt must not be empty.", "prompt")
    if not isinstance(prompt, list) or not all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt must be a string, a list of token ids (integers), or a list of those (a batch).",
                      "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise invalid(f"a batch holds at most {MAX_PROMPTS} prompts, got {len(prompt)}; split it into several "
                      "requests.", "prompt")
    for i, p in enumerate(prompt):
        if isinstance(p, list) and not (p and all(_is_int(t) for t in p)):
            raise invalid(f"prompt[{i}] must be a string or a non-empty list of token ids (integers).", "prompt")
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"stop must be a string or a list of strings, got {_json_type(stop)}.", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", "stop")
    if any(s == "" for s in stops):
        raise invalid("stop strings must not be empty.", "stop")
    return stops


def _parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object, got {_json_type(m)}.", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}.", f"{where}.role")
        if m.get("function_call"):
            raise invalid(f"{where}.function_call is deprecated and not supported; send tool_calls.",
                          f"{where}.function_call")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": role, "content": _message_text(content, f"{where}.content")})
        if isinstance(m.get("name"), str):
            out[-1]["name"] = m["name"]
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise invalid(f"{where}: only assistant messages hold tool_calls.", f"{where}.tool_calls")
            out[-1]["tool_calls"] = template_tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            out[-1]["tool_call_id"] = m["tool_call_id"]
    return out


def _message_text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or a list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise invalid(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                              f"supported, got {kind!r}.", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where} must be a string or a list of text parts, got {_json_type(content)}.", where)


def check_prompt_size(body: GenerationBody, max_context: int) -> None:
    """Refuse a prompt that cannot fit the context by its size alone: tokenizing it would be the cost."""
    what = "messages" if body.chat else "prompt"
    if body.chat:
        chars = sum(len(m["content"]) for m in body.messages or [])
    elif isinstance(body.prompt, str):
        chars = len(body.prompt)
    else:
        tokens = len(body.prompt or [])
        if tokens > max_context:
            raise _too_long(max_context, f"{tokens} tokens in the prompt", what)
        return
    limit = max_context * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise _too_long(max_context, f"{chars} characters in the {what}, over the {limit} that "
                        f"{max_context} tokens can hold", what)


def _too_long(max_context: int, asked: str, what: str) -> ApiError:
    return invalid(f"This model's maximum context length is {max_context} tokens. However, you sent {asked}. "
                   f"Please reduce the length of the {what}.", what, "context_length_exceeded")


def prepare_all(body: GenerationBody, tokenizer: Tokenizer, max_context: int, vocab_size: int) -> list[PreparedPrompt]:
    """`prepare` for every prompt of the body (one, except for batched completions), all before any runs:
    one prompt that cannot be served fails the whole request, its message naming which one."""
    if len(body.prompts) <= 1:
        return [prepare(body, tokenizer, max_context, vocab_size)]
    out = []
    for i, prompt in enumerate(body.prompts):
        try:
            out.append(prepare(dataclasses.replace(body, prompt=prompt, prompts=[prompt]), tokenizer, max_context,
                               vocab_size))
        except ApiError as exc:
            exc.message = f"prompt {i} of the batch: {exc.message}"
            raise
    return out


def prepare(body: GenerationBody, tokenizer: Tokenizer, max_context: int, vocab_size: int) -> PreparedPrompt:
    """Tokenize the prompt for this model, check it fits the context and build the sampling params.

    CPU-bound (templating, tokenizing): the frontend calls it in a thread, never on the event loop.
    """
    check_prompt_size(body, max_context)
    echo_text = ""
    if body.chat:
        kwargs = body.chat_template_kwargs
        if body.tools is not None:  # the template shows the model its tools (with "none" too, as vLLM does)
            kwargs = {**kwargs, "tools": [dict(t) for t in body.tools.tools]}
        text = render_chat(tokenizer, body.messages or [], body.add_generation_prompt, kwargs)
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template already holds BOS etc.
        what = "messages"
    elif isinstance(body.prompt, str):
        ids = tokenizer.encode(body.prompt)
        echo_text, what = body.prompt, "prompt"
    else:
        ids = list(body.prompt or [])
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} in prompt is out of range: this model's ids are 0..{vocab_size - 1}.",
                          "prompt")
        echo_text, what = (tokenizer.decode(ids) if body.echo else ""), "prompt"
    if not ids:
        raise invalid(f"the {what} is empty after tokenization; send at least one token.", what)
    for t in body.stop_token_ids or []:
        if not 0 <= t < vocab_size:
            raise invalid(f"stop_token_ids holds {t}, outside this model's ids 0..{vocab_size - 1}.",
                          "stop_token_ids")
    room = max_context - len(ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(max(room, 1), DEFAULT_CHAT_MAX_TOKENS)
    if room < 1 or max_tokens > room:
        asked = f"{len(ids)} in the {what}, {max_tokens} in the completion"
        raise invalid(f"This model's maximum context length is {max_context} tokens. However, you requested "
                      f"{len(ids) + max_tokens} tokens ({asked}). Please reduce the length of the {what} or "
                      "max_tokens.", what if room < 1 else "max_tokens", "context_length_exceeded")
    bad = next((t for t in body.logit_bias or {} if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"logit_bias holds token id {bad}, outside this model's ids 0..{vocab_size - 1}.", "logit_bias")
    # vLLM's stop_token_ids stop in addition to EOS; the engine's replace it, so merge here.
    stop_ids = None if body.stop_token_ids is None else sorted(set(body.stop_token_ids) | tokenizer.eos_token_ids)
    # The output constraint is compiled here, off the event loop (cached per text; a 400 if it cannot be).
    grammar = compiler_for(tokenizer, vocab_size).compile(body.structured) if body.structured else None
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stop=list(body.stop), stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, top_k=body.top_k,
                            min_p=body.min_p, presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                            logit_bias=body.logit_bias, grammar=grammar,
                            # a family whose call marker is a control token: its text must reach the parser
                            skip_special_tokens=not (body.tool_parser and MARKERS[body.tool_parser].special))
    return PreparedPrompt(ids, params, echo_text if body.echo else "")


def resolve_tools(body: GenerationBody, parser: str, auto_tool_choice: bool, tokenizer: Tokenizer) -> GenerationBody:
    """The body with its tools bound to the model's parser: `required` or a named function become a grammar
    (combined with another output constraint they are a 400); `auto` needs auto tool choice on."""
    request = body.tools
    if request is None or request.choice == "none":
        return body
    if request.choice == "auto" and not auto_tool_choice:
        raise invalid("\"auto\" tool choice requires --enable-auto-tool-choice on this server.", "tool_choice")
    structured = body.structured
    if request.forced:
        if structured is not None:
            raise invalid(f"tool_choice {request.choice!r} and {structured.param} both constrain the output; "
                          "send one.", "tool_choice")
        marker = tokenizer.token_to_id(MARKERS[parser].start) if MARKERS[parser].special else None
        structured = forced_grammar(request, parser, marker)
    return dataclasses.replace(body, tool_parser=parser, structured=structured)


# --- field checks ---------------------------------------------------------------------------------


def _ignore_unknown(body: dict, known: set[str]) -> None:
    """Fields this server does not know are ignored, as vLLM does, with one warning per name."""
    for name, neutral in _NEUTRAL_EXTRAS.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) != isinstance(neutral[0], bool) or value not in neutral):
            raise invalid(f"{name} is not supported; send {json.dumps(neutral[0])} or leave it out.", name)
    for name in sorted(set(body) - known - set(_NEUTRAL_EXTRAS)):
        with _logged_unknown_lock:
            if name in _logged_unknown or len(_logged_unknown) >= MAX_LOGGED_UNKNOWN:
                continue
            _logged_unknown.add(name)
        log.warning("ignoring the unknown request field %r (logged once per name)", name[:100])


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None,
         param: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    param = param or name
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 is an integer in JSON's number model
    if not _is_int(value):
        raise invalid(f"{param} must be an integer, got {_json_type(value)} ({value!r}).", param)
    _check_range(param, value, lo, hi)
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{name} must be a number, got {_json_type(value)} ({value!r}).", name)
    _check_range(name, value, lo, hi)
    return float(value)


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise invalid(f"{value} is less than the minimum of {lo} - '{name}'.", name)
    if hi is not None and value > hi:
        raise invalid(f"{value} is greater than the maximum of {hi} - '{name}'.", name)


def _bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{param or name} must be a boolean, got {_json_type(value)} ({value!r}).", param or name)
    return value


def _int_list(body: dict, name: str) -> list[int] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise invalid(f"{name} must be a list of integers, got {_json_type(value)}.", name)
    return list(value)
