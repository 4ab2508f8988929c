"""Token vocabularies as byte strings: what `regex` and `json_schema` take.

`vocabulary[i]` is the bytes token `i` stands for (partial UTF-8 allowed). The bundled
byte model's is `rtdlm.models.byte_vocabulary()`; `tokenizer_vocabulary` reads one from a
Hugging Face `tokenizers.Tokenizer` (byte-level BPE such as GPT-2/Llama 3/Qwen, or
SentencePiece-style `▁` and `<0xNN>` byte-fallback tokens).

`stdlib_bpe_tokenizer` trains the byte-level BPE tokenizer (V = 32000) that the tests and
`benchmarks/constrained.py` use as a real subword vocabulary: trained on the running
Python's standard library sources and cached under `runs/`.
"""

from __future__ import annotations

import functools
import os

EOS_TOKEN = "<|endoftext|>"


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def _token_bytes(token: str, byte_level: bool) -> bytes:
    if byte_level:
        decoder = _byte_level_decoder()
        if all(ch in decoder for ch in token):
            return bytes(decoder[ch] for ch in token)
        return token.encode("utf-8")
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode("utf-8")


def tokenizer_vocabulary(tokenizer) -> list[bytes]:
    """The bytes of every token id of a `tokenizers.Tokenizer` (index = token id).

    Special tokens map to b"" (a constraint never allows them, except as its EOS).
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)  # {token: id}
    byte_level = "ByteLevel" in tokenizer.to_str()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    out = [b""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        out[token_id] = b"" if token in special else _token_bytes(token, byte_level)
    return out


def stdlib_bpe_tokenizer(path: str | None = None, vocab_size: int = 32000):
    """A byte-level BPE `tokenizers.Tokenizer` trained on the stdlib `.py` sources (the
    bundled model's corpus files), id 0 = `<|endoftext|>` (EOS); cached as JSON at `path`
    (default `runs/bpe-stdlib-{vocab_size}.json`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rtdlm.models.data import stdlib_dir, stdlib_source_files

    path = path or os.path.join("runs", f"bpe-stdlib-{vocab_size}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    root = stdlib_dir()
    tokenizer.train([os.path.join(root, f) for f in stdlib_source_files(root)], trainer)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tokenizer.save(path)
    return tokenizer
