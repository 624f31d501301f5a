"""Tests for minillm.dpo: the DPO/IPO loss by hand and against TRL's DPOTrainer on the same log-probs, and a tiny DPO run."""
import copy, math, tempfile

import pytest
import torch

from minillm.sft import IGNORE
from minillm.dpo import DPOConfig, dpo_loss, dpo_train, evaluate_dpo, precompute_reference, sequence_logps


def one(v): return torch.tensor([float(v)])


def test_dpo_loss_hand_example():
    loss, rc, rr = dpo_loss(one(-10), one(-12), one(-11), one(-11), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    # IPO: h = 1/2 - (-1)/4 = 0.75, target 1/(2 beta) = 5
    assert dpo_loss(one(-10), one(-12), one(-11), one(-11), 0.1, 'ipo', one(2), one(4))[0].item() == pytest.approx(18.0625)


def test_dpo_loss_is_log2_at_the_reference_and_gradients_point_the_right_way():
    pc, pr = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()          # descent raises chosen and lowers rejected log-probs


def test_dpo_loss_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match='beta must be positive'): dpo_loss(x, x, x, x, beta=0)
    with pytest.raises(ValueError, match='Unknown loss_type'): dpo_loss(x, x, x, x, loss_type='hinge2')
    with pytest.raises(ValueError, match='token counts'): dpo_loss(x, x, x, x, loss_type='ipo')
    with pytest.raises(ValueError, match='Unknown DPOConfig field'): DPOConfig.preset('tiny', betta=0.1)


def test_sequence_logps_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    y = torch.tensor([[IGNORE, 4, 1]])
    lp, n = sequence_logps(logits, y)
    ref = logits[0, 1].log_softmax(-1)[4] + logits[0, 2].log_softmax(-1)[1]
    assert lp.item() == pytest.approx(ref.item(), abs=1e-6) and n.item() == 2


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo'])
def test_matches_trl_dpo_loss_on_the_same_log_probs(loss_type, tmp_path):
    trl = pytest.importorskip('trl')
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTok, models as hfm
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    torch.manual_seed(0)
    V = 32
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, max_position_embeddings=64)).eval()
    tok = PreTrainedTokenizerFast(tokenizer_object=HFTok(hfm.WordLevel({f't{i}': i for i in range(V)}, unk_token='t0')), pad_token='t0', eos_token='t1')
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tok,
                             train_dataset=Dataset.from_dict({'prompt': ['t2 t3'], 'chosen': ['t4'], 'rejected': ['t5']}))
    trainer.precompute_ref_logps = True                        # take the reference log-probs from the batch, as precomputed ones
    g = torch.Generator().manual_seed(1)
    examples = [{'prompt_ids': torch.randint(2, V, (n,), generator=g).tolist(), 'chosen_ids': torch.randint(2, V, (c,), generator=g).tolist(),
                 'rejected_ids': torch.randint(2, V, (r,), generator=g).tolist(), 'ref_chosen_logps': -5.0 * c, 'ref_rejected_logps': -4.0 * r}
                for n, c, r in [(3, 4, 2), (5, 1, 6), (2, 3, 3)]]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    trainer.model.train()
    with torch.no_grad(): trl_loss = trainer.compute_loss(trainer.model, batch).item()
    ids, cm = batch['input_ids'], batch['completion_mask']
    with torch.no_grad(): logits = model(input_ids=ids, attention_mask=batch['attention_mask']).logits
    y = torch.where(cm[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))   # next-token labels on completion tokens
    lp, n = sequence_logps(logits[:, :-1], y)
    B = len(examples)
    ours = dpo_loss(lp[:B], lp[B:], batch['ref_chosen_logps'], batch['ref_rejected_logps'], 0.3, loss_type, n[:B], n[B:])[0].item()
    assert ours == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)


def _toy_pairs(V=40, n=24, seed=0):
    "Pairs whose chosen answer always ends in token 7 and rejected in token 9, after a shared prompt."
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(10, V, (5,), generator=g).tolist()
        c, r = torch.randint(10, V, (3,), generator=g).tolist() + [7], torch.randint(10, V, (3,), generator=g).tolist() + [9]
        pairs.append({'chosen': {'ids': prompt + c, 'labels': [IGNORE] * 5 + c}, 'rejected': {'ids': prompt + r, 'labels': [IGNORE] * 5 + r}})
    return pairs


def test_tiny_dpo_run_learns_the_preference():
    from minillm.model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset('tiny', vocab_size=40, context_length=16))
    train, held = precompute_reference(model, _toy_pairs()), precompute_reference(model, _toy_pairs(seed=1))
    cfg = DPOConfig.preset('tiny', steps=30, lr=3e-3, eval_every=10)
    start = evaluate_dpo(model, held, cfg)
    assert start['accuracy'] == pytest.approx(0.5) and start['loss'] == pytest.approx(math.log(2), abs=1e-5)
    hist = dpo_train(model, train, cfg, held)
    assert hist[-1]['val_accuracy'] > 0.9 and hist[-1]['val_margin'] > 0.1
    with pytest.raises(ValueError, match='precompute_reference'): dpo_train(model, _toy_pairs(), cfg)
