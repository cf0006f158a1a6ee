"""OpenAI response objects for one request: the whole response, or its stream of chunks.

`ResponseShape` knows which endpoint it answers (completions or chat) and keeps the little state
a stream needs (the role chunk, logprobs of tokens whose text is still held back, text offsets),
so the HTTP handlers only move events to bytes.
"""

from __future__ import annotations

import functools
import re
import time

from faasmoe.api.tool_parsers import ToolCallStream, parse_tool_calls
from faasmoe.engine.requests import Finished, PromptLogprob, TokenEvent, Usage
from faasmoe.model.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def usage_dict(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's table: byte-level BPE spells each of the 256 bytes as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """A token's text and exact bytes, as the logprobs formats show them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = tokenizer.backend.decoder
        self._byte_level = decoder is not None and type(decoder).__name__ == "ByteLevel"
        self._text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def text(self, token_id: int) -> str:
        """How logprobs name the token."""
        return self._text(token_id)

    def plain(self, token_id: int) -> str:
        """The token's decoded text (what text offsets count)."""
        return self._text(token_id)

    def bytes(self, token_id: int) -> list[int]:
        """The token's UTF-8 bytes; a token holding part of a character gets its real bytes, not U+FFFD's."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None:
            if self._byte_level:
                table = _byte_decoder()
                if all(ch in table for ch in piece):
                    return [table[ch] for ch in piece]
            match = _BYTE_TOKEN.fullmatch(piece)  # SentencePiece byte fallback
            if match:
                return [int(match.group(1), 16)]
        return list(self.text(token_id).encode("utf-8"))


class TokenIds(TokenText):
    """Tokens named by id, as vLLM's return_tokens_as_token_ids does ("token_id:N"): exact where several
    ids decode to the same text (a byte-level BPE's partial characters)."""

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}"

    def bytes(self, token_id: int) -> list[int]:
        return list(self.text(token_id).encode())


class ResponseShape:
    """Builds the response objects of one `/v1/completions` or `/v1/chat/completions` request."""

    def __init__(self, chat: bool, request_id: str, model: str, tokenizer: Tokenizer, logprobs: int | None,
                 echo_text: str = "", created: int | None = None, prompt_ids: list[int] | None = None,
                 echo_logprobs: bool = False, prompt_logprobs: int | None = None, index: int = 0,
                 tokens_as_ids: bool = False, tool_parser: str | None = None) -> None:
        self.chat = chat
        self.id = request_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.logprobs = logprobs
        self.echo_text = echo_text
        self.tokens = TokenIds(tokenizer) if tokens_as_ids else TokenText(tokenizer)
        self._pending: list[TokenEvent] = []  # tokens whose logprobs have not been streamed yet
        self._offset = len(echo_text)  # completions' text_offset of the next token
        self._role_sent = False  # chat streams: the role rides on the first token's chunk
        self.prompt_ids = list(prompt_ids or [])
        self.echo_logprobs = echo_logprobs  # completions: echo with logprobs covers the prompt's tokens too
        self.prompt_logprobs = prompt_logprobs  # vLLM's choice-level prompt_logprobs, top N
        self._prompt_sent = False
        self.index = index  # the choice's index among n
        # Chat with tools: the text is read for tool calls in the model family's format (None: it is not).
        self.tool_parser = tool_parser if chat else None
        self._tool_stream = ToolCallStream(tool_parser) if self.tool_parser else None

    # --- whole responses ------------------------------------------------------------------------

    def response(self, finished: Finished, events: list[TokenEvent],
                 prompt: list[PromptLogprob | None] | None = None) -> dict:
        """The non-streamed response (`text_completion` or `chat.completion`)."""
        logprobs = self._logprobs(events)
        if self.echo_logprobs and not self.chat and prompt is not None:
            logprobs = self._join(self._echo_logprobs(prompt), logprobs)
        if self.chat:
            message: dict = {"role": "assistant", "content": finished.text}
            finish_reason = finished.finish_reason
            if self.tool_parser:
                content, calls = parse_tool_calls(self.tool_parser, finished.text)
                if calls:
                    message = {"role": "assistant", "content": content,
                               "tool_calls": [c.as_openai() for c in calls]}
                    if finish_reason == "stop":  # cut by max_tokens, it stays "length" (with the calls before the cut)
                        finish_reason = "tool_calls"
            choice = {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": self.index, "text": self.echo_text + finished.text, "logprobs": logprobs,
                      "finish_reason": finished.finish_reason}
        if self.prompt_logprobs is not None and prompt is not None:
            choice["prompt_logprobs"] = self._vllm_prompt_logprobs(prompt)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_dict(finished.usage)}

    # --- streams ----------------------------------------------------------------------------------

    def first_chunks(self) -> list[dict]:
        """Chunks sent before any token: the prompt when completions echo it (unless its logprobs are
        asked for: they exist after prefill, see prompt_chunks). Chat's role is not one of them: as in
        vLLM it goes out with the first token, so a client's time to first chunk is real."""
        if self.chat or not self.echo_text or self.echo_logprobs or self.prompt_logprobs is not None:
            return []
        self._prompt_sent = True
        return [self._chunk(self.echo_text)]

    def prompt_chunks(self, prompt: list[PromptLogprob | None] | None) -> list[dict]:
        """Completions streams: at the first token, the echoed prompt with its logprobs (once)."""
        if self._prompt_sent or self.chat:
            return []
        self._prompt_sent = True
        if not (self.echo_text or self.prompt_logprobs is not None):
            return []
        logprobs = self._echo_logprobs(prompt) if self.echo_logprobs and prompt is not None else None
        chunk = self._chunk(self.echo_text, logprobs=logprobs)
        if self.prompt_logprobs is not None and prompt is not None:
            chunk["choices"][0]["prompt_logprobs"] = self._vllm_prompt_logprobs(prompt)
        return [chunk]

    def token_chunk(self, event: TokenEvent) -> dict | None:
        """The chunk carrying this token's text, or None while the engine holds its text back (chat's
        first token always has one: the role, with whatever text there is)."""
        if self.logprobs is not None:
            self._pending.append(event)
        if self._tool_stream is not None:
            return self._tool_chunk(self._tool_stream.feed(event.text))
        if self.chat and not self._role_sent:
            self._role_sent = True
            return self._chunk({"role": "assistant", "content": event.text}, logprobs=self._take_pending())
        if not event.text and self.logprobs is None:  # as vLLM: a token with no text yet waits, unless its logprob is asked
            return None
        return self._chunk({"content": event.text} if self.chat else event.text, logprobs=self._take_pending())

    def _tool_chunk(self, delta: dict, finish_reason: str | None = None) -> dict | None:
        """A chat chunk of content and tool-call deltas (the role rides on the first)."""
        if not self._role_sent:
            self._role_sent = True
            delta = {"role": "assistant", "content": "", **delta}
        elif not delta and self.logprobs is None and finish_reason is None:
            return None
        return self._chunk(delta, finish_reason, self._take_pending())

    def final_chunk(self, finish_reason: str) -> dict:
        """The last choice chunk: finish_reason and logprobs still pending (usage has its own chunk)."""
        if self._tool_stream is not None:
            delta = self._tool_stream.feed("", final=True)
            if self._tool_stream.called and finish_reason == "stop":
                finish_reason = "tool_calls"
            return self._tool_chunk(delta, finish_reason)
        delta = {"role": "assistant"} if self.chat and not self._role_sent else {}
        self._role_sent = True
        return self._chunk(delta if self.chat else "", finish_reason, self._take_pending())

    def usage_chunk(self, usage: Usage) -> dict:
        """stream_options.include_usage: a last chunk with no choices and the request's usage."""
        return {**self._envelope(), "choices": [], "usage": usage_dict(usage)}

    def _chunk(self, delta: dict | str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        choice: dict = {"index": self.index}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return {**self._envelope(), "choices": [choice]}

    def _envelope(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _take_pending(self) -> dict | None:
        if self.logprobs is None or not self._pending:
            return None
        events, self._pending = self._pending, []
        return self._logprobs(events)

    # --- logprobs ---------------------------------------------------------------------------------

    def _logprobs(self, events: list[TokenEvent]) -> dict | None:
        if self.logprobs is None:
            return None
        return self._chat_logprobs(events) if self.chat else self._completion_logprobs(events)

    def _echo_logprobs(self, prompt: list[PromptLogprob | None]) -> dict:
        """The legacy format for the echoed prompt: the first token's logprob and top_logprobs are null."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for token_id, lp in zip(self.prompt_ids, prompt):
            text = self.tokens.text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            if lp is None:
                out["top_logprobs"].append(None)
            else:
                top = {self.tokens.text(t): v for t, v in list(lp.top_logprobs.items())[:self.logprobs or 0]}
                top.setdefault(text, lp.logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(self.tokens.plain(token_id))
        return out

    @staticmethod
    def _join(first: dict, then: dict | None) -> dict:
        return first if then is None else {k: first[k] + then[k] for k in first}

    def _vllm_prompt_logprobs(self, prompt: list[PromptLogprob | None]) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {id: {logprob, rank, decoded_token}},
        the prompt token itself and the top N."""
        out: list[dict | None] = []
        for token_id, lp in zip(self.prompt_ids, prompt):
            if lp is None:
                out.append(None)
                continue
            entry = {str(t): {"logprob": v, "rank": rank, "decoded_token": self.tokens.text(t)}
                     for rank, (t, v) in enumerate(list(lp.top_logprobs.items())[:self.prompt_logprobs], start=1)}
            entry[str(token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.tokens.text(token_id)}
            out.append(entry)
        return out

    def _completion_logprobs(self, events: list[TokenEvent]) -> dict:
        """Legacy format: parallel lists; top_logprobs holds the top N and the sampled token."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in events:
            text = self.tokens.text(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            top = {self.tokens.text(t): lp for t, lp in (e.top_logprobs or {}).items()}
            top.setdefault(text, e.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            self._offset += len(self.tokens.plain(e.token_id))
        return out

    def _chat_logprobs(self, events: list[TokenEvent]) -> dict:
        content = []
        for e in events:
            entry = self._chat_entry(e.token_id, e.logprob)
            entry["top_logprobs"] = [self._chat_entry(t, lp) for t, lp in
                                     sorted((e.top_logprobs or {}).items(), key=lambda kv: -kv[1])][:self.logprobs]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokens.text(token_id), "logprob": logprob, "bytes": self.tokens.bytes(token_id)}
