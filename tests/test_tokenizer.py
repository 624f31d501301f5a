"""Tests for minillm.tokenizer: the hand-worked BPE example, round trips, GPT-2 equivalence with tiktoken,
Hugging Face export, special tokens, streaming/batch encoding, file formats and clear errors on bad input."""
import gzip, json, pickle, random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings, strategies as st

from minillm import core
from minillm.tokenizer import (GPT2_PATTERN, GPT4_PATTERN, PreTokenizer, Tokenizer, bpe_merges, bytes_to_unicode,
                               count_pretokens, naive_bpe_merges, special_regex, str_to_token, token_to_str)

SHARED_DATA = core.SHARED_DATA
GPT2_DIR = SHARED_DATA / 'tokenizers' / 'gpt2' if SHARED_DATA else None
needs_gpt2 = pytest.mark.skipif(GPT2_DIR is None or not (GPT2_DIR / 'encoder.json').exists(),
                                reason='needs ../shared/data/tokenizers/gpt2 (GPT-2 files), absent on this machine')
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that stresses pre-tokenization and BPE: whitespace runs, contractions, digits, code, unicode, emoji, specials.
FRAGMENTS = [' ', '  ', '   ', '\n', '\n\n', '\t', '\r\n', '\x0b', '\x1c', '\u00a0', '\u2028', "'s", "'LL", "'ve", "'", 'Hello',
             ' world', 'the', 'THE', '123', '4567890', '3.14', '1,000', 'def f(x):', '    return x**2', '{}', '==', '->',
             'é', 'ß', 'ünï', '中文', 'العربية', '😀', '👍🏽', '🎉🎉', '\u0301', '１２', '<|endoftext|>', '<|endoftext', '|>', '<|']
mixed_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=25).map(''.join)
any_text = st.text() | mixed_text


def corpus_texts(n_docs=8, chars=60_000):
    "A slice of the embedded default corpus (no datasets import needed)."
    out = []
    with gzip.open(core.DEFAULT_CORPUS, 'rt', encoding='utf-8') as f:
        for line, _ in zip(f, range(n_docs)): out.append(json.loads(line)['text'][:chars])
    return out


@pytest.fixture(scope='module')
def texts(): return corpus_texts()


@pytest.fixture(scope='module')
def trained(texts): return Tokenizer.train(texts, 1024, workers=1, show_progress=False)


@pytest.fixture(scope='module')
def gpt2():
    if GPT2_DIR is None: pytest.skip('needs ../shared/data/tokenizers/gpt2')
    return Tokenizer.from_gpt2(GPT2_DIR)


@pytest.fixture(scope='module')
def tiktoken_gpt2():
    "tiktoken's gpt2 encoding built offline from the same files (get_encoding would download)."
    tiktoken = pytest.importorskip('tiktoken')
    if GPT2_DIR is None: pytest.skip('needs ../shared/data/tokenizers/gpt2')
    enc = json.loads((GPT2_DIR / 'encoder.json').read_text(encoding='utf-8'))
    dec = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(dec[c] for c in t): i for t, i in enc.items() if t != '<|endoftext|>'}
    return tiktoken.Encoding(name='gpt2-offline', pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={'<|endoftext|>': 50256})


def hf_from(tok, path):
    tokenizers = pytest.importorskip('tokenizers')
    return tokenizers.Tokenizer.from_file(str(tok.to_hf(path)))


# ---------------------------------------------------------------- BPE training
LECTURE = 'low low low low low lower lower widest widest widest newest newest newest newest newest newest'
LECTURE_MERGES = ['s t', 'e st', 'o w', 'l ow', 'w est', 'n e', 'ne west', 'w i', 'wi d', 'wid est', 'low e', 'lowe r']


def merged(merges):
    "Id-pair merges as 'left right' strings of the merged byte strings."
    vocab = [bytes([b]) for b in range(256)]
    out = []
    for a, b in merges:
        out.append(f'{vocab[a].decode()} {vocab[b].decode()}'); vocab.append(vocab[a] + vocab[b])
    return out


