"""Tests for minillm.reward: preference data validation, the Bradley-Terry loss, the reward model and the length baseline."""
import json, math

import pytest
import torch

from minillm.model import ModelConfig, Transformer
from minillm.reward import (RewardConfig, RewardModel, bradley_terry_loss, encode_pair, evaluate_rm, length_baseline,
                            load_preferences, normalize_preference, score, train_reward_model)
from minillm.sft import IGNORE, add_chat_tokens
from minillm.tokenizer import Tokenizer


def test_formats_and_errors(tmp_path):
    hh = {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me\n\nAssistant: Sure.', 'rejected': '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me\n\nAssistant: No.'}
    p = normalize_preference(hh, 'r')
    assert p['prompt'] == [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}, {'role': 'user', 'content': 'Help me'}]
    assert (p['chosen'], p['rejected']) == ('Sure.', 'No.')
    panda = {'instruction': 'Fix.', 'input': 'teh', 'response1': 'the', 'response2': 'teh', 'annotator1': 1, 'annotator2': 1, 'annotator3': 2}
    assert normalize_preference(panda)['chosen'] == 'the'
    assert normalize_preference({**panda, 'annotator1': 0, 'annotator2': 0}) is None                 # a tie teaches nothing
    with pytest.raises(ValueError, match='record 3: annotator labels'): normalize_preference({**panda, 'annotator1': 7}, 'record 3')
    with pytest.raises(ValueError, match='differ before the final answer'):
        normalize_preference({'chosen': hh['chosen'], 'rejected': '\n\nHuman: Other\n\nAssistant: No.'})
    f = tmp_path / 'p.jsonl'
    f.write_text(json.dumps({'prompt': 'Q', 'chosen': 'A', 'rejected': 'B'}) + '\n' + json.dumps({'prompt': 'Q', 'chosen': 'A', 'rejected': 3}) + '\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: field 'rejected' must be a string, got int"): load_preferences(f)
    assert len(load_preferences(f, on_error='skip')) == 1
    folder = tmp_path / 'prefs'; (folder / 'more').mkdir(parents=True)
    (folder / 'a.jsonl').write_text(json.dumps({'prompt': 'Q1', 'chosen': 'A', 'rejected': 'B'}) + '\n')
    (folder / 'more' / 'b.json').write_text(json.dumps([{'prompt': 'Q2', 'chosen': 'A', 'rejected': 'B'}]))
    (folder / 'notes.txt').write_text('not data')
    assert [p['prompt'][0]['content'] for p in load_preferences(folder)] == ['Q1', 'Q2']   # a folder: every data file in it
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='folder without'): load_preferences(tmp_path / 'empty')
    prefs = load_preferences()
    assert len(prefs) == 3139 and all(p['prompt'][-1]['role'] == 'user' for p in prefs)


def test_length_baseline_and_bt_loss():
    pairs = [{'chosen': 'long answer', 'rejected': 'short'}, {'chosen': 'a', 'rejected': 'bb'}, {'chosen': 'cc', 'rejected': 'dd'}]
    assert length_baseline(pairs) == pytest.approx((1 + 0 + 0.5) / 3)
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    r = torch.randn(5)
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))


def test_reward_model_reads_the_last_real_token_and_learns_a_rule():
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelConfig.preset('tiny', vocab_size=40, context_length=16)))
    h = rm.backbone.hidden_states(torch.tensor([[1, 2, 3]]))
    assert h.shape == (1, 3, 64)
    # right padding does not change a sequence's reward
    a = score(rm, [[1, 2, 3]]); b = score(rm, [[1, 2, 3], [4, 5, 6, 7, 8, 9]])
    torch.testing.assert_close(a, b[:1])
    # a learnable preference: answers ending in token 7 beat answers ending in token 9
    g = torch.Generator().manual_seed(0)
    def pairs(n):
        out = []
        for _ in range(n):
            pr = torch.randint(10, 40, (4,), generator=g).tolist()
            c, r = pr + torch.randint(10, 40, (2,), generator=g).tolist() + [7], pr + torch.randint(10, 40, (2,), generator=g).tolist() + [9]
            out.append({'chosen': {'ids': c}, 'rejected': {'ids': r}, 'source': 'toy', 'len_chosen': 3, 'len_rejected': 3})
        return out
    train_reward_model(rm, pairs(64), RewardConfig.preset('tiny', steps=40, lr=1e-3, head_lr=1e-2))
    ev = evaluate_rm(rm, pairs(32))
    assert ev['accuracy'] > 0.9 and ev['length_baseline'] == 0.5


def test_encode_pair_drops_early_turns_to_fit():
    tok, _ = add_chat_tokens(Tokenizer.train(['hello there, how are you? fine thanks.'] * 20, vocab_size=280, show_progress=False))
    pair = {'prompt': [{'role': 'user', 'content': 'hello there ' * 20}, {'role': 'assistant', 'content': 'fine'}, {'role': 'user', 'content': 'how are you?'}],
            'chosen': 'fine thanks.', 'rejected': 'hello.'}
    full = encode_pair(tok, pair)
    short = encode_pair(tok, pair, max_len=40)
    assert len(full['chosen']['ids']) > 40 >= len(short['chosen']['ids'])
    assert tok.decode(short['chosen']['ids']).startswith('<|user|>\nhow are you?')
    assert encode_pair(tok, pair, max_len=5) is None
    assert [l for l in short['chosen']['labels'] if l != IGNORE] == tok.encode('fine thanks.<|end|>')
