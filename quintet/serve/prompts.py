"""Prompts from request bodies: chat messages through the folder's template, prefix boundaries, stop text."""

from __future__ import annotations

from quintet.chat import chat_text
from quintet.tokenizer import StreamDecoder, TextTokenizer


class ChatRenderer:
    """Messages to prompt tokens through quintet.chat: the folder's chat template (sandboxed, as the
    loader renders it), the plain template for a tokenizer without one."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return chat_text(self.tokenizer, messages, add_generation_prompt)

    def render(self, messages: list[dict[str, str]]) -> tuple[list[int], tuple[int, ...]]:
        """Token ids of the prompt (ending where the answer starts) and the token counts where the rendered
        earlier messages end (the system prompt, earlier turns): the prefixes a later request may share."""
        full = self.text(messages, True)
        ids = self.tokenizer.encode(full)
        marks = set()
        for k in range(1, len(messages)):
            for gen in (False, True) if messages[k]["role"] == "assistant" else (False,):
                part = self.text(messages[:k], gen)
                if part and full.startswith(part):
                    head = self.tokenizer.encode(part)
                    if 0 < len(head) < len(ids) and ids[: len(head)] == head:
                        marks.add(len(head))
        return ids, tuple(sorted(marks))


class TextStream:
    """Token ids in, text out, stopping at the first of `stops`: text that may begin a stop string is
    held back until it is known not to."""

    def __init__(self, tokenizer: TextTokenizer, stops: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.decoder.push(token)
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out, self.pending, self.stopped = self.pending[:at], "", True
                return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