def test_lecture_example_by_hand():
    counts = Counter(w.encode() for w in LECTURE.split())
    assert counts == {b'low': 5, b'lower': 2, b'widest': 3, b'newest': 6}
    # step 1 by hand: 'es' and 'st' both count 9 (3 widest + 6 newest); (b's', b't') > (b'e', b's') wins the tie
    assert [f'{a.decode()} {b.decode()}' for a, b in naive_bpe_merges(counts, 100)] == LECTURE_MERGES
    assert merged(bpe_merges(counts, 100)) == LECTURE_MERGES
    assert merged(bpe_merges(counts, 3)) == LECTURE_MERGES[:3]


def test_tie_break_prefers_greatest_bytes():
    # every pair counts 1: the greatest pair of byte strings wins, comparing the first token then the second
    assert merged(bpe_merges({b'ab': 1, b'cd': 1, b'ca': 1}, 1)) == ['c d']
    assert merged(bpe_merges({b'ab': 2, b'zz': 1}, 1)) == ['a b']          # count beats bytes
    assert [(a, b) for a, b in naive_bpe_merges({b'xab': 1, b'xa': 1}, 2)][1] == (b'xa', b'b')


def test_fast_merges_equal_naive_on_real_text(texts):
    counts = Counter({w.encode(): c for w, c in count_pretokens(texts[:1]).items()})
    naive = naive_bpe_merges(counts, 40)
    vocab = [bytes([b]) for b in range(256)]
    fast = []
    for a, b in bpe_merges(counts, 40): fast.append((vocab[a], vocab[b])); vocab.append(vocab[a] + vocab[b])
    assert fast == naive


def test_training_is_deterministic_and_parallel_safe(texts, trained):
    again = Tokenizer.train(texts, 1024, workers=2, show_progress=False)
    assert again.merges == trained.merges and again.vocab == trained.vocab
    assert trained.vocab_size == 1024 and trained.special_tokens == {'<|endoftext|>': 1023} and trained.eot_id == 1023
    assert len(set(trained.vocab)) == len(trained.vocab)   # no duplicate tokens


def test_special_tokens_never_merged():
    tok = Tokenizer.train(['ab<|endoftext|>ab<|endoftext|>' * 50], 300, show_progress=False)
    assert all(b'<|' not in t and b'|>' not in t for t in tok.vocab[256:])
    assert tok.encode('ab<|endoftext|>') == [tok.encode('ab')[0], tok.eot_id]


def test_count_pretokens_parallel_and_cut(texts):
    one_big = '<|endoftext|>'.join(texts)   # a single long text: cut at specials and safe places across processes
    serial = count_pretokens([one_big], special_tokens=['<|endoftext|>'], workers=1)
    parallel = count_pretokens([one_big], special_tokens=['<|endoftext|>'], workers=2, chunk_chars=20_000)
    assert parallel == serial
    expected = Counter(w for t in texts for w in regex.findall(GPT2_PATTERN, t))
    assert serial == expected
    assert count_pretokens(iter(texts), workers=2, chunk_chars=50_000) == expected   # a generator works too


def test_small_corpus_gives_smaller_vocab():
    tok = Tokenizer.train(['abab abab'], 1000, special_tokens=[], show_progress=False)
    assert tok.vocab_size < 1000 and tok.decode(tok.encode('abab abab')) == 'abab abab'


# ---------------------------------------------------------------- pre-tokenization
def test_bytes_to_unicode():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256 and m[ord(' ')] == 'Ġ' and m[ord('\n')] == 'Ċ' and m[ord('A')] == 'A'
    assert str_to_token(token_to_str(bytes(range(256)))) == bytes(range(256))
    with pytest.raises(ValueError, match='byte alphabet'): str_to_token(' ')


@SETTINGS
@given(st.text(alphabet=st.characters(max_codepoint=127)) | mixed_text.map(lambda s: s.encode('ascii', 'ignore').decode()))
def test_ascii_twin_matches_regex(s):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert PreTokenizer(pattern).words(s) == regex.findall(pattern, s)


