"""Tests of `rtdlm.constraints`: regex and JSON-schema constraints in every decoder.

Exactness on a Markov fake with a multi-byte vocabulary (`generate` and both speculative
decoders sample the exact step-wise constrained distribution: the processed distribution
restricted to the allowed tokens, renormalised), greedy identity across the three, every
sample of the bundled model matching its pattern or schema, mixed rows, dead ends, the
dense and sparse transition layouts, a 32k BPE vocabulary, and bad input.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex as pyregex  # the `regex` module: partial matches check unfinished rows
from markov_reference import chisquare_pvalue

from rtdlm import constraints
from rtdlm.constraints import processor as processor_module
from rtdlm.decoding import generate, self_speculative_generate, speculative_generate
from rtdlm.decoding.testing import MarkovModel, random_markov_model
from rtdlm.models import EOS_ID, byte_vocabulary, load_model
from rtdlm.sampling import DEFAULT_PROCESSORS, SamplingConfig, chain

# ---------------------------------------------------------------------------------------
# The Markov fake: tokens EOS, a, b, ab, ba, c; the pattern (ab)+c.

VOCAB = [b"", b"a", b"b", b"ab", b"ba", b"c"]
EOS = 0
PATTERN = r"(ab)+c"
NEW_TOKENS = 5
ROWS = 60_000
P_MIN = 1e-4
PROMPT = jnp.full((ROWS, 1), 2, jnp.int32)  # last token "b"


def is_prefix(text: bytes) -> bool:
    return pyregex.fullmatch(PATTERN.encode(), text, partial=True) is not None


def accepts(text: bytes) -> bool:
    return pyregex.fullmatch(PATTERN.encode(), text) is not None


def constrained_joint(table, last: int, num_tokens: int, temperature: float) -> np.ndarray:
    """Exact float64 joint of `num_tokens` new tokens [V] * n: each step the Markov logits
    over temperature, restricted to the tokens that keep a match possible (EOS once the
    text matches), renormalised; after EOS the padding (0 = EOS here) with probability one."""
    table = np.asarray(table, np.float64)
    vocab = table.shape[0]
    joint = {(): 1.0}
    for _ in range(num_tokens):
        following = {}
        for prefix, prob in joint.items():
            if EOS in prefix:
                following[prefix + (EOS,)] = prob
                continue
            text = b"".join(VOCAB[t] for t in prefix)
            allowed = [t for t in range(1, vocab) if is_prefix(text + VOCAB[t])]
            allowed += [EOS] if accepts(text) else []
            if not allowed:
                following[prefix + (EOS,)] = prob
                continue
            z = table[prefix[-1] if prefix else last][allowed] / temperature
            weights = np.exp(z - z.max())
            for t, w in zip(allowed, weights / weights.sum(), strict=True):
                following[prefix + (t,)] = prob * w
        joint = following
    out = np.zeros((vocab,) * num_tokens)
    for prefix, prob in joint.items():
        out[prefix] = prob
    return out


@pytest.fixture(scope="module")
def fake():
    return random_markov_model(len(VOCAB), seed=3, scale=1.5, num_layers=3)


@pytest.fixture(scope="module")
def fake_draft(fake):
    noise = random_markov_model(len(VOCAB), seed=4, scale=1.0).table
    return MarkovModel(fake.table + noise)


@pytest.fixture(scope="module")
def ab_c():
    return chain(constraints.regex(PATTERN, VOCAB, eos_token_id=EOS), DEFAULT_PROCESSORS)


def run_decoder(name, fake, fake_draft, processors, config, rows=ROWS, key=0):
    common = dict(
        key=jax.random.key(key),
        config=config,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=EOS,
        processors=processors,
    )
    prompt = PROMPT[:rows]
    if name == "generate":
        return generate(fake, prompt, **common)
    if name == "speculative":
        return speculative_generate(fake, fake_draft, prompt, num_speculative_tokens=2, **common)
    return self_speculative_generate(fake, prompt, early_exit_layer=1, num_speculative_tokens=3, **common)


DECODERS = ["generate", "speculative", "self_speculative"]


@pytest.mark.parametrize(
    "name", [DECODERS[0], *(pytest.param(d, marks=pytest.mark.slow) for d in DECODERS[1:])]
)
def test_exact_constrained_distribution(fake, fake_draft, ab_c, name):
    temperature = 0.8
    out = run_decoder(name, fake, fake_draft, ab_c, SamplingConfig(temperature=temperature), key=11)
    tokens = np.asarray(out.tokens)
    joint = constrained_joint(fake.table, 2, NEW_TOKENS, temperature)
    pvalue = chisquare_pvalue(tokens, joint)
    print(f"{name}: chi-square p = {pvalue:.4g}")
    assert pvalue > P_MIN, pvalue
    if name != "generate":
        assert 0 < np.sum(out.num_accepted) < np.sum(out.num_drafted)  # drafts both kept and rejected
    for row, length in zip(tokens[:2000], np.asarray(out.lengths)[:2000], strict=True):
        text = b"".join(VOCAB[t] for t in row[:length] if t != EOS)
        assert is_prefix(text), (row, text)
        if row[length - 1] == EOS:
            assert accepts(text), (row, text)


def test_greedy_identical_across_decoders(fake, fake_draft, ab_c):
    config = SamplingConfig(temperature=0.0)
    outs = [run_decoder(name, fake, fake_draft, ab_c, config, rows=8) for name in DECODERS]
    expected = constrained_joint(fake.table, 2, NEW_TOKENS, 1.0)  # its argmax chain
    for out in outs:
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(outs[0].tokens))
    row = np.asarray(outs[0].tokens)[0]
    greedy = []
    for t in range(NEW_TOKENS):  # the reference greedy chain: the most probable next token
        greedy.append(int(np.argmax(expected[tuple(greedy)].reshape(len(VOCAB), -1).sum(axis=1))))
        if greedy[-1] == EOS:
            greedy += [EOS] * (NEW_TOKENS - t - 1)
            break
    assert is_prefix(b"".join(VOCAB[t] for t in row))
    np.testing.assert_array_equal(row, np.array(greedy))


def test_update_follows_the_tokens_and_inactive_rows_stay():
    c = constraints.regex(PATTERN, VOCAB, eos_token_id=EOS)
    config = SamplingConfig()
    state = c.init(jnp.zeros((3, 1), jnp.int32), jnp.ones(3, jnp.int32), len(VOCAB), config)

    def allowed(state, row=0):
        logits = c.process(jnp.zeros((state.shape[0], len(VOCAB))), config, state)
        return np.flatnonzero(np.isfinite(np.asarray(logits[row])))

    np.testing.assert_array_equal(allowed(state), [1, 3])  # a, ab
    state = c.update(state, jnp.array([3, 3, 3]), jnp.array([True, True, False]), config)
    np.testing.assert_array_equal(allowed(state), [1, 3, 5])  # after "ab": a, ab, c
    np.testing.assert_array_equal(allowed(state, 2), [1, 3])  # the inactive row did not move
    state = c.update(state, jnp.array([5, 2, 5]), jnp.ones(3, bool), config)
    np.testing.assert_array_equal(allowed(state), [EOS])  # "abc" matches: only EOS
    np.testing.assert_array_equal(allowed(state, 1), [EOS])  # "abb": forbidden -> end state
    state = c.update(state, jnp.array([EOS, EOS, EOS]), jnp.ones(3, bool), config)
    np.testing.assert_array_equal(allowed(state), [EOS])  # after EOS, EOS forever


def test_dead_end_ends_the_row():
    """The model gives every allowed token -inf: the row gets EOS and ends, NaN-free."""
    table = np.zeros((len(VOCAB), len(VOCAB)), np.float32)
    table[1, [2, 4]] = -np.inf  # after "a", neither "b" nor "ba" can be drawn
    model = MarkovModel(jnp.asarray(table))
    processors = chain(constraints.regex(PATTERN, VOCAB, eos_token_id=EOS), DEFAULT_PROCESSORS)
    out = generate(
        model,
        jnp.full((512, 1), 2, jnp.int32),
        key=jax.random.key(1),
        config=SamplingConfig(),
        max_new_tokens=6,
        eos_token_id=EOS,
        processors=processors,
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    took_a = tokens[:, 0] == 1  # the first token is "a" or "ab", equally likely
    assert 100 < took_a.sum() < 412
    np.testing.assert_array_equal(tokens[took_a, 1], EOS)  # "a", then the dead end: EOS
    np.testing.assert_array_equal(lengths[took_a], 2)
    np.testing.assert_array_equal(tokens[~took_a, 0], 3)


def test_dense_and_sparse_layouts_agree(monkeypatch):
    vocab = byte_vocabulary()
    pattern = r"[a-c]{1,3}(,[0-9]+)*;"
    dense = constraints.regex(pattern, vocab, eos_token_id=EOS_ID)
    monkeypatch.setattr(processor_module, "DENSE_LIMIT_BYTES", 0)
    sparse = processor_module._regex_cached.__wrapped__(pattern, tuple(vocab), (EOS_ID,))
    assert processor_module.tables_of(dense).next_dense is not None
    assert processor_module.tables_of(sparse).next_dense is None
    num_states = processor_module.tables_of(dense).allowed.shape[0]
    states = jnp.repeat(jnp.arange(num_states), 256)
    tokens = jnp.tile(jnp.arange(256), num_states)
    config = SamplingConfig()
    active = jnp.ones_like(states, bool)
    np.testing.assert_array_equal(
        dense.update(states, tokens, active, config), sparse.update(states, tokens, active, config)
    )


def test_stack_mixes_constrained_and_free_rows(fake):
    alternating = constraints.regex(r"(ab|ba)+", VOCAB, eos_token_id=EOS)
    c = constraints.regex(PATTERN, VOCAB, eos_token_id=EOS)
    rows = [alternating, None, c, None] * 64
    config = SamplingConfig()
    common = dict(key=jax.random.key(5), config=config, max_new_tokens=NEW_TOKENS, eos_token_id=EOS)
    prompt = PROMPT[: len(rows)]
    out = generate(fake, prompt, processors=chain(constraints.stack(rows), DEFAULT_PROCESSORS), **common)
    free = generate(fake, prompt, **common)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for b, row in enumerate(tokens):
        if rows[b] is None:  # free rows: exactly what unconstrained generate draws
            np.testing.assert_array_equal(row, np.asarray(free.tokens)[b])
            continue
        pattern = PATTERN if rows[b] is c else r"(ab|ba)+"
        text = b"".join(VOCAB[t] for t in row[: lengths[b]] if t != EOS)
        assert pyregex.fullmatch(pattern.encode(), text, partial=True), (b, text)
        if row[lengths[b] - 1] == EOS:
            assert pyregex.fullmatch(pattern.encode(), text), (b, text)
    with pytest.raises(ValueError, match="rows"):
        generate(fake, PROMPT[:5], processors=constraints.stack(rows), **common)


def test_bad_input():
    vocab = byte_vocabulary()
    with pytest.raises(ValueError, match="regex"):
        constraints.regex("(ab", vocab, eos_token_id=EOS_ID)
    with pytest.raises(ValueError, match="incompatible|no match"):
        constraints.regex("xyz", [b"", b"a", b"b"], eos_token_id=0)
    with pytest.raises(ValueError, match="pattern must be a str"):
        constraints.regex(b"ab", vocab, eos_token_id=EOS_ID)
    with pytest.raises(ValueError, match="eos_token_id"):
        constraints.regex("ab", vocab, eos_token_id=256)
    with pytest.raises(ValueError, match="vocabulary"):
        constraints.regex("ab", [1, 2, 3], eos_token_id=0)
    with pytest.raises(ValueError, match="unsupported JSON schema"):
        constraints.json_schema({"type": "foo"}, vocab, eos_token_id=EOS_ID)
    with pytest.raises(ValueError, match="not valid JSON"):
        constraints.json_schema("{type: object", vocab, eos_token_id=EOS_ID)
    with pytest.raises(ValueError, match="not a constraint"):
        constraints.stack([DEFAULT_PROCESSORS])
    small = constraints.regex("ab", [b"", b"a", b"b"], eos_token_id=0)
    with pytest.raises(ValueError, match="share"):
        constraints.stack([small, constraints.regex("ab", vocab, eos_token_id=EOS_ID)])


def test_equal_arguments_give_one_processor():
    vocab = byte_vocabulary()
    assert constraints.regex("a+", vocab, eos_token_id=EOS_ID) == constraints.regex("a+", list(vocab), EOS_ID)


# ---------------------------------------------------------------------------------------
# The bundled byte model: every sample matches.

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["function", "class", "module"]},
        "line": {"type": "integer", "maxDigits": 4},
        "args": {"type": "array", "items": {"enum": ["self", "x", "n"]}, "minItems": 1, "maxItems": 3},
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "integer", "maxDigits": 3}},
            "required": ["x", "y"],
        },
    },
    "required": ["name", "kind", "args", "pos"],
}


def valid_document(text: str) -> bool:
    """`SCHEMA`, checked by hand (jsonschema is not a dependency)."""
    doc = json.loads(text)
    if not (isinstance(doc, dict) and {"name", "kind", "args", "pos"} <= set(doc)):
        return False
    if set(doc) - {"name", "kind", "line", "args", "pos"}:
        return False
    ok = (
        isinstance(doc["name"], str)
        and len(doc["name"]) <= 10
        and doc["kind"] in SCHEMA["properties"]["kind"]["enum"]
    )
    ok &= isinstance(doc.get("line", 0), int) and abs(doc.get("line", 0)) < 10**4
    ok &= (
        isinstance(doc["args"], list)
        and 1 <= len(doc["args"]) <= 3
        and set(doc["args"]) <= {"self", "x", "n"}
    )
    pos = doc["pos"]
    ok &= isinstance(pos, dict) and set(pos) == {"x", "y"} and isinstance(pos["x"], (int, float))
    return ok and isinstance(pos["y"], int) and not isinstance(pos["y"], bool)


BUNDLED_CASES = {
    "def_line": (r"(def|class) [a-z_]{1,12}\((self)?\):", 28),
    "number": (r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?", 12),
    "import": (r"(import|from) [a-z]{2,8}(\.[a-z]{2,8})?( import [a-z_]{1,10})?", 40),
    "json": (SCHEMA, 128),
}


def bundled_outputs(target, case, rows, key=0):
    spec, new_tokens = BUNDLED_CASES[case]
    vocab = byte_vocabulary()
    if isinstance(spec, dict):
        pattern = constraints.automaton.regex_from_schema(spec)
        c = constraints.json_schema(spec, vocab, eos_token_id=EOS_ID)
    else:
        pattern, c = spec, constraints.regex(spec, vocab, eos_token_id=EOS_ID)
    prompt = jnp.asarray(np.frombuffer(b"\n", np.uint8).astype(np.int32))[None].repeat(rows, 0)
    out = generate(
        target,
        prompt,
        key=jax.random.key(key),
        config=SamplingConfig(temperature=1.0),
        max_new_tokens=new_tokens,
        eos_token_id=EOS_ID,
        processors=chain(c, DEFAULT_PROCESSORS),
    )
    texts = []
    for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
        texts.append((bytes(row[:length].astype(np.uint8)), bool(row[length - 1] == EOS_ID)))
    return pattern, texts


def check_bundled(pattern, texts, is_json):
    finished = 0
    for raw, ended in texts:
        if ended:
            finished += 1
            text = raw[:-1].decode("utf-8")  # a finished row is valid UTF-8 ...
            assert pyregex.fullmatch(pattern, text), text  # ... and matches
            if is_json:
                assert valid_document(text), text
        else:  # unfinished (max_new_tokens): a prefix of a match
            text = raw.decode("utf-8", errors="ignore")
            assert pyregex.fullmatch(pattern, text, partial=True), text
    return finished


@pytest.fixture(scope="module")
def target():
    return load_model("target")


def test_bundled_model_samples_match_fast(target):
    pattern, texts = bundled_outputs(target, "def_line", 32)
    assert check_bundled(pattern, texts, False) >= 24


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BUNDLED_CASES))
def test_bundled_model_every_sample_matches(target, case):
    pattern, texts = bundled_outputs(target, case, 1000, key=3)
    finished = check_bundled(pattern, texts, case == "json")
    print(f"{case}: {finished} of {len(texts)} rows finished, all match")
    assert finished >= 900


@pytest.mark.slow
def test_bundled_model_speculative_matches(target):
    """Constrained speculative decoding with the bundled draft: samples match, and greedy
    equals constrained generate."""
    draft = load_model("draft")
    c = chain(constraints.json_schema(SCHEMA, byte_vocabulary(), eos_token_id=EOS_ID), DEFAULT_PROCESSORS)
    prompt = jnp.asarray(np.frombuffer(b"\n", np.uint8).astype(np.int32))[None].repeat(4, 0)
    greedy = SamplingConfig(temperature=0.0)
    common = dict(key=jax.random.key(0), max_new_tokens=128, eos_token_id=EOS_ID, processors=c)
    plain = generate(target, prompt, config=greedy, **common)
    spec = speculative_generate(target, draft, prompt, config=greedy, **common)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
    sampled = speculative_generate(target, draft, prompt.repeat(64, 0), config=SamplingConfig(), **common)
    texts = [
        (bytes(r[:n].astype(np.uint8)), bool(r[n - 1] == EOS_ID))
        for r, n in zip(np.asarray(sampled.tokens), np.asarray(sampled.lengths), strict=True)
    ]
    check_bundled(constraints.automaton.regex_from_schema(SCHEMA), texts, True)


# ---------------------------------------------------------------------------------------
# A real subword vocabulary: byte-level BPE, V = 32000, trained on the stdlib sources.


@pytest.mark.slow
def test_bpe_vocabulary_json_schema():
    import time

    tokenizer = constraints.stdlib_bpe_tokenizer()
    vocab = constraints.tokenizer_vocabulary(tokenizer)
    assert len(vocab) == 32000 and vocab[0] == b""  # id 0: <|endoftext|>, special
    partial = sum(1 for t in vocab if t and not _decodes(t))
    assert partial > 0  # tokens that are partial UTF-8 are in the vocabulary
    start = time.perf_counter()
    c = constraints.json_schema(SCHEMA, vocab, eos_token_id=0)
    seconds = time.perf_counter() - start
    print(f"BPE json_schema: {seconds:.2f} s, {constraints.table_bytes(c) / 2**20:.1f} MB")
    assert seconds < 10 and constraints.table_bytes(c) < 64 * 2**20
    # Random logits through the processor: every finished row is a valid document, spelled
    # with multi-byte tokens (partial UTF-8 ones may be drawn inside strings).
    config = SamplingConfig()
    rows = 256

    @jax.jit
    def step(state, key, done):
        logits = jax.random.normal(key, (rows, len(vocab))) * 3
        token = jax.random.categorical(key, c.process(logits, config, state))
        return c.update(state, token, ~done, config), token

    state = c.init(jnp.zeros((rows, 1), jnp.int32), jnp.ones(rows, jnp.int32), len(vocab), config)
    done = jnp.zeros(rows, bool)
    out = []
    for key in jax.random.split(jax.random.key(0), 200):
        state, token = step(state, key, done)
        out.append(np.where(np.asarray(done), -1, np.asarray(token)))
        done = done | (token == 0)
    out = np.stack(out, 1)
    pattern = constraints.automaton.regex_from_schema(SCHEMA)
    finished = 0
    for row in out:
        ids = [t for t in row if t >= 0]
        if ids[-1] == 0:
            finished += 1
            text = b"".join(vocab[t] for t in ids[:-1]).decode("utf-8")
            assert pyregex.fullmatch(pattern, text) and valid_document(text), text
    print(f"BPE random walk: {finished} of {rows} rows finished in 200 tokens, all valid")
    assert finished >= rows // 4


def _decodes(token: bytes) -> bool:
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
