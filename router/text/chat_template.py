"""ChatTemplate: render a checkpoint's own Jinja chat template (HF semantics) and encode it injection-safely.

The template comes from the checkpoint (`chat_template.jinja`, else `chat_template` in
tokenizer_config.json) and runs in jinja2's ImmutableSandboxedEnvironment with the variables and
helpers that Hugging Face's `apply_chat_template` provides (docs/k2-format.md, Chat format).

Injection safety (docs/k2-format.md, Tokenizer): before rendering, every occurrence of a control-token text
inside a caller-supplied string (message contents, names, ids, tool arguments, tool schemas) is
replaced by a private-use placeholder. After rendering, only marker text the template itself
produced becomes control tokens; each placeholder is encoded as the ordinary text it stood for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Placeholders live in Supplementary Private Use Area-B; caller text in that range is itself protected.
_PLACEHOLDER_BASE = 0x100000
_PLACEHOLDER_LIMIT = 0x10FFFF
_PLACEHOLDER_RE = re.compile("[\U00100000-\U0010FFFF]")
_PLACEHOLDER_SPLIT = re.compile("([\U00100000-\U0010FFFF])")


class ChatTemplateError(ValueError):
    """The template could not be rendered (syntax error, `raise_exception`, bad messages)."""


class SpecialTokenizer(Protocol):
    """What `ChatTemplate.encode` needs from a tokenizer (router.tokenizer.K2Tokenizer provides it)."""

    special_pattern: re.Pattern[str]

    @property
    def special_tokens(self) -> dict[str, int]: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template plus the token names HF passes to it (`bos_token`, `eos_token`, ...)."""

    source: str
    token_names: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from exc
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplate":
        """Read the checkpoint's template: `chat_template.jinja` wins over tokenizer_config.json, as in transformers."""
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        jinja_path = path / "chat_template.jinja"
        source = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else _config_template(config)
        if not source:
            raise ChatTemplateError(f"{path} has neither chat_template.jinja nor a chat_template in tokenizer_config.json")
        names = {k: _token_text(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
        names["additional_special_tokens"] = [_token_text(t) for t in config.get("additional_special_tokens", [])]
        return cls(source, names)

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True, **extra: Any,
    ) -> str:
        """Render messages (OpenAI-shaped dicts) and tools to the prompt text, as HF's apply_chat_template does."""
        variables = {**self.token_names, **extra}
        variables.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            return self._compiled.render(**variables)  # type: ignore[attr-defined]
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode(
        self, tokenizer: SpecialTokenizer, messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True, **extra: Any,
    ) -> list[int]:
        """Render and tokenize; control tokens come only from the template's own text, never from caller strings."""
        protector = _Protector(tokenizer.special_pattern)
        rendered = self.render(
            protector.protect(messages), protector.protect(tools), add_generation_prompt,
            **protector.protect(extra),
        )
        return protector.encode(rendered, tokenizer)


class _Protector:
    """Swaps control-token text in caller strings for placeholders, then encodes the rendered prompt."""

    def __init__(self, special_pattern: re.Pattern[str]) -> None:
        self._special = special_pattern
        self._placeholder_of: dict[str, str] = {}
        self._original_of: dict[str, str] = {}

    def protect(self, value: Any) -> Any:
        """A deep copy of `value` with control-token texts and private-use characters of every string replaced."""
        if isinstance(value, str):
            return self._protect_str(value)
        if isinstance(value, dict):
            return {self.protect(k): self.protect(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.protect(v) for v in value]
        return value

    def _protect_str(self, text: str) -> str:
        # Private-use characters first: the placeholders introduced next must not be re-read as caller text.
        if _PLACEHOLDER_RE.search(text):
            text = _PLACEHOLDER_RE.sub(lambda m: self._placeholder(m.group(0)), text)
        return self._special.sub(lambda m: self._placeholder(m.group(0)), text)

    def _placeholder(self, original: str) -> str:
        if original not in self._placeholder_of:
            code = _PLACEHOLDER_BASE + len(self._placeholder_of)
            if code > _PLACEHOLDER_LIMIT:
                raise ChatTemplateError("too many distinct control-token texts in one request")
            self._placeholder_of[original] = chr(code)
            self._original_of[chr(code)] = original
        return self._placeholder_of[original]

    def encode(self, rendered: str, tokenizer: SpecialTokenizer) -> list[int]:
        """Template markers -> control ids; everything between them (placeholders restored) -> ordinary BPE."""
        special_ids = tokenizer.special_tokens
        ids: list[int] = []
        text: list[str] = []
        # The capturing split puts single private-use characters at odd indices.
        for k, piece in enumerate(_PLACEHOLDER_SPLIT.split(rendered)):
            if k % 2:
                text.append(self._original_of.get(piece, piece))
                continue
            last = 0
            for match in tokenizer.special_pattern.finditer(piece):
                text.append(piece[last:match.start()])
                last = match.end()
                ids += tokenizer.encode("".join(text))
                text = []
                ids.append(special_ids[match.group(0)])
            text.append(piece[last:])
        ids += tokenizer.encode("".join(text))
        return ids


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox HF's apply_chat_template uses: trim/lstrip blocks, loop controls, tojson, raise_exception."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's tojson: unlike jinja's built-in, it does not HTML-escape and keeps non-ASCII text."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _config_template(config: dict[str, Any]) -> str:
    """`chat_template` is a string, or a list of {"name", "template"} where "default" is the chat one."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", "")
    return template or ""


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)