@SETTINGS
@given(any_text, st.integers(1, 12))
def test_safe_cuts_keep_pretokens(s, size):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        pt = PreTokenizer(pattern)
        pieces = pt.cut(s, size)
        assert ''.join(pieces) == s
        assert [w for p in pieces for w in regex.findall(pattern, p)] == regex.findall(pattern, s)


def test_long_mixed_text_pretokens(texts):
    s = texts[0] + ' ünïcödé 中文 ' + texts[1]
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert PreTokenizer(pattern).words(s) == regex.findall(pattern, s)
    assert PreTokenizer(r'\w+|\W+').words('ab, cd') == ['ab', ', ', 'cd']   # a custom pattern


# ---------------------------------------------------------------- encode / decode
@SETTINGS
@given(any_text)
def test_roundtrip_trained(trained, s):
    ids = trained.encode(s)
    assert trained.decode(ids) == s
    assert all(isinstance(i, int) and 0 <= i < trained.vocab_size for i in ids)


@SETTINGS
@given(st.lists(st.integers(0, 1023), max_size=30))
def test_decode_never_fails_on_valid_ids(trained, ids):
    text = trained.decode(ids)   # random ids are mostly not valid UTF-8 together: replaced, no exception
    assert isinstance(text, str) and text == trained.decode_bytes(ids).decode('utf-8', 'replace')


def test_decode_invalid_utf8(trained):
    assert trained.decode([trained.vocab.index(b'\xff')]) == '\ufffd'    # never valid in UTF-8
    assert trained.decode([trained.vocab.index(b'\xe2')]) == '\ufffd'    # half of a 3-byte character
    assert trained.decode(np.array(trained.encode('héllo'))) == 'héllo'   # numpy ids work too


def test_encode_ordinary_and_allowed_special(trained):
    text = '<|endoftext|>doc one<|endoftext|><|endoftext|>doc two<|endoftext|>'
    eot = trained.eot_id
    ids = trained.encode(text)
    assert ids[0] == ids[-1] == eot and ids.count(eot) == 4 and trained.decode(ids) == text
    for ordinary in (trained.encode(text, allowed_special='none'), trained.encode_ordinary(text), trained.encode(text, allowed_special=set())):
        assert eot not in ordinary and trained.decode(ordinary) == text
    assert trained.encode(text, allowed_special={'<|endoftext|>'}) == ids
    with pytest.raises(ValueError, match='not special tokens'): trained.encode(text, allowed_special={'<|pad|>'})
    with pytest.raises(ValueError, match='allowed_special'): trained.encode(text, allowed_special='some')


def test_special_token_edge_cases(texts):
    specials = ['<|endoftext|>', '<|end|>', '<|endoftext|><|pad|>', '<|im_start|>']
    tok = Tokenizer.train(texts[:2], 400, special_tokens=specials, show_progress=False)
    sid = tok.special_tokens
    assert list(sid.values()) == [396, 397, 398, 399] and tok.vocab_size == 400
    e, end, ep, im = (sid[s] for s in specials)
    assert tok.encode('<|endoftext|><|endoftext|>') == [e, e]                       # adjacent, same token
    assert tok.encode('<|endoftext|><|pad|>') == [ep]                                # a longer special wins (prefix)
    assert tok.encode('<|end|><|endoftext|>x<|im_start|>') == [end, e, *tok.encode('x'), im]
    assert tok.encode('<|endoftext|') == tok.encode_ordinary('<|endoftext|')          # unfinished: plain text
    assert tok.encode('<|endoftext|>') == [e] and tok.encode('a<|end|>')[-1] == end   # at the start / end
    assert tok.encode('<|end|>' * 3, allowed_special={'<|end|>'}) == [end] * 3
    mixed = tok.encode('<|endoftext|><|end|>', allowed_special={'<|end|>'})
    assert mixed[-1] == end and e not in mixed
    assert tok.decode([e, end, ep]) == '<|endoftext|><|end|><|endoftext|><|pad|>'
    assert tok.token_str(ep) == '<|endoftext|><|pad|>'
    for s in ('x' * 50, 'hello world', '<<||>>'):   # ordinary text never produces special ids
        assert not set(tok.encode(s)) & set(sid.values())


