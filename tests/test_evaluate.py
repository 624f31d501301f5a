"""Tests for minillm.evaluate: perplexity bounds and sliding windows, batched log-likelihoods against naive references and
Hugging Face transformers, task files and their errors, the real benchmark loaders (skipped without the shared data),
results files, and the contamination permutation test."""
import json, math, random

import numpy as np
import pytest
import torch
import torch.nn as nn

from minillm.core import SHARED_DATA
from minillm.evaluate import (LETTERS, QUICK_LIMIT, QUICK_TASKS, TASKS, Example, Read, Task, TextScore, bits_per_byte,
                              contamination_test, detokenize_wikitext, encode_request, evaluate_run, evaluate_task,
                              example_text, letter_prompt, load_task, load_task_file, load_wikitext, loglikelihoods,
                              model_context_length, order_logprobs, permutation_p_value, perplexity, results_markdown,
                              score_rows, score_text, score_tokens, sliding_windows, token_nlls)
from minillm.model import ModelConfig, Transformer, save_hf_llama
from minillm.tokenizer import Tokenizer

needs_data = pytest.mark.skipif(SHARED_DATA is None, reason='the shared data folder (../shared/data) is not present')
TEXT = ('It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. '
        'However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is '
        'so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or '
        'other of their daughters. ') * 3


@pytest.fixture(scope='module')
def tok():
    return Tokenizer.train([TEXT], vocab_size=300, show_progress=False)


@pytest.fixture(scope='module')
def byte_tok():
    return Tokenizer.train(['bytes only'], vocab_size=257, show_progress=False)   # 256 bytes + <|endoftext|>: exact round trips


def make_model(vocab_size, context_length=32, seed=0):
    "A random tiny Transformer with logits of a few units, so that mix-ups of positions or rows change the numbers."
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.preset('tiny', vocab_size=vocab_size, context_length=context_length))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith('norm.weight'): p.mul_(5)
    return m.eval()


@pytest.fixture(scope='module')
def model(tok):
    return make_model(tok.vocab_size, context_length=64)


class Uniform(nn.Module):
    "The uniform distribution over `vocab_size` tokens, as a model."
    def __init__(self, vocab_size):
        super().__init__(); self.vocab_size = vocab_size
    def forward(self, idx): return torch.zeros(*idx.shape, self.vocab_size)


def naive_loglikelihoods(model, tok, requests, T):
    "Reference, one request at a time: tokenized the documented way, each context cut once so its longest continuation fits."
    def enc(context, continuation):
        n = len(context) - len(context.rstrip(' '))
        if n: context, continuation = context[:-n], context[-n:] + continuation
        return [tok.eot_id] + tok.encode(context), tok.encode(continuation)
    encoded = [enc(c, k) for c, k in requests]
    out = []
    for ctx, cont in encoded:
        longest = max(len(k) for c, k in encoded if c == ctx)
        ids = ctx[max(0, len(ctx) - (T + 1 - longest)):] + cont
        with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        pos = range(len(ids) - 1 - len(cont), len(ids) - 1)
        out.append((sum(lp[p, t].item() for p, t in zip(pos, cont)), all(lp[p].argmax().item() == t for p, t in zip(pos, cont))))
    return out


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize('V', [300, 301, 5000])
def test_uniform_model_has_perplexity_vocab_size(tok, V):
    s = score_text(Uniform(V), tok, TEXT, context_length=16)
    assert s.ppl == pytest.approx(V, rel=1e-5)
    assert s.bits_per_byte == pytest.approx(math.log2(V) * s.n_tokens / s.n_bytes, rel=1e-5)
    assert s.n_bytes == len(TEXT.encode()) and s.n_tokens == len(tok.encode(TEXT))


def test_perplexity_bounds_and_functions(tok, model):
    s = score_text(model, tok, [TEXT[:300], TEXT[300:700]])
    assert s.ppl >= 1 and s.loss >= 0
    assert perplexity(model, tok, [TEXT[:300], TEXT[300:700]]) == pytest.approx(s.ppl)
    assert bits_per_byte(model, tok, [TEXT[:300], TEXT[300:700]]) == pytest.approx(s.bits_per_byte)
    a, b = score_text(model, tok, TEXT[:300]), score_text(model, tok, TEXT[300:700])
    assert (a + b).nll == pytest.approx(s.nll) and (a + b).n_tokens == s.n_tokens   # documents combine by adding totals
    with pytest.raises(ValueError, match='Nothing to score'): score_text(model, tok, [''], add_bos=False)


