"""Text for Kimi K2: the tokenizer, the chat template (rendered injection-safely), the incremental
detokenizer, the tool-call parser, tool-call id normalization and stop strings.

It owns the model's text formats (docs/k2-format.md). Its modules are functions of text and token ids:
they must not import the rest of the router (router.errors excepted), anything HTTP or any gRPC code.
"""
