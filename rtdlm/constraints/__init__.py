"""Structured generation: regex and JSON-schema constraints as stateful logits processors.

The token-level automaton is built on the host (outlines-core) and runs on the device:
per-row state `[B]` int32, an allowed-token bitmask per state and a next-state table, so
constrained decoding stays inside the compiled loop of `generate` and both speculative
decoders (which stay lossless: drafts, verification and rollback see the same states).

    >>> from rtdlm import constraints
    >>> from rtdlm.models import EOS_ID, byte_vocabulary
    >>> from rtdlm.sampling import DEFAULT_PROCESSORS, chain
    >>> number = constraints.regex(r"-?[0-9]+(\\.[0-9]+)?", byte_vocabulary(), eos_token_id=EOS_ID)
    >>> processors = chain(number, DEFAULT_PROCESSORS)   # pass as generate(..., processors=processors)
"""

from rtdlm.constraints.processor import DENSE_LIMIT_BYTES, json_schema, regex, stack, table_bytes
from rtdlm.constraints.vocabulary import stdlib_bpe_tokenizer, tokenizer_vocabulary

__all__ = [
    "DENSE_LIMIT_BYTES",
    "json_schema",
    "regex",
    "stack",
    "stdlib_bpe_tokenizer",
    "table_bytes",
    "tokenizer_vocabulary",
]