def test_special_regex_longest_first():
    sre = special_regex(['<|a|>', '<|a|><|b|>'])
    assert sre.split('x<|a|><|b|>y<|a|>') == ['x', '<|a|><|b|>', 'y', '<|a|>', '']
    assert special_regex([]) is None


@SETTINGS
@given(any_text, st.lists(st.integers(0, 200), max_size=6), st.integers(1, 40), st.sampled_from(['gpt2', 'gpt4']))
def test_encode_iterable_equals_encode(trained, s, cuts, buffer_chars, pattern):
    tok = trained if pattern == 'gpt2' else Tokenizer(trained.vocab, trained.merges, trained.special_tokens, pattern)
    cuts = sorted(min(c, len(s)) for c in cuts)
    pieces = [s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)])]
    assert list(tok.encode_iterable(pieces, buffer_chars=buffer_chars)) == tok.encode(s)
    assert list(tok.encode_iterable(pieces, allowed_special='none', buffer_chars=buffer_chars)) == tok.encode_ordinary(s)


def test_encode_iterable_streams_a_file(trained, texts, tmp_path):
    path = tmp_path / 'book.txt'
    path.write_text('<|endoftext|>'.join(texts), encoding='utf-8')
    with open(path, encoding='utf-8', newline='') as f: streamed = list(trained.encode_iterable(f))
    assert streamed == trained.encode(path.read_text(encoding='utf-8'))


def test_encode_batch_and_corpus(trained, texts):
    big = texts * 3   # over a million characters: runs on 2 processes
    assert sum(map(len, big)) > 1 << 20
    serial = [trained.encode(t) for t in big]
    assert trained.encode_batch(big, workers=2) == serial
    arrays = trained.encode_batch(big[:3], workers=1, as_numpy=True)
    assert all(a.dtype == np.uint32 for a in arrays) and [a.tolist() for a in arrays] == serial[:3]
    flat = trained.encode_corpus(big[:2], workers=1)
    assert flat.dtype == np.uint16 and flat.tolist() == serial[0] + [trained.eot_id] + serial[1] + [trained.eot_id]
    assert trained.encode_batch([]) == [] and trained.encode_corpus([]).size == 0


def test_pickle_roundtrip(trained):
    back = pickle.loads(pickle.dumps(trained))
    assert back.encode('Hello there, 😀!') == trained.encode('Hello there, 😀!')


# ---------------------------------------------------------------- GPT-2 and tiktoken
@needs_gpt2
@SETTINGS
@given(any_text)
def test_gpt2_equals_tiktoken(gpt2, tiktoken_gpt2, s):
    ids = gpt2.encode(s)
    assert ids == tiktoken_gpt2.encode(s, allowed_special='all')
    assert gpt2.encode_ordinary(s) == tiktoken_gpt2.encode_ordinary(s)
    assert gpt2.decode(ids) == s


@needs_gpt2
def test_gpt2_known_inputs(gpt2, tiktoken_gpt2, texts):
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256 and len(gpt2.merges) == 50000
    assert gpt2.encode('Hello world') == [15496, 995]   # published GPT-2 ids
    cases = ['=' * 500, '1234567890' * 30, ' ' * 300 + 'x', '\n' * 100, 'a' * 1000, 'ab' * 400, '😀' * 50,
             'def f(x):\n\tif x:\n        return [i**2 for i in range(10)]\n', '<|endoftext|>' * 3, texts[0]]
    for s in cases: assert gpt2.encode(s) == tiktoken_gpt2.encode(s, allowed_special='all'), s[:30]


