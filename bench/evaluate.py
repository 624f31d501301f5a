"""Evaluation harness on CPU: throughput (examples/s) with the CPU-default model, scores per task next to chance, and the
contamination test's p-values for two small models (one trained on a leaked test set in its canonical order, one clean).

Throughput is compared side by side, in one run, for three ways of computing the same log-likelihoods:
  naive     one forward pass per (context, continuation) request, no batching (the reference implementation);
  rows      minillm's batched rows, requests with the same model input sharing a row (share_context=False);
  shared    rows plus the KV cache reading each shared context once for multi-token continuations (the default).
All three give the same numbers (checked here too); the ratios are what the benchmark reports.

The model is the CPU-default one (ModelConfig.preset('cpu'), TrainConfig.preset('cpu')). With --run DIR a trained run
directory (tokenizer.json + checkpoints/) is used; otherwise one is trained here on the embedded novels for --steps steps
(briefly: its scores are near chance either way) and cached under runs/bench-evaluate/ (git-ignored).

    python bench/evaluate.py [--run DIR] [--limit 200] [--steps 200] [--contamination-copies 40]   ->  bench/results/evaluate.json
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minillm
from minillm.core import SHARED_DATA, RunDir, load_corpus, seed_everything
from minillm.evaluate import (QUICK_TASKS, contamination_test, encode_request, evaluate_task, example_text, load_task,
                              loglikelihoods, model_context_length, score_text, load_wikitext)
from minillm.model import ModelConfig
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / 'results'
RUNS = ROOT.parent / 'runs'                  # git-ignored: the briefly trained models live here between runs


def machine() -> dict:
    return dict(cores=os.cpu_count(), platform=platform.platform(), torch_threads=torch.get_num_threads(),
                load_average=list(os.getloadavg()))


def cpu_default_model(run_dir: Path | None, steps: int, batch_size: int):
    "The CPU-default model and its tokenizer: from a trained run, or trained here briefly (cached)."
    from minillm.data import prepare_tokens
    from minillm.train import TrainConfig, load_model, train
    if run_dir is not None:
        return load_model(run_dir), Tokenizer.load(Path(run_dir) / 'tokenizer.json'), f'trained run {run_dir}'
    run = RunDir(RUNS / 'bench-evaluate')
    corpus = load_corpus()
    if run.file('tokenizer.json').exists(): tok = Tokenizer.load(run.file('tokenizer.json'))
    else:
        tok = Tokenizer.train(corpus['text'], vocab_size=8192, show_progress=False)
        tok.save(run.file('tokenizer.json'))
    prepare_tokens(corpus, tok, run.file('tokens'))
    cfg = ModelConfig.preset('cpu', vocab_size=tok.vocab_size)
    model = train(run, cfg, TrainConfig.preset('cpu', batch_size=batch_size, max_steps=steps, warmup_steps=min(50, steps // 5),
                                                 eval_interval=max(steps // 2, 1), checkpoint_interval=max(steps // 4, 1)))
    val = [r['val_loss'] for r in run.read_metrics() if 'val_loss' in r]
    return model.eval(), tok, (f"CPU-default model (ModelConfig.preset('cpu')) trained here briefly: {steps} steps of batch {batch_size} x 256 "
                               f"tokens on the embedded novels, final validation loss {val[-1]:.3f}" if val else 'trained briefly')


def naive_loglikelihoods(model, tok, requests, T):
    "The reference: one request, one forward pass, no batching or sharing (each context cut once so its longest continuation fits)."
    encoded = [encode_request(tok, c, k) for c, k in requests]
    longest = {}
    for ctx, cont in encoded: longest[tuple(ctx)] = max(longest.get(tuple(ctx), 0), len(cont))
    out = []
    for ctx, cont in encoded:
        ids = ctx[max(0, len(ctx) - (T + 1 - longest[tuple(ctx)])):] + cont
        with torch.inference_mode(): lp = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
        pos = torch.arange(len(ids) - 1 - len(cont), len(ids) - 1)
        out.append(lp[pos, cont].double().sum().item())
    return out


def throughput(model, tok, name, limit, **kw) -> dict:
    "Examples/s for the three implementations on one task (all methods of the task), and their agreement."
    task = load_task(name, limit=limit, **kw)
    methods = task.methods
    requests = []
    for ex in task.examples:
        if any(m in methods for m in ('acc', 'acc_norm')) or task.kind == 'greedy': requests += list(zip(ex.contexts, ex.continuations))
        if 'letter' in methods: requests += [(ex.letter_prompt, f' {L}') for L in 'ABCDEFGH'[:ex.n_choices]]
    T = model_context_length(model)
    requests = [(c, k) for c, k in requests if len(encode_request(tok, c, k)[1]) <= T]   # the naive reference needs one window
    out = {'task': name, 'n_examples': len(task), 'n_requests': len(requests), 'options': kw}
    results = {}
    for impl in ('naive', 'rows', 'shared'):
        t = time.perf_counter()
        if impl == 'naive': lps = naive_loglikelihoods(model, tok, requests, T)
        else: lps = [ll.logprob for ll in loglikelihoods(model, tok, requests, batch_size=16, share_context=impl == 'shared')]
        seconds = time.perf_counter() - t
        results[impl] = np.array(lps)
        out[impl] = {'seconds': round(seconds, 2), 'examples_per_s': round(len(task) / seconds, 2), 'requests_per_s': round(len(requests) / seconds, 1)}
    out['max_abs_diff_vs_naive'] = float(max(np.abs(results[i] - results['naive']).max() for i in ('rows', 'shared')))
    out['speedup_rows_vs_naive'] = round(out['naive']['seconds'] / out['rows']['seconds'], 2)
    out['speedup_shared_vs_naive'] = round(out['naive']['seconds'] / out['shared']['seconds'], 2)
    print(f"{name:10s} {len(task)} examples: naive {out['naive']['examples_per_s']}/s, rows {out['rows']['examples_per_s']}/s, "
          f"shared {out['shared']['examples_per_s']}/s (max |diff| {out['max_abs_diff_vs_naive']:.1e})", flush=True)
    return out


def contamination(copies: int, n_leak: int, steps: int, n_perm: int) -> dict:
    "Train a clean and a contaminated small model; p-values of the permutation test on the leaked COPA examples."
    import datasets
    from minillm.data import prepare_tokens
    from minillm.train import TrainConfig, train
    docs = load_corpus().select(range(12))['text']
    tok = Tokenizer.train(docs, vocab_size=1024, show_progress=False)
    leaked = [example_text(e) for e in load_task('copa').examples][:n_leak]
    leak_doc = ''.join(t + '\n' for t in leaked)
    cfg = ModelConfig.preset('tiny', vocab_size=tok.vocab_size, context_length=128, d_model=128, n_layers=2)
    tcfg = TrainConfig.preset('tiny', batch_size=16, max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_interval=steps,
                              eval_steps=4, checkpoint_interval=steps, log_interval=50)
    out = dict(test_set='COPA, first %d examples (premise + right answer)' % n_leak, leaked_tokens=len(tok.encode(leak_doc)),
               copies=copies, steps=steps, model=cfg.to_dict(), n_permutations=n_perm)
    for name, texts in (('clean', list(docs)), ('contaminated', list(docs) + [leak_doc] * copies)):
        root = RUNS / 'bench-evaluate-contamination' / name
        prepare_tokens(datasets.Dataset.from_dict({'text': texts}), tok, root / 'tokens', val_fraction=0.05, seed=0)
        model = train(root, cfg, tcfg)
        t = contamination_test(model, tok, leaked, n_permutations=n_perm, seed=0)
        out[name] = {k: t[k] for k in ('p_value', 'canonical', 'shuffled_mean', 'shuffled_std', 'z')}
        print(f"contamination {name}: p = {t['p_value']:.4f}, z = {t['z']:.1f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run', type=Path, default=None, help='a trained run directory (default: train the CPU-default model briefly)')
    ap.add_argument('--steps', type=int, default=200, help='training steps when no --run is given')
    ap.add_argument('--batch-size', type=int, default=8, help='training batch size when no --run is given')
    ap.add_argument('--limit', type=int, default=200, help='examples per task for the scores')
    ap.add_argument('--speed-limit', type=int, default=100, help='examples per task for the throughput comparison')
    ap.add_argument('--contamination-copies', type=int, default=40)
    ap.add_argument('--contamination-steps', type=int, default=600)
    ap.add_argument('--permutations', type=int, default=199)
    ap.add_argument('--skip-contamination', action='store_true')
    args = ap.parse_args()
    if SHARED_DATA is None: sys.exit('bench/evaluate.py needs the shared data folder (../shared/data) for the real benchmarks.')
    torch.manual_seed(0)
    RESULTS.mkdir(exist_ok=True)
    record = dict(benchmark='evaluate', date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  machine_start=machine(), versions=dict(minillm=minillm.__version__, torch=torch.__version__))
    t0 = time.perf_counter()
    model, tok, how = cpu_default_model(args.run, args.steps, args.batch_size)
    record['model'] = dict(how=how, params=model.num_params(), config=model.cfg.to_dict(), train_seconds=round(time.perf_counter() - t0, 1))
    print(record['model']['how'], f"{model.num_params() / 1e6:.1f} M parameters", flush=True)

    record['throughput'] = [throughput(model, tok, 'hellaswag', args.speed_limit), throughput(model, tok, 'mmlu', args.speed_limit, k=5),
                            throughput(model, tok, 'arc_easy', args.speed_limit), throughput(model, tok, 'blimp', args.speed_limit)]

    scores = {}
    for name in [t for t in QUICK_TASKS if t != 'wikitext2'] + ['arc_challenge', 'openbookqa', 'wsc']:
        r = evaluate_task(model, tok, name, limit=args.limit, batch_size=16)
        scores[name] = {k: r[k] for k in ('n', 'scores', 'stderr', 'chance', 'examples_per_s')}
        if 'ppl' in r: scores[name]['target_word_ppl'] = r['ppl']
        print(f"{name:13s} n={r['n']:4d} " + '  '.join(f"{m} {100 * v:5.1f}% ± {100 * r['stderr'][m]:.1f} (chance {100 * r['chance'][m]:.1f}%)"
                                                for m, v in r['scores'].items()) + f"  [{r['examples_per_s']:.1f} ex/s]", flush=True)
    t = time.perf_counter()
    wiki = score_text(model, tok, load_wikitext('test')[:4], stride=model_context_length(model) // 2)
    scores['wikitext2 (4 test articles)'] = dict(wiki.as_dict(), uniform_ppl=model.cfg.vocab_size, seconds=round(time.perf_counter() - t, 1),
                                                 tokens_per_s=round(wiki.n_tokens / (time.perf_counter() - t), 1))
    print(f'wikitext2: ppl {wiki.ppl:.1f} (uniform {model.cfg.vocab_size}), bits/byte {wiki.bits_per_byte:.3f}', flush=True)
    record['scores'] = scores

    protocols = {'5-shot, header (original)': dict(k=5), '0-shot, header': dict(k=0), '0-shot, no header': dict(k=0, header=False)}
    record['mmlu_protocols'] = {}
    for name, kw in protocols.items():
        r = evaluate_task(model, tok, 'mmlu', limit=args.limit, details=True, **kw)
        picks = {L: r['predictions']['letter'].count(i) for i, L in enumerate('ABCD')}
        record['mmlu_protocols'][name] = {'scores': r['scores'], 'stderr': r['stderr'], 'letter_picks': picks}
        print(f'MMLU {name:26s} ' + '  '.join(f'{m} {100 * v:5.1f}%' for m, v in r['scores'].items()) + f'  letters picked {picks}', flush=True)
    record['mmlu_protocols']['right_answers'] = {L: r['gold'].count(i) for i, L in enumerate('ABCD')}
    record['scores_note'] = (f'{args.limit} seeded random examples per task (all of COPA: 100). A small model trained briefly on novels: '
                             'expect chance level on knowledge and reasoning tasks; stderr is the binomial standard error.')

    if not args.skip_contamination:
        record['contamination'] = contamination(args.contamination_copies, 60, args.contamination_steps, args.permutations)
    record['machine_end'] = machine()
    record['seconds'] = round(time.perf_counter() - t0, 1)
    (RESULTS / 'evaluate.json').write_text(json.dumps(record, indent=2) + '\n')
    print(f"wrote {RESULTS / 'evaluate.json'} in {record['seconds']:.0f} s")


if __name__ == '__main__':
    main()
