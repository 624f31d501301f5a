"""Tests for minillm.sft: data validation, templates, masking, packing, growing the vocabulary, sampling and a tiny SFT stage."""
import gzip, json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.core import RunDir
from minillm.model import ModelConfig, Transformer
from minillm.sft import (CHAT_TOKENS, IGNORE, SFTConfig, add_chat_tokens, chat_turn, curate, demo_run, encode_example, encode_prompt,
                         load_instructions, load_stage, masked_lm_loss, pack_examples, pad_batch, render, resize_token_embeddings,
                         run_sft, sample, template_segments)
from minillm.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def tok():
    return Tokenizer.train(['the cat sat on the mat. What is 2 + 3? It is 5.'] * 50, vocab_size=300, special_tokens=['<|endoftext|>'], show_progress=False)


def test_loaders_accept_the_common_formats_and_name_malformed_records(tmp_path):
    recs = load_instructions([{'instruction': 'Add.', 'input': '2 and 3', 'output': '5'},
                              {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]},
                              {'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Yo'}]},
                              {'prompt': 'Below is an instruction.\n\n### Instruction:\nName a fruit.\n\n### Response:\n', 'response': 'Apple.'},
                              {'instruction': 'x', 'output': 'y', 'status': 'blacklist'}])
    assert [r['messages'][0]['content'] for r in recs] == ['Add.\n\n2 and 3', 'Hi', 'Hi', 'Name a fruit.']
    f = tmp_path / 'data.jsonl.gz'
    with gzip.open(f, 'wt') as g: g.write(json.dumps({'instruction': 'a', 'output': 'b'}) + '\n{broken\n')
    with pytest.raises(ValueError, match=r'data.jsonl.gz line 2: not valid JSON'): load_instructions(f)
    assert len(load_instructions(f, on_error='skip')) == 1
    (tmp_path / 'bad.json').write_text(json.dumps([{'instruction': 'a', 'output': 'b'}, {'instruction': 'a', 'output': ['b']}]))
    with pytest.raises(ValueError, match=r"bad.json record 1: field 'output' must be a string, got list"): load_instructions(tmp_path / 'bad.json')
    with pytest.raises(FileNotFoundError): load_instructions(tmp_path / 'nope.jsonl')
    folder = tmp_path / 'sft'; folder.mkdir()
    (folder / 'b.json').write_text(json.dumps([{'instruction': 'second', 'output': 'y'}]))
    (folder / 'a.jsonl').write_text(json.dumps({'instruction': 'first', 'output': 'x'}) + '\n')
    assert [r['messages'][0]['content'] for r in load_instructions(folder)] == ['first', 'second']   # a folder's files, sorted
    assert len(load_instructions()) == 3088                                    # the embedded set loads


def test_chat_and_alpaca_templates():
    conv = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Q'}, {'role': 'assistant', 'content': 'A'}]
    assert render(conv) == '<|system|>\nBe brief.<|end|><|user|>\nQ<|end|><|assistant|>\nA<|end|>'
    assert [t for t, resp in template_segments(conv) if resp] == ['A<|end|>']
    assert render(conv, 'alpaca') == 'Be brief.\n\n### Instruction:\nQ\n\n### Response:\nA<|endoftext|>'
    with pytest.raises(ValueError, match='Unknown template'): render(conv, 'vicuna')


def test_growing_the_vocabulary_changes_nothing_else(tok):
    for tie in (True, False):
        torch.manual_seed(0)
        m = Transformer(ModelConfig.preset('tiny', vocab_size=tok.vocab_size, tie_embeddings=tie)).eval()
        x = torch.tensor([tok.encode('the cat sat')])
        with torch.no_grad(): before = m(x)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        chat_tok, m = add_chat_tokens(tok, m)
        assert chat_tok.vocab_size == tok.vocab_size + 4 and m.cfg.vocab_size == chat_tok.vocab_size
        assert chat_tok.encode('the cat sat') == tok.encode('the cat sat')
        for k, v in m.state_dict().items():
            if v.shape != sd[k].shape: assert k in ('tok_emb.weight', 'lm_head.weight') and torch.equal(v[:-4], sd[k])
            else: assert torch.equal(v, sd[k]), k
        with torch.no_grad(): after = m(x)
        torch.testing.assert_close(after[..., :tok.vocab_size], before)
        assert m(torch.tensor([[chat_tok.special_tokens['<|end|>']]])).shape[-1] == tok.vocab_size + 4
    with pytest.raises(ValueError, match='Cannot shrink'): resize_token_embeddings(m, 10)