@pytest.mark.parametrize('n,T,stride', [(1, 8, 8), (2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 3), (100, 8, 1), (37, 16, 16), (5, 16, 4)])
def test_sliding_windows_score_each_token_once(n, T, stride):
    w = sliding_windows(n, T, stride)
    assert [t for _, e, f in w for t in range(f, e)] == list(range(1, n))
    assert all(0 <= s < f <= e <= n and e - 1 - s <= T for s, e, f in w)
    assert all(f - s >= T - stride + 1 for s, e, f in w[1:])            # guaranteed context after the first window


def test_sliding_window_bad_stride():
    with pytest.raises(ValueError, match='stride'): sliding_windows(10, 8, 9)
    with pytest.raises(ValueError, match='stride'): sliding_windows(10, 8, -1)


@pytest.mark.parametrize('stride', [32, 16, 5, 1])
def test_token_nlls_match_naive_windows(tok, model, stride):
    ids = [tok.eot_id] + tok.encode(TEXT)[:100]
    T = model_context_length(model)
    got = token_nlls(model, ids, stride=stride, batch_size=3)
    ref = []
    for t in range(1, len(ids)):                                      # token t, read with the window the layout gives it
        s = next(s for s, e, f in sliding_windows(len(ids), T, stride) if f <= t < e)
        with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([ids[s:t]]))[0, -1].double(), -1)
        ref.append(-lp[ids[t]].item())
    assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4)


def test_token_nlls_full_window_equals_one_pass(tok, model):
    ids = [tok.eot_id] + tok.encode(TEXT)[:32]
    with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
    assert torch.allclose(token_nlls(model, ids), -lp[torch.arange(32), ids[1:]], atol=1e-5)


def test_score_tokens_counts_bytes_without_special_tokens(tok, model):
    ids = [tok.eot_id] + tok.encode(TEXT[:200]) + [tok.eot_id] + tok.encode(TEXT[200:400])
    s = score_tokens(model, ids, tok)
    assert s.n_tokens == len(ids) - 1 and s.n_bytes == 400
    assert s.nll == pytest.approx(token_nlls(model, ids).double().sum().item(), rel=1e-6)


def test_wikitext_detokenizer():
    raw = ' = Title = \n \n A guest @-@ starring role , 1 @,@ 000 and 3 @.@ 5 % ( see " Teddy \'s Story " ) . \n = = Career = = \n'
    assert detokenize_wikitext(raw) == '= Title =\n\nA guest-starring role, 1,000 and 3.5% (see "Teddy\'s Story").\n== Career ==\n'
    with pytest.raises(ValueError, match="'keep'"): load_wikitext('test', data_dir='/nowhere', unk='drop')
    with pytest.raises(FileNotFoundError, match='does not exist'): load_wikitext('test', data_dir='/nowhere')


@needs_data
def test_wikitext_real_files():
    raw, clean, no_unk = load_wikitext('test', detokenize=False), load_wikitext('test'), load_wikitext('test', unk='remove')
    assert len(raw) == len(clean) == len(no_unk) == 62 and len(load_wikitext('valid')) == 60
    assert sum(t.count('<unk>') for t in raw) == 15218 and sum(t.count('<unk>') for t in no_unk) == 0
    assert sum(len(t.split()) for t in raw) == 241211
    assert clean[0].startswith('= Robert <unk> =\n\nRobert <unk> is an English film, television and theatre actor.')
    assert ' @-@ ' not in ''.join(clean) and ' , ' not in ''.join(clean)