@needs_gpt2
def test_from_gpt2_version_header_and_errors(gpt2, tmp_path):
    (tmp_path / 'encoder.json').write_bytes((GPT2_DIR / 'encoder.json').read_bytes())
    merges = (GPT2_DIR / 'vocab.bpe').read_text(encoding='utf-8')
    (tmp_path / 'vocab.bpe').write_text('#version: 0.2\n' + merges, encoding='utf-8')
    with_header = Tokenizer.from_gpt2(tmp_path)
    assert with_header.merges == gpt2.merges and with_header.vocab == gpt2.vocab
    (tmp_path / 'vocab.bpe').write_text('#version: 0.2\nĠ t\nnot-a-token xyz\n', encoding='utf-8')
    with pytest.raises(ValueError, match='vocab.bpe'): Tokenizer.from_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match='encoder.json'): Tokenizer.from_gpt2(tmp_path / 'nowhere')


# ---------------------------------------------------------------- Hugging Face export
@SETTINGS
@given(any_text)
def test_hf_export_trained(trained_hf, s):
    tok, hf = trained_hf
    assert hf.encode(s).ids == tok.encode(s)


@pytest.fixture(scope='module')
def trained_hf(trained, tmp_path_factory):
    return trained, hf_from(trained, tmp_path_factory.mktemp('hf') / 'tokenizer.json')


def test_hf_export_gpt4_pattern(texts, tmp_path):
    tok = Tokenizer.train(texts[:3], 600, pattern='gpt4', show_progress=False)
    hf = hf_from(tok, tmp_path / 'tokenizer.json')
    rng = random.Random(0)
    for _ in range(300):
        s = ''.join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 20)))
        assert hf.encode(s).ids == tok.encode(s), s
    assert hf.encode(texts[4]).ids == tok.encode(texts[4])


@needs_gpt2
@SETTINGS
@given(any_text)
def test_hf_export_gpt2(gpt2_hf, s):
    tok, hf = gpt2_hf
    assert hf.encode(s).ids == tok.encode(s)


@pytest.fixture(scope='module')
def gpt2_hf(gpt2, tmp_path_factory):
    return gpt2, hf_from(gpt2, tmp_path_factory.mktemp('hf2') / 'tokenizer.json')


# ---------------------------------------------------------------- files
def test_save_load_roundtrip(trained, tmp_path):
    path = trained.save(tmp_path / 'tok' / 'tokenizer.json')
    text = path.read_text(encoding='utf-8')
    d = json.loads(text)
    assert d['format'] == 'minillm-bpe' and d['version'] == 1 and d['merges'][0] == 'Ġ t'   # readable merges
    assert d['special_tokens'] == {'<|endoftext|>': 1023} and len(d['vocab']) == 1023
    back = Tokenizer.load(path)
    assert (back.vocab, back.merges, back.special_tokens, back.pattern) == (trained.vocab, trained.merges, trained.special_tokens, trained.pattern)


def test_load_errors(trained, tmp_path):
    good = json.loads(Path(trained.save(tmp_path / 'good.json')).read_text(encoding='utf-8'))
    with pytest.raises(FileNotFoundError, match='does not exist'): Tokenizer.load(tmp_path / 'missing.json')
    (tmp_path / 'bad.json').write_text('{not json', encoding='utf-8')
    with pytest.raises(ValueError, match='not valid JSON'): Tokenizer.load(tmp_path / 'bad.json')
    cases = {'version': ({**good, 'version': 2}, 'version 2'),
             'format': ({**good, 'format': 'other'}, 'not a minillm tokenizer'),
             'hf': ({'model': {}, 'version': '1.0'}, 'Hugging Face'),
             'merge': ({**good, 'merges': ['Ġ q'] + good['merges'][1:]}, 'malformed|merge'),
             'vocab': ({**good, 'vocab': good['vocab'][:-1]}, 'malformed|vocab'),
             'missing': ({k: v for k, v in good.items() if k != 'merges'}, 'malformed'),
             'list': ([1, 2], 'not a minillm tokenizer')}
    for name, (d, msg) in cases.items():
        (tmp_path / f'{name}.json').write_text(json.dumps(d), encoding='utf-8')
        with pytest.raises(ValueError, match=msg): Tokenizer.load(tmp_path / f'{name}.json')