def test_masking_padding_and_packing_keep_every_trained_token(tok):
    chat_tok, _ = add_chat_tokens(tok)
    exs = [encode_example(chat_tok, [{'role': 'user', 'content': 'What is 2 + 3?' * k}, {'role': 'assistant', 'content': 'It is 5.'}]) for k in (1, 2, 3, 1)]
    n_resp = len(chat_tok.encode('It is 5.<|end|>'))
    assert all(sum(l != IGNORE for l in e['labels']) == n_resp for e in exs)
    assert exs[0]['labels'][-1] == chat_tok.special_tokens['<|end|>']
    x, y = pad_batch(exs)
    xp, yp = pack_examples(exs, 64)
    assert (y != IGNORE).sum() == (yp != IGNORE).sum() == 4 * n_resp
    assert xp.shape[0] < x.shape[0] or xp.numel() <= x.numel()
    # masked loss = mean over labelled positions of -log p
    logits = torch.randn(*x.shape, chat_tok.vocab_size)
    lp = logits.log_softmax(-1)
    m = y != IGNORE
    ref = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[m].mean()
    torch.testing.assert_close(masked_lm_loss(logits, y), ref)
    with pytest.raises(ValueError, match='does not fit'): pack_examples(exs, 5)


def test_sample_is_deterministic_and_stops(tok):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset('tiny', vocab_size=tok.vocab_size)).eval()
    p = tok.encode('the cat')
    a = sample(m, p, 3, 10, temperature=0)
    assert a[0] == a[1] == a[2] and len(a[0]) == 10
    stop = a[0][3]
    b = sample(m, p, 1, 10, temperature=0, stop_id=stop)[0]
    assert b[-1] == stop and len(b) <= 4
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sample(m, p, 2, 8, 1.0, generator=g1) == sample(m, p, 2, 8, 1.0, generator=g2)


def test_curate_and_config_errors():
    recs = load_instructions()
    cur = curate(recs, 100)
    assert len(cur) == 100 and all(r['messages'][-1]['content'][-1] in '.!?"\')' for r in cur)
    with pytest.raises(ValueError, match='Unknown SFTConfig preset'): SFTConfig.preset('huge')
    with pytest.raises(ValueError, match='Unknown SFTConfig field'): SFTConfig.preset('tiny', stepz=3)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A tiny pretrained run directory (a few pretraining steps)."
    return demo_run('tiny', root=tmp_path_factory.mktemp('cache'), max_steps=6, warmup_steps=1, eval_interval=6, checkpoint_interval=6)


def test_sft_stage_writes_checkpoint_report_and_chats(tiny_run):
    run = tiny_run
    res = run_sft(run, steps=30, n_eval=6, max_new_tokens=8)
    assert res['after']['response_loss'] < res['before']['response_loss']     # fine-tuning lowers the held-out response loss
    assert (run.file('sft') / 'model.safetensors').exists() and 'Supervised fine-tuning' in run.file('report.md').read_text()
    assert run.read_metrics(stage='sft')
    model, tok, meta = load_stage(run, 'sft')
    assert '<|end|>' in tok.special_tokens and meta['results']['steps'] == 30
    reply = chat_turn(model, tok, [{'role': 'user', 'content': 'Name a colour.'}], max_new_tokens=8, seed=0)
    assert isinstance(reply, str)
    with pytest.raises(ValueError, match="must end with the user's message"): chat_turn(model, tok, [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}])
    assert run_sft(run) == res                                                  # a finished stage is reused
    with pytest.raises(FileNotFoundError, match='not a finished'): load_stage(RunDir(run.path / 'empty'), 'sft')