# ----------------------------------------------------------------------------- log-likelihoods
def test_score_rows_padding_changes_nothing(tok, model):
    seqs = [tok.encode(TEXT[i:i + n]) for i, n in [(0, 90), (50, 20), (7, 60)]]
    rows = [(s, [Read(0, s[1:])]) for s in seqs]
    for bs in (1, 2, 3):
        for s, ((lp, greedy),) in zip(seqs, score_rows(model, rows, batch_size=bs)):
            with torch.no_grad(): ref = torch.log_softmax(model(torch.tensor([s]))[0], -1)
            assert torch.allclose(lp, ref[torch.arange(len(s) - 1), s[1:]], atol=1e-4)
            assert torch.equal(greedy, ref[:-1].argmax(-1) == torch.tensor(s[1:]))


REQUESTS = [('Question: What did the man want?\nAnswer:', ' A'), ('Question: What did the man want?\nAnswer:', ' B'),
            ('Question: What did the man want?\nAnswer:', ' C'), ('Question: What did the man want?\nAnswer:', ' a wife'),
            ('Question: What did the man want?\nAnswer:', ' a good fortune and more'), ('It is a truth ', 'universally'),
            ('', 'A whole sentence from the start.'), (TEXT, ' and so it ends'), (TEXT, ' and so it ends with a longer answer'),
            (TEXT[:40], ' acknowledged' * 6)]


@pytest.mark.parametrize('batch_size,share_context', [(1, True), (4, True), (16, True), (4, False)])
def test_loglikelihoods_match_naive_reference(tok, model, batch_size, share_context):
    T = model_context_length(model)
    got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size, share_context=share_context, min_shared=8)
    for (c, k), ll, (ref, greedy) in zip(REQUESTS, got, naive_loglikelihoods(model, tok, REQUESTS, T)):
        assert ll.logprob == pytest.approx(ref, abs=2e-3)
        assert ll.greedy == greedy and ll.n_tokens == len(encode_request(tok, c, k)[1])


def test_shared_inputs_are_computed_once(tok, model):
    fed = []
    hook = model.register_forward_hook(lambda m, inp, out: fed.append(inp[0].numel()))
    reqs = [(f'Question {i}?\nA. x\nB. y\nC. z\nD. w\nAnswer:', f' {L}') for i in range(5) for L in 'ABCD']
    try: loglikelihoods(model, tok, reqs, batch_size=1, share_context=False)
    finally: hook.remove()
    distinct = {tuple(sum(encode_request(tok, c, k), [])[:-1]) for c, k in reqs}
    assert sum(fed) == sum(len(d) for d in distinct) and len(fed) == len(distinct) < len(reqs)


def test_encode_request_conventions(tok, byte_tok):
    assert encode_request(tok, 'the man ', 'was') == encode_request(tok, 'the man', ' was')
    ctx, cont = encode_request(tok, '', 'A sentence.')
    assert ctx == [tok.eot_id] and tok.decode(cont) == 'A sentence.'
    with pytest.raises(ValueError, match='Empty continuation'): encode_request(tok, 'x', '')
    no_eot = Tokenizer.train(['abc'], vocab_size=256, special_tokens=(), show_progress=False)
    with pytest.raises(ValueError, match='Empty context'): encode_request(no_eot, '', 'abc')


def test_continuation_longer_than_window(tok, model):
    "A continuation longer than the window is read in chunks of T/2 tokens, each predicted with the window ending at its chunk's end."
    T = model_context_length(model)
    ctx, cont = encode_request(tok, 'x', TEXT[:400])
    assert len(cont) > 2 * T
    ids, ref, greedy = ctx + cont, 0.0, True
    for t in range(len(ctx), len(ids)):
        end = min(len(ids), len(ctx) + ((t - len(ctx)) // (T // 2) + 1) * (T // 2))
        with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([ids[max(0, end - 1 - T):t]]))[0, -1].double(), -1)
        ref += lp[ids[t]].item(); greedy &= lp.argmax().item() == ids[t]
    (ll,) = loglikelihoods(model, tok, [('x', TEXT[:400])])
    assert ll.logprob == pytest.approx(ref, abs=1e-2) and ll.n_tokens == len(cont) and ll.greedy == greedy


