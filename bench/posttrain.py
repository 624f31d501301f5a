"""Post-training throughput on CPU: minillm's SFT and DPO loops beside TRL's SFTTrainer and DPOTrainer, same model, same data, one run.

The model is exported with `save_hf_llama` and loaded by `transformers.LlamaForCausalLM` for TRL, so both sides train the same weights
on the same token ids (the embedded instruction and preference sets, encoded with the chat template), with the same batch size,
fp32, no packing, AdamW. Throughput is real (non-padding) tokens per second over the optimizer steps after the first (warm-up);
for DPO, chosen + rejected tokens, with reference log-probabilities computed once beforehand on both sides (not timed).
Measurements alternate between the two libraries round by round (the machine may be shared) and medians are reported.

    python bench/posttrain.py [--model tiny|cpu] [--steps 8] [--batch 8] [--rounds 2]   ->  bench/results/posttrain.json
"""
from __future__ import annotations
import argparse, copy, json, os, platform, statistics, sys, tempfile, time, warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from minillm.model import ModelConfig, Transformer, save_hf_llama
from minillm.sft import IGNORE, SFTConfig, add_chat_tokens, demo_run, load_instructions, make_examples, sft_train
from minillm.dpo import DPOConfig, dpo_train, precompute_reference
from minillm.reward import encode_pair, load_preferences
from minillm.tokenizer import Tokenizer

OUT = Path(__file__).resolve().parent / 'results' / 'posttrain.json'


def setup(model_preset: str):
    "A chat tokenizer (from the tiny demo run), a randomly initialised model of `model_preset` shape, and its HF Llama export."
    run = demo_run('tiny')
    tok, _ = add_chat_tokens(Tokenizer.load(run.file('tokenizer.json')))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(model_preset, vocab_size=tok.vocab_size, context_length=256))
    folder = Path(tempfile.mkdtemp()) / 'hf'
    save_hf_llama(model, folder)
    tok.to_hf(folder / 'tokenizer.json')
    return tok, model, folder


def hf_model_and_tokenizer(folder: Path):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation='sdpa')
    htok = PreTrainedTokenizerFast(tokenizer_file=str(folder / 'tokenizer.json'), eos_token='<|end|>', pad_token='<|endoftext|>')
    return hf, htok


class StepTimer:
    "A transformers TrainerCallback recording the time at the end of each optimizer step."
    def __init__(self): self.times = []
    def __getattr__(self, name):
        if name.startswith('on_'): return lambda *a, **k: None
        raise AttributeError(name)
    def on_step_end(self, args, state, control, **kwargs): self.times.append(time.perf_counter())


def ours_sft(model, examples, batch, steps):
    m = copy.deepcopy(model)
    h = sft_train(m, examples, SFTConfig(steps=steps, batch_size=batch, lr=1e-4, warmup_steps=1, seed=0))
    return (h[-1]['tokens'] - h[0]['tokens']) / (h[-1]['seconds'] - h[0]['seconds'])


def trl_sft(folder, examples, batch, steps):
    from datasets import Dataset
    from trl import SFTConfig as TSFTConfig, SFTTrainer
    hf, htok = hf_model_and_tokenizer(folder)
    data = examples[:batch * steps]
    ds = Dataset.from_dict({'input_ids': [e['ids'] for e in data], 'completion_mask': [[int(l != IGNORE) for l in e['labels']] for e in data]})
    args = TSFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, report_to=[], use_cpu=True,
                      bf16=False, save_strategy='no', logging_strategy='no', completion_only_loss=True, packing=False, max_length=None,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0)
    timer = StepTimer()
    trainer = SFTTrainer(model=hf, args=args, train_dataset=ds, processing_class=htok, callbacks=[timer])
    order = [len(e['ids']) for e in data]
    trainer.train()
    tokens_per_step = sum(order) / steps                                          # one epoch of exactly steps x batch examples
    return tokens_per_step * (len(timer.times) - 1) / (timer.times[-1] - timer.times[0])


