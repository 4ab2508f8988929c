"""`rtdlm.models.from_pretrained` against `transformers` on tiny random checkpoints.

Each family is built in the test with `transformers` (random weights, tiny sizes), saved
with `save_pretrained` and loaded back: logits and greedy tokens must equal transformers'
(PyTorch, float32), cached decoding included. Needs the dev extras (torch, transformers).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rtdlm.decoding import generate, self_speculative_generate, speculative_generate  # noqa: E402
from rtdlm.models import from_pretrained, load_tokenizer  # noqa: E402
from rtdlm.sampling import SamplingConfig  # noqa: E402

VOCAB = 211
EOS = 2
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.2,  # peaked logits: no near-ties for greedy decoding to trip on
    bos_token_id=1, eos_token_id=EOS,
)
FAMILIES = {
    # GQA (4 query heads, 2 key/value heads), rope_theta, llama3 rope scaling whose three
    # bands (kept, blended, scaled) each hold some of the head's frequencies.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    )),
    # A sliding window shorter than the prompts.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    # q/k/v biases and tied embeddings.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}
PROMPT_LENGTHS = (1, 5, 17)


def _hf_model(family: str, seed: int = 0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # RMSNorm weights (init 1) and biases (init 0) get values too
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(family, transformers model, checkpoint directory, rtdlm model)."""
    model = _hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory, from_pretrained(directory)


def _prompts(batch: int, length: int, seed: int) -> np.ndarray:
    # Ids >= 3: no BOS/EOS inside prompts.
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length)).astype(np.int32)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@jax.jit
def _forward(model, tokens, positions, cache):
    return model(tokens, positions, cache)


def _positions(batch, length, offset=0):
    return jnp.broadcast_to(jnp.arange(offset, offset + length, dtype=jnp.int32), (batch, length))


def test_loaded_model_attributes(checkpoint):
    family, hf, _, model = checkpoint
    assert model.vocab_size == VOCAB and model.num_layers == 3 and model.max_length == 256
    assert all(isinstance(x, int) for x in (model.vocab_size, model.num_layers, model.max_length))
    config = model.config
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.attention_window == (6 if family == "mistral" else None)
    assert config.tie_embeddings == (family == "qwen2") and config.qkv_bias == (family == "qwen2")
    assert (config.rope_scaling is not None) == (family == "llama")


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_logits_equal_transformers(checkpoint, length):
    """Full forward, cached prefill, and cached one-token steps after a prefill: all within
    1e-4 of transformers' logits at every position."""
    _, hf, _, model = checkpoint
    tokens = _prompts(2, length + 6, seed=length)
    expected = _hf_logits(hf, tokens)  # [2, length + 6, V]
    full, _ = _forward(model, tokens, _positions(2, length + 6), None)
    np.testing.assert_allclose(full, expected, atol=1e-4)
    logits, cache = _forward(model, tokens[:, :length], _positions(2, length), model.init_cache(2, 32))
    pieces = [logits]
    for t in range(length, length + 6):
        logits, cache = _forward(model, tokens[:, t:t + 1], _positions(2, 1, t), cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), expected, atol=1e-4)


