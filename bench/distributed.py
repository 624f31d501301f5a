"""GPU benchmark for chapter 10: mixed precision and model FLOPs utilisation, end to end, on one GPU.

    PYTHONPATH=. python bench/distributed.py [--quick] [--presets gpt2-small gpt2-medium] [--out DIR]

Needs a CUDA GPU; runs from the working tree without installing minillm. Writes `distributed_<gpu>.json` to --out,
else to $OUT if set, else to bench/results/. Sections:

1. `precision`: one training step of gpt2-small (batch 8 x 1024) in fp32, fp32 with TF32 matmuls, bf16 autocast,
   and fp16 autocast with a GradScaler: step time, tokens/s and peak memory.
2. `mfu`: for each preset, bf16 autocast, kernels 'torch' and 'triton' (when the model supports
   `ModelConfig(kernels='triton')`), eager and `torch.compile`: tokens/s, peak memory and MFU against the data-sheet
   bf16 peak (`minillm.distributed.PEAK_FLOPS`) and against the measured bf16 matmul rate of this GPU.

Multi-GPU runs use the module itself: `torchrun --nproc_per_node 8 -m minillm.distributed --strategy fsdp ...`.
"""
import argparse, gc, json, os, platform, sys, time, traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = {'tiny': 32, 'cpu': 32, 'gpt2-small': 16, 'gpt2-medium': 8, 'gpt2-large': 4, 'llama3-1b': 4}


def log(*a): print(*a, flush=True)


def free():
    gc.collect(); torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--presets', nargs='+', default=['gpt2-small', 'gpt2-medium'])
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--quick', action='store_true', help='gpt2-small only, 3 steps')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile runs')
    p.add_argument('--out', default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): sys.exit('bench/distributed.py needs a CUDA GPU (none found): run it on a GPU machine.')
    from minillm import distributed as D
    from minillm import model as M
    from minillm.kernels import measure_matmul_flops
    presets, steps = (['gpt2-small'], 3) if a.quick else (a.presets, a.steps)
    name = torch.cuda.get_device_name()
    res = dict(device=name, torch=torch.__version__, python=platform.python_version(), date=time.strftime('%Y-%m-%d %H:%M:%S'),
               peak_flops_datasheet=D.peak_flops('cuda'),
               peak_flops_measured=measure_matmul_flops('cuda', torch.bfloat16, n=8192, repeats=10),
               kernels_supported=list(M.KERNELS), precision=[], mfu=[])
    log(f"{name}: data-sheet bf16 peak {res['peak_flops_datasheet']}, measured bf16 matmul {res['peak_flops_measured'] / 1e12:.0f} TFLOP/s")
    t0 = time.time()

    # 1. precision: fp32, tf32, bf16 autocast, fp16 autocast + loss scaling
    cfg = M.ModelConfig.preset('gpt2-small')
    for label, amp, tf32 in (('fp32', None, False), ('tf32', None, True), ('bf16 autocast', torch.bfloat16, True),
                             ('fp16 autocast + GradScaler', torch.float16, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        rec = dict(mode=label, preset='gpt2-small', batch=8, context=1024)
        try:
            model = M.Transformer(cfg).cuda()
            r = D.measure_throughput(model, 8, 1024, steps=steps, amp=amp)
            rec.update(r, peak_memory_gib=r['peak_memory_bytes'] / 2**30,
                       mfu_datasheet=D.mfu(r['tokens_per_second'], M.flops_per_token(cfg, 1024), res['peak_flops_datasheet'] or float('nan')))
        except Exception as e: rec['error'] = repr(e)[:500]
        res['precision'].append(rec); log('precision', rec)
        model = None; free()
    torch.backends.cuda.matmul.allow_tf32 = True

    # 2. MFU: presets x kernels x compile, bf16 autocast
    for preset in presets:
        for kernels in ('torch', 'triton'):
            for compile in ((False,) if a.no_compile else (False, True)):
                cfg = M.ModelConfig.preset(preset)
                B, T = BATCH.get(preset, 4), cfg.context_length
                rec = dict(preset=preset, kernels=kernels, compile=compile, batch=B, context=T, amp='bf16')
                if kernels not in M.KERNELS:
                    rec['error'] = f"this minillm.model does not support kernels={kernels!r}"; res['mfu'].append(rec); log('mfu', rec); continue
                try:
                    torch.manual_seed(0)
                    model = M.Transformer(M.ModelConfig.preset(preset, kernels=kernels)).cuda()
                    r = D.measure_throughput(model, B, T, steps=steps, amp=torch.bfloat16, compile=compile)
                    fpt = M.flops_per_token(cfg, T)
                    rec.update(r, flops_per_token=fpt, peak_memory_gib=r['peak_memory_bytes'] / 2**30,
                               mfu=D.mfu(r['tokens_per_second'], fpt, res['peak_flops_datasheet']) if res['peak_flops_datasheet'] else None,
                               mfu_vs_measured_matmul=D.mfu(r['tokens_per_second'], fpt, res['peak_flops_measured']))
                except Exception: rec['error'] = traceback.format_exc()[-1500:]
                res['mfu'].append(rec); log('mfu', {k: v for k, v in rec.items() if k != 'error'}, rec.get('error', '')[-300:])
                model = None; free()
                torch._dynamo.reset()
    res['seconds'] = time.time() - t0
    out_dir = Path(a.out or os.environ.get('OUT') or ROOT / 'bench' / 'results')
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = ''.join(c if c.isalnum() else '_' for c in name.lower()).strip('_')
    path = out_dir / f'distributed_{slug}.json'
    path.write_text(json.dumps(res, indent=2) + '\n')
    log(f'wrote {path} in {res["seconds"]:.0f} s')


if __name__ == '__main__':
    main()