# ---------------------------------------------------------------- bad input
def test_bad_training_input(texts):
    with pytest.raises(ValueError, match='too small'): Tokenizer.train(texts, 256, show_progress=False)   # 256 + 1 special needed
    with pytest.raises(ValueError, match='too small'): Tokenizer.train(texts, 300, special_tokens=[f'<{i}>' for i in range(50)], show_progress=False)
    with pytest.raises(ValueError, match='too small'): Tokenizer.train(texts, 1000.0, show_progress=False)
    for empty in ([], [''], ['<|endoftext|>', '']):
        with pytest.raises(ValueError, match='empty'): Tokenizer.train(empty, 500, show_progress=False)
    with pytest.raises(TypeError, match='not a str'): Tokenizer.train([b'bytes'], 500, show_progress=False)
    with pytest.raises(TypeError, match='not a str'): Tokenizer.train(['ok', 3], 500, show_progress=False)
    with pytest.raises(TypeError, match="dataset\\['text'\\]"): Tokenizer.train([{'text': 'a'}], 500, show_progress=False)
    with pytest.raises(TypeError, match='iterable of strings'): Tokenizer.train(12, 500, show_progress=False)
    with pytest.raises(ValueError, match='does not compile'): Tokenizer.train(texts, 500, pattern='(', show_progress=False)
    with pytest.raises(ValueError, match='workers'): Tokenizer.train(texts, 500, workers=0, show_progress=False)
    with pytest.raises(ValueError, match='non-empty'): Tokenizer.train(texts, 500, special_tokens=[''], show_progress=False)
    assert Tokenizer.train('a single string is one text', 300, show_progress=False).decode([97]) == 'a'


@needs_gpt2
def test_lone_surrogates_become_replacement_chars(gpt2, tiktoken_gpt2, trained):
    for s in ('a\ud800b', '\udfff', 'x \ud83d\ude00 y', '<|endoftext|>\ud800'):
        assert gpt2.encode(s) == tiktoken_gpt2.encode(s, allowed_special='all')
    assert trained.decode(trained.encode('a\ud800b')) == 'a\ufffdb'
    assert Tokenizer.train(['ab\ud800 ab ab'], 300, show_progress=False).decode_bytes([97]) == b'a'


def test_bad_encode_decode_input(trained):
    with pytest.raises(TypeError, match='decode bytes first'): trained.encode(b'bytes')
    with pytest.raises(TypeError, match='expects a str'): trained.encode(None)
    for bad in ([-1], [1024], [5, 10**9], [1.5]):
        with pytest.raises(ValueError, match='not a token id'): trained.decode(bad)


def test_bad_tokenizer_construction(trained):
    with pytest.raises(ValueError, match='256 single bytes'): Tokenizer([b'a'] * 256, [])
    with pytest.raises(ValueError, match='merge #0'): Tokenizer(trained.vocab[:257], [(0, 300)])
    with pytest.raises(ValueError, match=r'vocab\[256\]'): Tokenizer(trained.vocab[:256] + [b'zz'], [(0, 1)])
    with pytest.raises(ValueError, match='id'): Tokenizer(trained.vocab, trained.merges, {'<|x|>': 5})


@pytest.mark.slow
@needs_gpt2
def test_gpt2_on_books_equals_tiktoken(gpt2, tiktoken_gpt2):
    "Several MB of real books through both encoders, single and batch."
    docs = []
    with gzip.open(SHARED_DATA / 'pretrain' / 'books.jsonl.gz', 'rt', encoding='utf-8') as f:
        for line, _ in zip(f, range(12)): docs.append(json.loads(line)['text'])
    ref = [tiktoken_gpt2.encode(d, allowed_special='all') for d in docs]
    assert gpt2.encode_batch(docs, workers=2) == ref
    assert gpt2.encode('<|endoftext|>'.join(docs)) == tiktoken_gpt2.encode('<|endoftext|>'.join(docs), allowed_special='all')