def _hf_greedy(model, prompt: np.ndarray, max_new_tokens: int, repetition_penalty: float):
    """transformers' greedy continuation of one prompt [P] -> its max_new_tokens new tokens
    (no EOS: every row runs the whole length)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompt[None], dtype=torch.long),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
            pad_token_id=0,
        )
    return out[0, len(prompt):].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_generate_equals_transformers(checkpoint, repetition_penalty):
    """64 greedy tokens, token for token: one prompt, and a ragged (right-padded) batch."""
    _, hf, _, model = checkpoint
    config = SamplingConfig(do_sample=False, repetition_penalty=repetition_penalty)
    lengths = np.array([9, 4, 13], np.int32)
    prompts = _prompts(3, 13, seed=7)
    for batch_prompts, batch_lengths in ((prompts[:1, :9], lengths[:1]), (prompts, lengths)):
        out = generate(model, batch_prompts, key=jax.random.key(0), config=config, max_new_tokens=64,
                       prompt_lengths=batch_lengths)
        np.testing.assert_array_equal(out.lengths, 64)
        for row, n in enumerate(batch_lengths):
            expected = _hf_greedy(hf, batch_prompts[row, :n], 64, repetition_penalty)
            np.testing.assert_array_equal(np.asarray(out.tokens[row]), expected)


@pytest.mark.slow
def test_speculative_and_self_speculative_are_greedy_identical(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path / "target")
    _hf_model("llama", seed=1, num_hidden_layers=1).save_pretrained(tmp_path / "draft")
    model, draft = from_pretrained(tmp_path / "target"), from_pretrained(tmp_path / "draft")
    config = SamplingConfig(do_sample=False)
    prompts, lengths = _prompts(2, 10, seed=3), np.array([10, 6], np.int32)
    kwargs = dict(key=jax.random.key(0), config=config, max_new_tokens=24, prompt_lengths=lengths)
    reference = generate(model, prompts, **kwargs)
    outputs = {
        "speculative": speculative_generate(model, draft, prompts, num_speculative_tokens=3, **kwargs),
        "self_speculative": self_speculative_generate(
            model, prompts, early_exit_layer=1, num_speculative_tokens=3, **kwargs
        ),
    }
    for name, out in outputs.items():
        np.testing.assert_array_equal(out.tokens, reference.tokens, err_msg=name)
        np.testing.assert_array_equal(out.lengths, reference.lengths, err_msg=name)


def test_sharded_checkpoint_loads_the_same(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "whole")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens = _prompts(1, 8, seed=1)
    whole, _ = _forward(from_pretrained(tmp_path / "whole"), tokens, _positions(1, 8), None)
    sharded, _ = _forward(from_pretrained(tmp_path / "sharded"), tokens, _positions(1, 8), None)
    np.testing.assert_array_equal(sharded, whole)


def test_bfloat16_load(tmp_path):
    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokens = _prompts(1, 8, seed=2)
    reference, _ = _forward(from_pretrained(tmp_path / "f32"), tokens, _positions(1, 8), None)
    for model in (from_pretrained(tmp_path / "f32", dtype="bfloat16"),  # cast on load
                  from_pretrained(tmp_path / "bf16"),  # as stored
                  from_pretrained(tmp_path / "f32", dtype=jnp.bfloat16)):
        assert model.config.dtype == "bfloat16"
        assert model.embedding.embedding[...].dtype == jnp.bfloat16
        assert model.init_cache(1, 8)[0][0].dtype == jnp.bfloat16
        logits, _ = _forward(model, tokens, _positions(1, 8), model.init_cache(1, 8))
        assert logits.dtype == jnp.float32
        # bfloat16 keeps ~3 significant digits; logits here are O(10).
        assert float(jnp.max(jnp.abs(logits - reference))) < 0.25 * float(jnp.max(jnp.abs(reference)))
        assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1))) >= 0.75
    assert from_pretrained(tmp_path / "bf16", dtype="float32").config.dtype == "float32"


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    loaded = load_tokenizer(tmp_path)
    text = "def fibonacci(n):\n    return 'héllo wörld'  # ✓\n"
    ids = loaded.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1 and ids.max() < loaded.vocab_size
    assert loaded.decode(ids) == text
    assert loaded.eos_token_ids == (2, 0) and loaded.eos_token_id == 2 and loaded.bos_token_id == 1
    tokens, lengths = loaded.encode_batch(["def f", "return fibonacci(n)"])
    assert tokens.shape == (2, int(lengths.max())) and loaded.decode(tokens[0, : lengths[0]]) == "def f"
    assert load_tokenizer(tmp_path / "tokenizer.json").decode(ids) == text
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)

    def checkpoint_with(**changes):
        directory = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        _hf_model("llama").save_pretrained(directory)
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        from_pretrained(checkpoint_with(model_type="gpt2"))
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
        from_pretrained(checkpoint_with(rope_parameters=yarn))
    with pytest.raises(ValueError, match="attention_bias"):
        from_pretrained(checkpoint_with(attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act"):
        from_pretrained(checkpoint_with(hidden_act="gelu"))
    with pytest.raises(ValueError, match="shapes do not match"):
        from_pretrained(checkpoint_with(intermediate_size=80))
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(checkpoint_with(), dtype="int8")
    no_weights = checkpoint_with()
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(no_weights)


@pytest.mark.parametrize("rope_type", ["default", "linear", "llama3"])
def test_rope_frequencies_equal_transformers(rope_type):
    """The Llama 3.1 8B rotary setup (head_dim 128, theta 5e5) and its rescalings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from rtdlm.models.pretrained import config_from_hf
    from rtdlm.models.transformer import rope_frequencies

    scaling = {
        "default": None,
        "linear": {"rope_type": "linear", "factor": 4.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }[rope_type]
    hf_config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=scaling,
    )
    if rope_type == "default":
        expected = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    config = config_from_hf(hf_config.to_dict())
    got = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling)
    np.testing.assert_allclose(got, expected.numpy(), rtol=3e-7)


def test_transformers4_config_format():
    """Checkpoints saved by transformers 4 keep `rope_theta` and `rope_scaling` at the top."""
    from rtdlm.models.pretrained import config_from_hf

    v4 = dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=24,
              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
              rope_theta=123.0, torch_dtype="bfloat16",
              rope_scaling={"type": "linear", "factor": 2.0})
    config = config_from_hf(v4)
    assert config.rope_base == 123.0 and config.dtype == "bfloat16" and config.num_kv_heads == 2
    assert config.rope_scaling.kind == "linear" and config.rope_scaling.factor == 2.0
    assert config_from_hf(dict(v4, rope_scaling=None)).rope_scaling is None
