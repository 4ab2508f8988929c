"""Token sampling: configs, pure logits processors, exact sort-free filters, `sample()`.

The names of the RT-DLM sampling guide (`from core.sampling import X` reads
`from rtdlm.sampling import X`), plus the functional API they are built on.
"""

from rtdlm.sampling.config import (
    PRESETS,
    SamplingConfig,
    create_sampling_config_balanced,
    create_sampling_config_creative,
    create_sampling_config_deterministic,
    create_sampling_config_precise,
)
from rtdlm.sampling.filters import truncate
from rtdlm.sampling.processors import (
    DEFAULT_PROCESSORS,
    LogitsProcessor,
    Processor,
    apply_logit_bias,
    apply_penalties,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_truncation,
    as_processor,
    bad_words,
    chain,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    filter_typical_p,
    init_from_history,
    is_greedy,
    mask_banned_tokens,
    mask_eos_before_min_new_tokens,
    mask_token_ids,
    no_repeat_ngram,
    token_counts,
)
from rtdlm.sampling.sampler import (
    SamplingResult,
    draw,
    probabilities,
    process_logits,
    row_keys,
    sample,
    sample_processed,
    sample_truncation,
    sample_with,
)

_GUIDE_FACADES = ("TokenSampler", "SpeculativeDecoder", "SelfSpeculativeDecoder")


def __getattr__(name):
    # The guide imports its facades from the sampling module; they live in rtdlm.guide
    # (which imports the decoders), so they are resolved lazily: importing rtdlm.sampling
    # never imports rtdlm.decoding.
    if name in _GUIDE_FACADES:
        import rtdlm.guide

        return getattr(rtdlm.guide, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SelfSpeculativeDecoder",
    "SpeculativeDecoder",
    "DEFAULT_PROCESSORS",
    "PRESETS",
    "LogitsProcessor",
    "Processor",
    "SamplingConfig",
    "SamplingResult",
    "TokenSampler",
    "apply_logit_bias",
    "apply_penalties",
    "apply_presence_frequency_penalties",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_truncation",
    "as_processor",
    "bad_words",
    "chain",
    "create_sampling_config_balanced",
    "create_sampling_config_creative",
    "create_sampling_config_deterministic",
    "create_sampling_config_precise",
    "draw",
    "filter_min_p",
    "filter_top_k",
    "filter_top_p",
    "filter_typical_p",
    "init_from_history",
    "is_greedy",
    "mask_banned_tokens",
    "mask_eos_before_min_new_tokens",
    "mask_token_ids",
    "no_repeat_ngram",
    "probabilities",
    "process_logits",
    "row_keys",
    "sample",
    "sample_processed",
    "sample_truncation",
    "sample_with",
    "token_counts",
    "truncate",
]
