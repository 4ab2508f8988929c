"""The reference byte-level transformer, its tokenizer/corpus and its trainer.

    >>> from rtdlm.models import load_model
    >>> target = load_model("target")   # bundled weights in rtdlm/models/weights/
    >>> draft = load_model("draft")

`rtdlm.models.train` (the optax training loop) is imported lazily: it is not
re-exported here so that importing the model does not import optax/rich.
"""

from rtdlm.models.data import BOS_ID, EOS_ID, VOCAB_SIZE, byte_vocabulary, decode, encode
from rtdlm.models.pretrained import PretrainedTokenizer, from_pretrained, load_tokenizer
from rtdlm.models.transformer import (
    Cache,
    Transformer,
    TransformerConfig,
    bundled_models,
    create_model,
    load_model,
    model_from_bytes,
    model_to_bytes,
    param_count,
    save_model,
    widen_mlp,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "VOCAB_SIZE",
    "Cache",
    "PretrainedTokenizer",
    "Transformer",
    "TransformerConfig",
    "bundled_models",
    "byte_vocabulary",
    "create_model",
    "decode",
    "encode",
    "from_pretrained",
    "load_model",
    "load_tokenizer",
    "model_from_bytes",
    "model_to_bytes",
    "param_count",
    "save_model",
    "widen_mlp",
]