def test_shared_context_reads_each_context_once(tok, model):
    fed = []
    hook = model.register_forward_hook(lambda m, inp, out: fed.append(inp[0].numel()))
    reqs = [(TEXT[:60], ' a single man'), (TEXT[:60], ' the rightful property'), (TEXT[:60], ' some one or other')]
    try: shared = loglikelihoods(model, tok, reqs, batch_size=1, min_shared=1)
    finally: hook.remove()
    ctx = encode_request(tok, *reqs[0])[0]
    assert sum(fed) == len(ctx) + sum(len(encode_request(tok, c, k)[1]) - 1 for c, k in reqs)
    rows = loglikelihoods(model, tok, reqs, share_context=False)
    assert [a.logprob for a in shared] == pytest.approx([b.logprob for b in rows], abs=1e-3)
    fed.clear()
    hook = model.register_forward_hook(lambda m, inp, out: fed.append(inp[0].numel()))
    try: loglikelihoods(model, tok, reqs, batch_size=1)                  # the default min_shared: too short to share
    finally: hook.remove()
    assert len(fed) == 3


def test_matches_huggingface_llama(tmp_path, tok, model):
    transformers = pytest.importorskip('transformers')
    save_hf_llama(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours, theirs = loglikelihoods(model, tok, REQUESTS), loglikelihoods(hf, tok, REQUESTS)
    for a, b in zip(ours, theirs):
        assert a.logprob == pytest.approx(b.logprob, abs=2e-3) and a.greedy == b.greedy
    ids = [tok.eot_id] + tok.encode(TEXT)[:32]
    with torch.no_grad(): loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert token_nlls(model, ids).mean().item() == pytest.approx(loss, abs=1e-4)
    assert score_text(hf, tok, TEXT[:500]).nll == pytest.approx(score_text(model, tok, TEXT[:500]).nll, rel=1e-4)


# ----------------------------------------------------------------------------- tasks
def write_jsonl(path, records):
    path.write_text('\n'.join(r if isinstance(r, str) else json.dumps(r) for r in records) + '\n')
    return path


def test_task_file_shapes(tmp_path):
    q = load_task_file(write_jsonl(tmp_path / 'q.jsonl', [{'query': 'Question: 2+2?', 'choices': ['4', '5', '22'], 'gold': 0}]),
                       cloze_suffix='\nAnswer:')
    assert (q.name, q.kind, q.methods, q.chance) == ('q', 'choice', ('acc', 'acc_norm', 'letter'), pytest.approx(1 / 3))
    ex = q.examples[0]
    assert ex.contexts == ['Question: 2+2?\nAnswer:'] * 3 and ex.continuations == [' 4', ' 5', ' 22']
    assert ex.letter_prompt == 'Question: 2+2?\nA. 4\nB. 5\nC. 22\nAnswer:'
    o = load_task_file(write_jsonl(tmp_path / 'o.jsonl', [{'context_options': ['Tom hit Bob so Tom', 'Tom hit Bob so Bob'],
                                                           'continuation': 'cried.', 'gold': 1}]))
    assert (o.kind, o.methods, o.examples[0].continuations) == ('choice', ('acc',), [' cried.', ' cried.'])
    g = load_task_file(write_jsonl(tmp_path / 'g.jsonl', [{'context': 'The end of the', 'continuation': 'story'}]))
    assert (g.kind, g.methods, g.chance, g.examples[0].continuations) == ('greedy', ('acc',), 0.0, [' story'])


@pytest.mark.parametrize('lines,message', [
    (['{"query": "Q", "choices": [], "gold": 0}'], 'bad.jsonl:1: choices is empty'),
    (['{"query": "Q", "choices": ["a", "b"], "gold": 0}', '{"query": "Q", "choices": ["a"], "gold": 0}'], 'at least two choices'),
    (['{"query": "Q", "choices": ["a", ""], "gold": 0}'], 'empty continuation'),
    (['{"query": "Q", "choices": ["a", "b"], "gold": 2}'], 'gold must be'),
    (['{"query": "Q", "choices": ["a", "b"], "gold": "0"}'], 'gold must be'),
    (['{"query": "Q", "choices": ["a", "b"]}'], "missing field(s) ['gold']"),
    (['{"query": "Q", "choices": "ab", "gold": 0}'], "'choices' must be a list"),
    (['{"context_options": [], "continuation": "x", "gold": 0}'], "'context_options' is empty"),
    (['{"query": "Q", "choices": ["a", "b"], "gold": 0'], 'bad.jsonl:1: not valid JSON'),
    (['["a", "b"]'], 'expected a JSON object'),
    (['{"question": "Q"}'], 'unrecognised record'),
    (['{"query": "Q", "choices": ["a", "b"], "gold": 0}', '{"context": "x", "continuation": "y"}'], 'mixes record shapes'),
    (['', '  '], 'no examples'),
])
def test_malformed_task_files(tmp_path, lines, message):
    path = write_jsonl(tmp_path / 'bad.jsonl', lines)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[').replace(']', r'\]')):
        load_task_file(path)