def ours_dpo(model, pairs, batch, steps):
    m = copy.deepcopy(model)
    precompute_reference(m, pairs)
    h = dpo_train(m, pairs, DPOConfig(steps=steps, batch_size=batch, lr=1e-5, warmup_steps=1, eval_every=10 ** 9))
    return (h[-1]['tokens'] - h[0]['tokens']) / (h[-1]['seconds'] - h[0]['seconds'])


def trl_dpo(folder, pairs, batch, steps):
    from datasets import Dataset
    from trl import DPOConfig as TDPOConfig, DPOTrainer
    hf, htok = hf_model_and_tokenizer(folder)
    from minillm.sft import render
    data = pairs[:batch * steps]
    rows = {'prompt': [render(p['prompt'], 'chat', add_generation_prompt=True) for p in data],
            'chosen': [p['chosen_text'] + '<|end|>' for p in data], 'rejected': [p['rejected_text'] + '<|end|>' for p in data]}
    args = TDPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5, report_to=[], use_cpu=True,
                      bf16=False, save_strategy='no', logging_strategy='no', precompute_ref_log_probs=True, max_length=None,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0, beta=0.1)
    timer = StepTimer()
    trainer = DPOTrainer(model=hf, args=args, train_dataset=Dataset.from_dict(rows), processing_class=htok, callbacks=[timer])
    ds = trainer.train_dataset
    tokens_per_step = sum(2 * len(a) + len(b) + len(c) for a, b, c in zip(ds['prompt_ids'], ds['chosen_ids'], ds['rejected_ids'])) / steps
    trainer.train()
    return tokens_per_step * (len(timer.times) - 1) / (timer.times[-1] - timer.times[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--model', default='cpu', choices=['tiny', 'cpu']); ap.add_argument('--steps', type=int, default=8)
    ap.add_argument('--batch', type=int, default=8); ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--out', default=str(OUT))
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    tok, model, folder = setup(a.model)
    ctx = model.cfg.context_length
    examples = make_examples(tok, load_instructions(), 'chat', ctx)
    pairs = []
    for p in load_preferences():
        if len(p['prompt']) != 1: continue                                     # single-turn prompts: the same text on both sides
        e = encode_pair(tok, p, 'chat', ctx)
        if e: pairs.append({**e, 'prompt': p['prompt'], 'chosen_text': p['chosen'], 'rejected_text': p['rejected']})
    need = a.batch * a.steps
    examples, pairs = examples[:need], pairs[:need]
    res = {k: [] for k in ('minillm_sft', 'trl_sft', 'minillm_dpo', 'trl_dpo')}
    for r in range(a.rounds):
        res['minillm_sft'].append(ours_sft(model, examples, a.batch, a.steps)); res['trl_sft'].append(trl_sft(folder, examples, a.batch, a.steps))
        res['minillm_dpo'].append(ours_dpo(model, [{'chosen': p['chosen'], 'rejected': p['rejected']} for p in pairs], a.batch, a.steps)); res['trl_dpo'].append(trl_dpo(folder, pairs, a.batch, a.steps))
        print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:,.0f} tok/s' for k, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    import transformers, trl
    out = {'what': 'training throughput, real tokens/s (median over rounds), fp32 on CPU, same model and data',
           'model': {'preset': a.model, 'params': model.num_params(), 'vocab_size': model.cfg.vocab_size, 'context_length': ctx},
           'batch_size': a.batch, 'steps': a.steps, 'rounds': a.rounds, 'tokens_per_second': med, 'all_rounds': res,
           'ratio_sft_minillm_over_trl': med['minillm_sft'] / med['trl_sft'], 'ratio_dpo_minillm_over_trl': med['minillm_dpo'] / med['trl_dpo'],
           'versions': {'torch': torch.__version__, 'transformers': transformers.__version__, 'trl': trl.__version__, 'python': platform.python_version()},
           'threads': torch.get_num_threads(), 'machine': platform.machine()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + '\n')
    print(json.dumps({k: round(v) for k, v in med.items()}), f"SFT ratio {out['ratio_sft_minillm_over_trl']:.2f}, DPO ratio {out['ratio_dpo_minillm_over_trl']:.2f}")


if __name__ == '__main__': main()
