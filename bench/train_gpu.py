"""GPU training MFU of the GPT-2-small-sized preset (bf16 autocast, torch.compile), beside a nanoGPT-style peer.

MFU = tokens/s x model FLOPs/token / the GPU's dense bf16 peak (minillm.train.PEAK_BF16_FLOPS), for full optimizer steps
(`grad_accum` micro-batches of `batch` x 1024 tokens, gradient clipping, fused AdamW) on random tokens, after compilation.
It also runs minillm.train.train for a few steps on a throw-away run directory, to check the loop end to end on CUDA.
Needs only torch (and numpy, safetensors); run from the repository root:

    PYTHONPATH=. python bench/train_gpu.py [--batch 32] [--grad-accum 4] [--steps 10]
        -> $OUT/train_gpu.json when $OUT is set, else bench/results/train_gpu.json
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, sys, tempfile, time, traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from minillm.model import ModelConfig, Transformer, flops_per_token
from minillm.train import LanguageModelLoss, TrainConfig, forward_backward, make_optimizer, peak_flops
from train_cpu import PeerGPT


def time_training(model, fpt: float, batch: int, grad_accum: int, steps: int, warmup: int, vocab: int, T: int,
                  compile: bool = True) -> dict:
    "Tokens/s and MFU of full optimizer steps (bf16 autocast, fused AdamW, clipping) on random tokens."
    device = torch.device('cuda')
    optimizer = make_optimizer(model, TrainConfig.preset('gpu'), device)
    loss_fn = LanguageModelLoss(model, fused=not compile)                  # as `train` does: compiled, the compiler fuses the loss
    step_fn = torch.compile(loss_fn) if compile else loss_fn
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        batches = []
        for _ in range(grad_accum):
            x = torch.randint(0, vocab, (batch, T + 1), device=device, generator=gen)
            batches.append((x[:, :-1], x[:, 1:]))
        loss = forward_backward(step_fn, batches, torch.bfloat16)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    for _ in range(warmup): step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter(); loss = step(); loss.item(); times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tps = batch * grad_accum * T / dt
    peak = peak_flops(device)
    return dict(tokens_per_s=round(tps), step_s=round(dt, 4), warmup_s=round(warm_s, 1), flops_per_token=fpt,
                mfu=round(tps * fpt / peak, 4) if peak else None, loss=round(loss.item(), 3),
                max_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))


def check_train_loop(steps: int = 12) -> dict:
    "Run minillm.train.train for a few steps of the gpu preset on random token files; report what it logged."
    from minillm.core import RunDir
    from minillm.train import train, load_model
    cfg = ModelConfig.preset('gpt2-small')
    with tempfile.TemporaryDirectory() as d:
        run = RunDir(d)
        _write_random_tokens(run, cfg.vocab_size)
        tcfg = TrainConfig.preset('gpu', max_steps=steps, grad_accum=2, batch_size=16, warmup_steps=2,
                                  eval_interval=steps // 2, eval_steps=2, checkpoint_interval=steps, log_interval=2)
        t = time.perf_counter()
        model = train(run, cfg, tcfg)
        seconds = time.perf_counter() - t
        records = run.read_metrics(stage='train')
        reloaded = load_model(run, 'cuda')
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
        return dict(seconds=round(seconds, 1), records=records[-4:], reloaded_equal=same,
                    report=run.file('report.md').read_text()[-600:])


def _write_random_tokens(run, vocab: int, n_train: int = 2_000_000, n_val: int = 200_000):
    "Random token files in the layout minillm.data.prepare_tokens writes (train.bin, val.bin, meta.json)."
    import numpy as np
    rng = np.random.default_rng(0)
    folder = run.file('tokens'); folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    for split, n in (('train', n_train), ('val', n_val)):
        rng.integers(0, vocab, n, dtype=dtype).tofile(folder / f'{split}.bin')
    meta = dict(vocab_size=vocab, dtype=np.dtype(dtype).name, train=dict(documents=1, tokens=n_train), val=dict(documents=1, tokens=n_val))
    (folder / 'meta.json').write_text(json.dumps(meta))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=int, default=32, help='sequences per micro-batch')
    ap.add_argument('--grad-accum', type=int, default=4)
    ap.add_argument('--steps', type=int, default=10, help='timed optimizer steps')
    ap.add_argument('--warmup', type=int, default=4, help='untimed steps (compilation) first')
    ap.add_argument('--no-peer', action='store_true', help='skip the nanoGPT-style peer')
    ap.add_argument('--no-loop-check', action='store_true', help='skip the short train() run')
    args = ap.parse_args()
    if not torch.cuda.is_available(): sys.exit('train_gpu.py needs a CUDA GPU.')
    out_dir = Path(os.environ['OUT']) if os.environ.get('OUT') else Path(__file__).resolve().parent / 'results'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    cfg = ModelConfig.preset('gpt2-small')
    T, V = cfg.context_length, cfg.vocab_size
    result = dict(benchmark='GPU training MFU, gpt2-small preset, bf16 autocast + torch.compile, fused AdamW',
                  device=torch.cuda.get_device_name(), peak_bf16_flops=peak_flops('cuda'), torch=torch.__version__,
                  python=platform.python_version(), batch=args.batch, grad_accum=args.grad_accum, context_length=T,
                  model_config={k: getattr(cfg, k) for k in ('n_layers', 'd_model', 'n_heads', 'vocab_size', 'context_length')},
                  results={})

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'train_gpu.json').write_text(json.dumps(result, indent=2, default=str) + '\n')

    runs = [('minillm', lambda: Transformer(cfg), lambda m: flops_per_token(cfg, T))]
    if not args.no_peer:
        runs.append(('nanogpt_peer', lambda: PeerGPT(V, T, cfg.d_model, cfg.n_layers, cfg.n_heads),
                     lambda m: m.flops_per_token(T)))
    for name, build, fpt in runs:
        torch.manual_seed(0); torch.cuda.reset_peak_memory_stats()
        try:
            model = build().cuda()
            r = time_training(model, fpt(model), args.batch, args.grad_accum, args.steps, args.warmup, V, T)
        except Exception as e:
            r = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc()[-2000:])
        result['results'][name] = r
        print(name, json.dumps(r), flush=True)
        model = None; torch.cuda.empty_cache(); save()
    if 'mfu' in result['results'].get('nanogpt_peer', {}) and 'mfu' in result['results']['minillm']:
        result['mfu_ratio_minillm_over_peer'] = round(result['results']['minillm']['mfu'] / result['results']['nanogpt_peer']['mfu'], 3)
    result['target_mfu'] = 0.45
    result['meets_target'] = (result['results']['minillm'].get('mfu') or 0) >= 0.45
    save()
    if not args.no_loop_check:
        try: result['train_loop_check'] = check_train_loop()
        except Exception as e: result['train_loop_check'] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc()[-3000:])
        print('train loop check:', json.dumps(result['train_loop_check'], default=str)[:2000], flush=True)
    save()
    print(f"minillm MFU {result['results']['minillm'].get('mfu')}  ratio {result.get('mfu_ratio_minillm_over_peer')}  -> {out_dir / 'train_gpu.json'}")


if __name__ == '__main__':
    main()
