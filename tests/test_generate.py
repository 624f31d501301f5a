"""Tests for minillm.generate: sampling filters against hand-computed distributions, the KV cache against full recomputation,
streaming, stop tokens, seeds, the context window and UTF-8-safe text streaming."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minillm.generate import (decode_stream, generate, generate_text, kv_cache_bytes, sample_next, sampling_probs, top_k_filter,
                              top_p_filter)
from minillm.model import ModelConfig, Transformer
from minillm.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset('tiny', n_kv_heads=2)).eval()


@pytest.fixture(scope='module')
def byte_tok():
    return Tokenizer.train(['x'], vocab_size=257, show_progress=False)      # 256 byte tokens + <|endoftext|>: no merges


def reference_greedy(model, ids, n):
    "Greedy decoding by full recomputation over the last context_length tokens."
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad(): ids.append(int(model(torch.tensor([ids[-model.cfg.context_length:]]))[0, -1].argmax()))
    return ids[-n:] if n else []


# ----------------------------------------------------------------------------- filters and sampling
P = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])          # deliberately not sorted


@pytest.mark.parametrize('k, expected', [(1, [0, 1, 0, 0, 0]), (2, [0, .4 / .7, 0, .3 / .7, 0]),
                                         (3, [0, .4 / .85, 0, .3 / .85, .15 / .85]), (5, P.tolist()), (9, P.tolist())])
def test_top_k_by_hand(k, expected):
    torch.testing.assert_close(top_k_filter(P.log(), k).softmax(-1), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('p, expected', [(0.2, [0, 1, 0, 0, 0]), (0.39, [0, 1, 0, 0, 0]), (0.5, [0, .4 / .7, 0, .3 / .7, 0]),
                                         (0.8, [0, .4 / .85, 0, .3 / .85, .15 / .85]), (0.9, [0, .4 / .95, .1 / .95, .3 / .95, .15 / .95]),
                                         (1.0, P.tolist())])
def test_top_p_by_hand(p, expected):
    torch.testing.assert_close(top_p_filter(P.log(), p).softmax(-1), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-6)


def test_filters_work_row_by_row():
    rows = torch.stack([P.log(), P.flip(0).log(), torch.zeros(5)])
    out = top_p_filter(rows, 0.5).softmax(-1)
    torch.testing.assert_close(out[0], top_p_filter(P.log(), 0.5).softmax(-1))
    torch.testing.assert_close(out[1], top_p_filter(P.flip(0).log(), 0.5).softmax(-1))
    assert (out[2] > 0).sum() == 3                   # uniform over 5: 0.2, 0.4 before the third token, 0.6 before the fourth
    assert ((top_k_filter(rows, 2) > -math.inf).sum(-1) == torch.tensor([2, 2, 5])).all()   # ties with the k-th are kept


def test_temperature_top_k_top_p_compose():
    z = P.log()
    torch.testing.assert_close(sampling_probs(z, 0.5), (z / 0.5).softmax(-1))
    # temperature 0.5 squares the probabilities: .16, .09, .0225, .01, .0025 (sum .285); top_k=3 then top_p=0.6 keeps two
    sq = torch.tensor([.0025, .16, .01, .09, .0225])
    top3 = torch.where(sq >= .0225, sq, 0) / (.16 + .09 + .0225)
    torch.testing.assert_close(sampling_probs(z, 0.5, top_k=3), top3, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sampling_probs(z, 0.5, top_k=3, top_p=0.6), torch.tensor([0, .16, 0, .09, 0]) / .25, atol=1e-6, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_temperature_zero_is_argmax(seed):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(seed)) * 3
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0, top_k=5, top_p=0.1), logits.argmax(-1))
    assert torch.equal(sampling_probs(logits, 1e-4).argmax(-1), logits.argmax(-1))


def test_samples_follow_the_distribution():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    for kw, expected in [(dict(top_k=2), [0, .4 / .7, 0, .3 / .7, 0]), (dict(top_p=0.8), [0, .4 / .85, 0, .3 / .85, .15 / .85]),
                         (dict(temperature=2.0), (P.log() / 2).softmax(-1).tolist())]:
        freq = torch.bincount(sample_next(P.log().expand(n, 5), generator=g, **kw), minlength=5) / n
        torch.testing.assert_close(freq, torch.tensor(expected), atol=0.01, rtol=0)


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(100, 30)
    a = sample_next(logits, 0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, 0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (100,)


@pytest.mark.parametrize('kw, message', [(dict(temperature=-0.1), 'temperature'), (dict(temperature=float('nan')), 'temperature'),
                                         (dict(top_k=0), 'top_k'), (dict(top_k=2.5), 'top_k'), (dict(top_p=0.0), 'top_p'),
                                         (dict(top_p=1.01), 'top_p')])
def test_sampling_errors(kw, message):
    with pytest.raises(ValueError, match=message): sample_next(torch.randn(5), **kw)


# ----------------------------------------------------------------------------- the KV cache
@pytest.mark.parametrize('kw', [{}, dict(n_kv_heads=1), dict(n_kv_heads=2, tie_embeddings=False)])
def test_incremental_decoding_equals_full_recomputation(kw):
    torch.manual_seed(1)
    m = Transformer(ModelConfig.preset('tiny', **kw)).eval()
    seq = torch.randint(0, 512, (2, 9))
    cache = m.new_cache(batch_size=2)
    with torch.no_grad():
        step = m(seq, cache)[:, -1]
        while seq.shape[1] < m.cfg.context_length:
            full = m(seq)[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
            nxt = torch.multinomial(full.softmax(-1), 1)
            seq = torch.cat([seq, nxt], 1)
            step = m(nxt, cache)[:, -1]


@pytest.mark.parametrize('prompt_len, n', [(1, 20), (10, 100), (63, 5), (64, 3), (150, 10)])
def test_greedy_with_cache_equals_reference_including_past_the_window(model, prompt_len, n):
    prompt = torch.randint(0, 512, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    ref = reference_greedy(model, prompt, n)
    assert list(generate(model, prompt, n, temperature=0)) == ref
    assert list(generate(model, prompt, n, temperature=0, use_cache=False)) == ref


def test_kv_cache_bytes_matches_the_allocation():
    cfg = ModelConfig.preset('tiny', n_kv_heads=2)
    cache = Transformer(cfg).to(torch.bfloat16).new_cache(batch_size=3, max_len=50)
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert allocated == kv_cache_bytes(cfg, 50, batch_size=3, bytes_per_value=2)
    assert kv_cache_bytes(ModelConfig.preset('llama2-7b'), 4096) == 2 * 2**30


# ----------------------------------------------------------------------------- generate
def test_seed_reproducible_and_cache_independent(model):
    kw = dict(temperature=1.0, top_k=40, top_p=0.95)
    a = list(generate(model, [1, 2, 3], 50, seed=5, **kw))
    assert a == list(generate(model, [1, 2, 3], 50, seed=5, **kw))
    assert a == list(generate(model, [1, 2, 3], 50, seed=5, use_cache=False, **kw))
    assert a != list(generate(model, [1, 2, 3], 50, seed=6, **kw))
    torch.manual_seed(3); b = list(generate(model, [1, 2, 3], 20))        # no seed: the global generator
    torch.manual_seed(3); assert b == list(generate(model, [1, 2, 3], 20))


def test_stop_tokens_end_generation_and_are_not_yielded(model):
    ref = reference_greedy(model, [5, 6, 7], 40)
    stop = ref[10]
    first = ref.index(stop)
    assert list(generate(model, [5, 6, 7], 40, temperature=0, stop_ids=stop)) == ref[:first]
    assert list(generate(model, [5, 6, 7], 40, temperature=0, stop_ids=[999_999, stop])) == ref[:first]
    assert list(generate(model, [5, 6, 7], 40, temperature=0, stop_ids=[])) == ref
    assert list(generate(model, [5, 6, 7], 7, temperature=0)) == ref[:7]            # max_new_tokens


def test_generate_streams_lazily_and_leaves_grad_mode_alone(model):
    it = generate(model, torch.tensor([[1, 2, 3]]), 1000, temperature=0)
    first = next(it)
    assert isinstance(first, int) and torch.is_grad_enabled()          # nothing leaks between tokens
    assert next(it) == reference_greedy(model, [1, 2, 3], 2)[1]
    it.close()


@pytest.mark.parametrize('args, message', [(([], 5), 'no tokens'), (([600], 5), 'outside the model'), (([1], -1), 'max_new_tokens'),
                                           ((torch.zeros(2, 3, dtype=torch.long), 5), 'one sequence')])
def test_generate_errors(model, args, message):
    with pytest.raises(ValueError, match=message): list(generate(model, *args))


# ----------------------------------------------------------------------------- text
@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=0, max_size=40).filter(lambda s: '<|endoftext|>' not in s))
def test_decode_stream_never_splits_characters(byte_tok, text):
    pieces = list(decode_stream(byte_tok, byte_tok.encode(text)))
    assert ''.join(pieces) == text
    assert all(pieces) and not any('\ufffd' in p for p in pieces if '\ufffd' not in text)


def test_decode_stream_emits_complete_text_early_and_does_not_stall_on_garbage(byte_tok):
    ids = byte_tok.encode('ab€')                                        # € is three bytes
    assert list(decode_stream(byte_tok, ids)) == ['a', 'b', '€']
    ids = byte_tok.encode('ab') + [0xE2] + byte_tok.encode('cd')          # a lone lead byte: invalid UTF-8
    assert ''.join(decode_stream(byte_tok, ids)) == byte_tok.decode(ids)
    garbage = [0xE2] * 20                                               # never completes: must still come out
    assert ''.join(decode_stream(byte_tok, garbage, max_pending=4)) == byte_tok.decode(garbage)


def test_generate_text(byte_tok):
    torch.manual_seed(0)
    lm = Transformer(ModelConfig.preset('tiny', vocab_size=byte_tok.vocab_size)).eval()
    eot = byte_tok.eot_id
    greedy = ''.join(generate_text(lm, byte_tok, 'Hé', max_new_tokens=30, temperature=0))
    ids = reference_greedy(lm, [eot] + byte_tok.encode('Hé'), 30)
    ids = ids[:ids.index(eot)] if eot in ids else ids
    assert greedy == ''.join(decode_stream(byte_tok, ids))   # random bytes need not be valid UTF-8, so compare with the stream
    if '\ufffd' not in greedy: assert greedy == byte_tok.decode(ids)
    sampled = list(generate_text(lm, byte_tok, 'Hé', max_new_tokens=30, seed=3))
    assert sampled == list(generate_text(lm, byte_tok, 'Hé', max_new_tokens=30, seed=3))
    assert ''.join(generate_text(lm, byte_tok, '', max_new_tokens=5, temperature=0, stop_ids=())) != ''   # empty prompt: starts at eot
    no_eot = ''.join(generate_text(lm, byte_tok, 'Hé', max_new_tokens=5, temperature=0, prepend_eot=False, stop_ids=()))
    assert no_eot == ''.join(decode_stream(byte_tok, reference_greedy(lm, byte_tok.encode('Hé'), 5)))
    with pytest.raises(ValueError, match='tokenizer has 257 tokens but the model only 200'):
        list(generate_text(Transformer(ModelConfig.preset('tiny', vocab_size=200)), byte_tok, 'x'))


def test_greedy_matches_transformers_generate(tmp_path):
    transformers = pytest.importorskip('transformers')
    from minillm.model import save_hf_llama
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset('tiny', n_kv_heads=2)).eval()
    with torch.no_grad():
        for p in m.parameters(): p.mul_(5)                              # sharper logits: fewer near-ties for argmax
    save_hf_llama(m, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [3, 14, 15, 92, 65]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert list(generate(m, prompt, 40, temperature=0)) == out[0, len(prompt):].tolist()
