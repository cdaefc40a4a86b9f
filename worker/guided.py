"""Structured output with xgrammar: JSON schema, any JSON object, regex, and K2's tool-call section.

A `GuidedDecoding` compiles each distinct GuidedSpec once (cached) against the checkpoint's vocabulary;
each request gets a `Guide` (a grammar matcher). Every step the engine masks the logits of guided rows to
the tokens the grammar allows, and advances the matcher with the sampled token.

K2 tool calls (docs/k2-format.md, Tool calls) are matched on the marker TOKENS, not their spelling:
    <|tool_calls_section_begin|> ( <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|>
    {schema-valid JSON} <|tool_call_end|> )+ <|tool_calls_section_end|>   then a stop token (<|im_end|>).
Modes: "named" forces exactly one call of that function with IDX = first_index; "required" forces one to
MAX_PARALLEL_CALLS calls of declared tools, call k with IDX = first_index + k (the index counts calls across
the conversation); "auto" leaves text free (no markers) until the model emits <|tool_calls_section_begin|>,
then allows only the structure above.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr
from xgrammar import structural_tag as st

from k2serve.worker.request import GuidedSpec, RequestRejected
from k2serve.worker.vocab import (TOOL_ARGUMENT_BEGIN, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_MARKERS, TOOL_SECTION_BEGIN,
                          TOOL_SECTION_END, Vocab)

_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # ASCII controls except \t \n \r


class Guide:
    """One request's grammar state."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance with a sampled token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and has accepted a stop token."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


class GuidedDecoding:
    """Compiles and caches grammars for one vocabulary and applies their masks to logits."""

    def __init__(self, vocab: Vocab, vocab_size: int, max_cached_grammars: int = 256):
        self.vocab = vocab
        self.vocab_size = vocab_size
        self.tokenizer_info = tokenizer_info(vocab, vocab_size)
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)
        self.max_cached_grammars = max_cached_grammars
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def new_guide(self, spec: GuidedSpec) -> Guide:
        """A fresh matcher for `spec`; RequestRejected(400) if the spec does not compile."""
        return Guide(self.compile(spec))

    def compile(self, spec: GuidedSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`, from the cache or compiled now. Thread-safe: the cache is locked,
        the compilation is not (two threads may compile the same spec once each)."""
        key = spec.cache_key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        spec.validate()
        try:
            compiled = self._compile(spec)
        except RequestRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError on bad input
            raise RequestRejected(f"cannot compile the {spec.kind} constraint: {exc}") from None
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > self.max_cached_grammars:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GuidedSpec) -> xgr.CompiledGrammar:
        if spec.kind == "json_schema":
            return self.compiler.compile_json_schema(_schema_text(spec.schema_dict()), any_whitespace=False)
        if spec.kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return self.compiler.compile_regex(spec.regex)
        return self.compiler.compile_structural_tag(st.StructuralTag(format=self.tool_call_format(spec)))

    def tool_call_format(self, spec: GuidedSpec):
        """The structural-tag format of K2's tool-call section for `spec` (kind "tool_call")."""
        if not self.vocab.has_tool_markers:
            raise RequestRejected("this checkpoint's tokenizer has no K2 tool-call marker tokens")
        ids = {m: self.vocab.id_of(m) for m in TOOL_MARKERS}
        functions = spec.tool_functions()
        if spec.mode == "named":
            functions = [fn for fn in functions if fn["name"] == spec.name]
            first = _or([_call(fn, ids, str(spec.first_index)) for fn in functions])
            return st.SequenceFormat(elements=[st.TokenFormat(token=ids[TOOL_SECTION_BEGIN]), first,
                                               st.TokenFormat(token=ids[TOOL_SECTION_END])])
        calls = _calls(functions, ids, spec.first_index)
        if spec.mode == "required":
            return st.SequenceFormat(elements=[st.TokenFormat(token=ids[TOOL_SECTION_BEGIN]), calls,
                                               st.TokenFormat(token=ids[TOOL_SECTION_END])])
        section = st.TagFormat(begin=st.TokenFormat(token=ids[TOOL_SECTION_BEGIN]),
                               content=calls,
                               end=st.TokenFormat(token=ids[TOOL_SECTION_END]))
        others = [ids[m] for m in TOOL_MARKERS if m != TOOL_SECTION_BEGIN]
        return st.TokenTriggeredTagsFormat(trigger_tokens=[ids[TOOL_SECTION_BEGIN]], tags=[section],
                                           exclude_tokens=others, stop_after_first=True)

    def apply_masks(self, logits: torch.Tensor, guides: list[Guide | None]) -> None:
        """Set logits of tokens each guided row's grammar forbids to -inf (unguided rows untouched)."""
        rows = [i for i, g in enumerate(guides) if g is not None]
        if not rows:
            return
        bitmask = xgr.allocate_token_bitmask(len(guides), self.vocab_size)  # [N, ceil(V / 32)] int32
        for i in rows:
            guides[i].fill(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows)


MAX_PARALLEL_CALLS = 8  # calls one constrained tool-call section may hold


def tokenizer_info(vocab: Vocab, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: byte tokens, the tool markers and stop tokens by their text;
    every other control token is empty, which xgrammar treats as never allowed.

    Tokens holding ASCII control bytes other than tab/newline/return are blanked too: JSON forbids them
    unescaped in strings, and xgrammar 0.2.x lets a lone control-byte token into a JSON string.
    """
    allowed_added = set(vocab.stop_token_ids) | {vocab.added[m] for m in TOOL_MARKERS if m in vocab.added}
    encoded = [b if (i not in vocab.special_ids or i in allowed_added) and not _CONTROL_BYTES.search(b) else b""
               for i, b in enumerate(vocab.token_bytes[:vocab_size])]
    encoded += [b""] * (vocab_size - len(encoded))
    return xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size,
                             stop_token_ids=list(vocab.stop_token_ids))


def _calls(functions: list[dict], ids: dict[str, int], first_index: int):
    """One to MAX_PARALLEL_CALLS calls of declared tools; call k carries IDX = first_index + k."""
    tail = None
    for k in reversed(range(1, MAX_PARALLEL_CALLS)):
        call = _or([_call(fn, ids, str(first_index + k)) for fn in functions])
        tail = st.OptionalFormat(content=call if tail is None else st.SequenceFormat(elements=[call, tail]))
    first = _or([_call(fn, ids, str(first_index)) for fn in functions])
    return first if tail is None else st.SequenceFormat(elements=[first, tail])


def _call(fn: dict, ids: dict[str, int], index: str):
    """One `<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{args}<|tool_call_end|>`."""
    idx = st.ConstStringFormat(value=index)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return st.SequenceFormat(elements=[
        st.TokenFormat(token=ids[TOOL_CALL_BEGIN]),
        st.ConstStringFormat(value=f"functions.{fn['name']}:"),
        idx,
        st.TokenFormat(token=ids[TOOL_ARGUMENT_BEGIN]),
        _json_format(params),
        st.TokenFormat(token=ids[TOOL_CALL_END]),
    ])


def _json_format(schema):
    """Compact JSON matching `schema`, as an EBNF grammar (the same rules as kind "json_schema")."""
    grammar = xgr.Grammar.from_json_schema(_schema_text(schema), any_whitespace=False)
    return st.GrammarFormat(grammar=str(grammar))


def _or(formats: list):
    return formats[0] if len(formats) == 1 else st.OrFormat(elements=formats)


def _schema_text(schema) -> str:
    return json.dumps(schema)