def test_example_and_task_validation():
    with pytest.raises(ValueError, match='choices is empty'): Example.from_query('Q', [], 0)
    with pytest.raises(ValueError, match='no choices'): Example([], [], 0)
    with pytest.raises(TypeError): Example('ctx', ' a', 0)
    with pytest.raises(ValueError, match='one context per choice'): Example(['a'], [' x', ' y'], 0)
    with pytest.raises(ValueError, match='no examples'): Task('t', [])
    with pytest.raises(ValueError, match='Unknown scoring method'): Task('t', [Example.from_query('Q', ['a', 'b'], 0)], methods=('f1',))
    with pytest.raises(ValueError, match='letter prompt'): Task('t', [Example(['q', 'q'], [' a', ' b'], 0)], methods=('letter',))
    with pytest.raises(ValueError, match='one continuation'): Task('t', [Example(['q', 'q'], [' a', ' b'], 0)], kind='greedy', methods=('acc',))
    assert letter_prompt('Q?', ['x', 'y'], answer=1) == 'Q?\nA. x\nB. y\nAnswer: B\n\n'


def test_unknown_task_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'hellaswag'"): load_task('helaswag')
    with pytest.raises(ValueError, match='Known tasks'): load_task('squad')
    for name in TASKS:
        with pytest.raises(FileNotFoundError, match=f"Task '{name}' needs"): load_task(name, data_dir=tmp_path)


def test_subset_is_seeded_and_spans_the_set(tmp_path):
    path = write_jsonl(tmp_path / 't.jsonl', [{'query': f'Q{i}', 'choices': ['a', 'b'], 'gold': i % 2} for i in range(100)])
    a, b = load_task(path, limit=10, seed=1), load_task(path, limit=10, seed=1)
    assert [e.contexts for e in a.examples] == [e.contexts for e in b.examples] and len(a) == 10
    idx = [int(e.contexts[0][1:]) for e in a.examples]
    assert idx == sorted(idx) and idx[-1] > 50


# ----------------------------------------------------------------------------- scoring
def own_greedy(model, tok, prompt, n):
    ids = encode_request(tok, prompt, 'x')[0]
    for _ in range(n):
        with torch.no_grad(): ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tok.decode(ids[-n:]), ids[-n:]


def test_known_answers(byte_tok):
    model = make_model(byte_tok.vocab_size, context_length=64)
    prompts = ['The cat', 'A dog', 'Some birds', 'My house', 'It is', 'We', 'Then', 'Look at']
    examples, greedy = [], []
    for i, p in enumerate(prompts):
        c, ids = own_greedy(model, byte_tok, p, 4)
        if not c.strip() or byte_tok.encode(c) != ids: continue       # keep texts that re-encode to the greedy tokens
        cands = [c + 'zz', c + 'q!']                       # a longer text starting the same way is strictly less likely
        cands.insert(i % 3, c)
        examples.append(Example([p] * 3, cands, i % 3)); greedy.append(Example([p], [c]))
    assert len(examples) >= 2
    assert evaluate_task(model, byte_tok, Task('known', examples, methods=('acc',)))['scores']['acc'] == 1.0
    assert evaluate_task(model, byte_tok, Task('greedy', greedy, 'greedy', ('acc',)))['scores']['acc'] == 1.0
    wrong = [Example(e.contexts, e.continuations, (e.gold + 1) % 3) for e in examples]
    assert evaluate_task(model, byte_tok, Task('wrong', wrong, methods=('acc',)))['scores']['acc'] == 0.0


