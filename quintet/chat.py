"""Chat formatting, in one place: every stage that turns messages into model input renders them here.

quintet's chat format (what `quintet data tokenizer` writes into tokenizer_config.json) is Zephyr-style,
each turn closed by the end-of-sequence token, with Jamba's default special-token ids:

    0 <|pad|>   1 <|bos|>   2 <|eos|>   3 <|system|>   4 <|user|>   5 <|assistant|>
    <|system|>\\n{content}<|eos|>\\n<|user|>\\n{content}<|eos|>\\n<|assistant|>\\n{content}<|eos|>\\n

A model folder's own template (chat_template.jinja or tokenizer_config.json, read by `quintet.tokenizer`)
always wins. A tokenizer without one (the byte-level tokenizer) gets the plain template
`<|user|>\\n{prompt}\\n<|assistant|>\\n`. Templates are Jinja compiled in a sandbox the way transformers
compiles them (trim_blocks, lstrip_blocks, loop controls, `raise_exception`).
"""

from __future__ import annotations

import functools
from typing import Any

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES)]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# For tokenizers without a template: a user (or system) turn is wrapped, an assistant turn follows as is.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}"
    "{% else %}{{ '<|user|>\\n' + message['content'] }}"
    "{% if add_generation_prompt or not loop.last %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@functools.lru_cache(maxsize=16)
def compile_template(template: str, source: str = "chat template"):
    """A chat template compiled in the sandbox; a template that does not compile is named by `source`."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise ValueError(f"{source}: the chat template does not compile ({err})") from None


def check_messages(messages: Any, roles: tuple[str, ...] | None = None) -> None:
    """Messages are a list of {"role": str, "content": str} (roles limited to `roles` when given)."""
    if not isinstance(messages, list):
        raise ValueError(
            f"messages: expected a list of {{role, content}} objects, got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or (roles is not None and role not in roles):
            valid = ", ".join(roles) if roles else "a string"
            raise ValueError(f"messages[{i}].role = {role!r}: valid roles are {valid}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")


def render_template(
    template: str,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    source: str = "chat template",
    **special_tokens: str,
) -> str:
    """`messages` through `template`, as text (transformers' `apply_chat_template(tokenize=False)`).

    A template the sandbox stops (jinja2's SecurityError: it reached for an attribute or method that
    could run code) or that fails while rendering raises ValueError naming `source`."""
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        return compile_template(template, source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except SecurityError as err:
        raise ValueError(
            f"{source}: the chat template was stopped by the sandbox ({err}); a template may read the "
            "messages and the special tokens, not Python attributes or methods that change state"
        ) from None
    except TemplateError as err:
        raise ValueError(f"{source}: the chat template failed on these messages ({err})") from None


def apply_chat_template(
    messages: list[dict[str, str]], add_generation_prompt: bool = False, eos_token: str = EOS
) -> str:
    """`messages` in quintet's own chat format (`CHAT_TEMPLATE`), as text."""
    check_messages(messages, ROLES)
    return render_template(CHAT_TEMPLATE, messages, add_generation_prompt, eos_token=eos_token)


def chat_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """`messages` as text for `tokenizer`: its folder's template, else the plain template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.render_chat_text(messages, add_generation_prompt)
    check_messages(messages, ROLES)
    return render_template(PLAIN_TEMPLATE, messages, add_generation_prompt)


def render_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a one-turn chat prompt for `tokenizer`, ending where the assistant's answer starts."""
    return tokenizer.encode(chat_text(tokenizer, [{"role": "user", "content": prompt}]))