def test_scoring_methods_by_hand(tok, model):
    ex = Example.from_query('Question: Who is he?', ['a single man', 'Mr', 'the rightful property of some one'], 2, cloze_suffix='\nAnswer:')
    task = Task('t', [ex], methods=('acc', 'acc_norm', 'letter'))
    r = evaluate_task(model, tok, task, details=True)
    lls = loglikelihoods(model, tok, list(zip(ex.contexts, ex.continuations)))
    letters = loglikelihoods(model, tok, [(ex.letter_prompt, f' {L}') for L in 'ABC'])
    assert r['predictions']['acc'] == [int(np.argmax([l.logprob for l in lls]))]
    assert r['predictions']['acc_norm'] == [int(np.argmax([l.logprob / len(c.encode()) for l, c in zip(lls, ex.continuations)]))]
    assert r['predictions']['letter'] == [int(np.argmax([l.logprob for l in letters]))]
    assert r['chance'] == {'acc': pytest.approx(1 / 3), 'acc_norm': pytest.approx(1 / 3), 'letter': pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="not 'bleu'"): evaluate_task(model, tok, task, methods=('bleu',))


def test_evaluate_run_writes_results(tmp_path, tok, model):
    path = write_jsonl(tmp_path / 'mini.jsonl', [{'query': f'Question: {i} + 1?', 'choices': [str(i + 1), str(i + 2)], 'gold': 0}
                                                 for i in range(6)])
    out = tmp_path / 'run'
    ids = [tok.eot_id] + tok.encode(TEXT)
    res = evaluate_run(model, tok, [str(path), 'heldout'], out_dir=out, heldout=ids, batch_size=4)
    assert set(res['tasks']) == {'mini', 'heldout'}
    for f in ('eval_results.json', 'eval_results.md', 'eval_results.png', 'report.md'): assert (out / f).is_file(), f
    saved = json.loads((out / 'eval_results.json').read_text())
    assert saved['tasks']['mini']['chance']['acc'] == 0.5 and saved['tasks']['mini']['n'] == 6
    assert saved['tasks']['heldout']['chance']['ppl'] == tok.vocab_size
    table = (out / 'eval_results.md').read_text()
    assert '| mini | 6 | acc |' in table and '| mini | 6 | letter |' in table and '50.0%' in table
    assert '## Evaluation' in (out / 'report.md').read_text()
    assert res['tasks']['heldout']['scores']['ppl'] == pytest.approx(score_tokens(model, ids, tok, stride=model_context_length(model) // 2).ppl, rel=1e-6)
    assert results_markdown(res) == table.split('\n\n', 1)[1]
    assert model.training is False


def test_evaluate_run_missing_data(tmp_path, tok, model):
    with pytest.raises(FileNotFoundError, match="Task 'copa' needs"): evaluate_run(model, tok, ['copa'], data_dir=tmp_path)
    res = evaluate_run(model, tok, ['copa', 'heldout'], data_dir=tmp_path, skip_missing=True, heldout=[TEXT])
    assert list(res['skipped']) == ['copa'] and list(res['tasks']) == ['heldout']
    with pytest.raises(ValueError, match='heldout='): evaluate_run(model, tok, ['heldout'])
    assert set(QUICK_TASKS) <= set(TASKS) | {'wikitext2', 'heldout'} and QUICK_LIMIT['default'] > 0


# ----------------------------------------------------------------------------- the real benchmarks
@needs_data
def test_real_task_sizes_and_formats():
    sizes = {'mmlu': 14042, 'hellaswag': 10042, 'arc_easy': 2376, 'arc_challenge': 1172, 'piqa': 1838, 'copa': 100,
             'openbookqa': 500, 'winogrande': 1267, 'wsc': 273, 'lambada': 5153}
    for name, n in sizes.items(): assert len(load_task(name)) == n, name
    arc = load_task('arc_easy').examples[0]
    assert arc.contexts[0] == 'Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:'
    assert arc.continuations[0] == ' Sunlight is the source of energy for nearly all ecosystems.' and arc.gold == 0
    hs = load_task('hellaswag').examples[0]
    assert hs.contexts[0] == 'Roof shingle removal: A man is sitting on a roof. he' and hs.gold == 3
    assert hs.continuations[3] == ' starts pulling up roofing on a roof.'
    wg = load_task('winogrande').examples[0]
    assert wg.contexts == ['Sarah was a much better surgeon than Maria so Sarah', 'Sarah was a much better surgeon than Maria so Maria']
    lam = load_task('lambada')
    assert lam.kind == 'greedy' and lam.examples[1].continuations == [' Shane']


@needs_data
def test_mmlu_standard_prompt():
    task = load_task('mmlu', k=1, subjects=['abstract_algebra'])
    assert len(task) == 100
    ex = task.examples[0]
    assert ex.letter_prompt == (
        'The following are multiple choice questions (with answers) about abstract algebra.\n\n'
        'Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n'
        'Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:')
    assert ex.gold == 1 and ex.continuations == [' 0', ' 4', ' 2', ' 6']
    assert ex.contexts[0].endswith('Answer: 1\n\nQuestion: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nAnswer:')
    zero = load_task('mmlu', k=0, header=False, subjects=['abstract_algebra']).examples[0]
    assert zero.letter_prompt.startswith('Find the degree') and zero.contexts[0].startswith('Question: Find the degree')
    with pytest.raises(ValueError, match='between 0 and 5'): load_task('mmlu', k=6)
    with pytest.raises(ValueError, match='Unknown MMLU subject'): load_task('mmlu', subjects=['astrology'])


@needs_data
def test_blimp_pairs():
    task = load_task('blimp', phenomena=['causative', 'only_npi_scope'])
    assert len(task) == 2000 and task.chance == 0.5
    golds = [e.gold for e in task.examples]
    assert 0.4 < np.mean(golds) < 0.6                                   # the grammatical sentence is not always first
    first = task.examples[0]
    assert first.continuations[first.gold] == 'Aaron breaks the glass.' and first.contexts == ['', '']
    assert len(load_task('blimp')) == 67000
    with pytest.raises(ValueError, match='Unknown BLiMP phenomenon'): load_task('blimp', phenomena=['nonsense'])


@needs_data
def test_real_tasks_evaluate_end_to_end(tok, model):
    res = evaluate_run(model, tok, ['mmlu', 'hellaswag', 'piqa', 'copa', 'winogrande', 'lambada', 'blimp', 'arc_challenge', 'wikitext2'],
                       limit=8, batch_size=8)
    for name, r in res['tasks'].items():
        assert r['n'] == 8 and all(0 <= v <= 1 for m, v in r['scores'].items() if r['kind'] != 'perplexity'), name
    assert res['tasks']['wikitext2']['scores']['ppl'] > 1


# ----------------------------------------------------------------------------- contamination
def test_permutation_p_value():
    assert permutation_p_value(5, [1, 2, 3, 4]) == 0.2
    assert permutation_p_value(3, [1, 2, 3, 4]) == 0.6
    assert permutation_p_value(0, [1, 2, 3, 4]) == 1.0
    with pytest.raises(ValueError, match='empty'): permutation_p_value(1, [])
    rng = np.random.default_rng(1)
    p = np.array([permutation_p_value(x[0], x[1:]) for x in rng.normal(size=(3000, 20))])
    for level in (0.05, 0.1, 0.5):                                      # exchangeable: P(p <= k/(m+1)) = k/(m+1)
        assert abs((p <= level).mean() - level) < 0.02


class NGramLM(nn.Module):
    "An n-gram language model counted from a token stream (lightly smoothed): enough to memorise which example follows which."
    def __init__(self, vocab_size, ids, n=6, context_length=64, k=0.01):
        super().__init__()
        self.n, self.V, self.k, self.counts = n, vocab_size, k, {}
        for t in range(1, len(ids)):
            self.counts.setdefault(tuple(ids[max(0, t - n):t]), torch.zeros(vocab_size))[ids[t]] += 1
        self.cfg = type('Cfg', (), {'context_length': context_length, 'vocab_size': vocab_size})()
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
    def forward(self, idx):                                             # (B, T) -> (B, T, V) log-probs
        out = torch.zeros(*idx.shape, self.V)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                c = self.counts.get(tuple(row[max(0, t + 1 - self.n):t + 1]), torch.zeros(self.V))
                out[b, t] = torch.log((c + self.k) / (c.sum() + self.k * self.V))
        return out


def test_contamination_test_flags_a_memorised_order(byte_tok):
    animals = ['cat', 'dog', 'cow', 'hen', 'pig', 'fox', 'owl', 'eel', 'ant', 'bee', 'elk', 'yak', 'ram', 'emu', 'gnu', 'bat']
    examples = [f'{a} number {10 + 3 * i}.' for i, a in enumerate(animals)]     # each ends and starts differently
    canonical = sum((byte_tok.encode(e + '\n') for e in examples), [])
    background = byte_tok.encode(' '.join(examples[::-1]))
    dirty = NGramLM(byte_tok.vocab_size, background + canonical * 3)
    clean = NGramLM(byte_tok.vocab_size, background)
    d = contamination_test(dirty, byte_tok, examples, n_permutations=99, seed=0)
    c = contamination_test(clean, byte_tok, examples, n_permutations=99, seed=0)
    assert d['p_value'] == 0.01 and d['z'] > 3
    assert c['p_value'] > 0.05
    assert len(d['shuffled']) == 99 and d['n_examples'] == len(examples)
    with pytest.raises(ValueError, match='at least two'): contamination_test(clean, byte_tok, examples[:1])


def test_order_logprobs_equal_scoring_the_concatenation(tok, model):
    texts = ['The sun rose.', 'The birds sang loudly.', 'It was warm.']
    got = order_logprobs(model, tok, texts, [[0, 1, 2], [1, 2, 0]], stride=8)
    for order, lp in zip([[0, 1, 2], [1, 2, 0]], got):
        joined = ''.join(texts[i] + '\n' for i in order)
        assert tok.encode(joined) == sum((tok.encode(texts[i] + '\n') for i in order), [])
        assert lp == pytest.approx(-score_text(model, tok, joined, stride=8).nll, abs=1e-3)
    with pytest.raises(ValueError, match='not a permutation'): order_logprobs(model, tok, texts, [[0, 1, 1]])


def test_example_text():
    assert example_text(Example.from_query('The man fell, therefore', ['he cried.', 'he flew.'], 0)) == 'The man fell, therefore he cried.'


@pytest.mark.slow
def test_contamination_of_trained_models(tmp_path):
    "The chapter's experiment, larger: a Transformer trained on a leaked test set in its order is flagged (p < 0.05), a clean one is not."
    import datasets, re
    from minillm.core import load_corpus
    from minillm.data import prepare_tokens
    from minillm.train import TrainConfig, train
    corpus = load_corpus()
    docs = list(corpus.select(range(4))['text'])
    tk = Tokenizer.train(docs, vocab_size=512, show_progress=False)
    sentences = [x.strip().replace('\n', ' ') + '.' for x in re.split(r'(?<=[a-z])\.\s+', corpus[-1]['text'])]
    sentences = [x for x in sentences if 40 <= len(x) <= 100 and '"' not in x]
    leaked = [sentences[i] for i in sorted(np.random.default_rng(1).choice(len(sentences), 40, replace=False))]
    cfg = ModelConfig.preset('tiny', vocab_size=tk.vocab_size, context_length=64)
    tcfg = TrainConfig.preset('tiny', batch_size=8, max_steps=300, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_interval=1000,
                              checkpoint_interval=1000, log_interval=100)
    models = {}
    for name, texts in [('clean', docs), ('dirty', docs + [''.join(t + '\n' for t in leaked)] * 60)]:
        prepare_tokens(datasets.Dataset.from_dict({'text': texts}), tk, tmp_path / name / 'tokens', val_fraction=0.05)
        models[name] = train(tmp_path / name, cfg, tcfg)
    assert contamination_test(models['dirty'], tk, leaked, n_permutations=99)['p_value'] < 0.05
    assert contamination_test(models['clean'], tk, leaked, n_permutations=99)['p_value'] >= 0.05
