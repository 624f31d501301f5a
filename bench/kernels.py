"""GPU benchmark of minillm's Triton kernels against their peers, in one run on one GPU.

    PYTHONPATH=. python bench/kernels.py [--quick] [--out DIR]

Needs a CUDA GPU (tested against torch 2.11+ with triton 3.6+); runs from the working tree without installing minillm.
Writes `kernels_<gpu>.json` to --out, else to $OUT if set, else to bench/results/. Sections:

1. `checks`: bf16 (and fp16) correctness of every kernel, forward and gradients, against PyTorch in float32.
2. `bandwidth`: the HBM bandwidth of this GPU, measured now with a large device-to-device copy.
3. `memory_bound`: RMSNorm, softmax, SwiGLU, RoPE and x.cos().cos(), forward and forward+backward: PyTorch eager,
   `torch.compile`, minillm Triton and Liger-Kernel (if importable and it has the kernel), as time, achieved GB/s
   (the minimum bytes the operation must move / time) and the fraction of the measured bandwidth.
4. `attention`: minillm FlashAttention-2 against F.scaled_dot_product_attention with its flash and cuDNN back ends,
   causal, head dims 64 and 128, sequences 1k-8k, forward and backward TFLOP/s and the ratios.
5. `cross_entropy_memory`: peak GPU memory of loss + backward at vocabulary 50,257: eager (logits materialised),
   minillm cross_entropy on materialised logits, minillm fused linear + cross-entropy, Liger's fused version.
6. `targets`: the issue's targets, each with the measured value and pass/fail.

Liger-Kernel is optional. The GPU machine has no package index; to include Liger, download its pure-Python wheel
beside the repository first and install it there (see the project's device notes), e.g.
`pip download --no-deps liger-kernel==0.8.5 -d .whl` here, then on the GPU machine
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python bench/kernels.py`.
"""
import argparse, json, math, os, platform, sys, time, traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(*a): print(*a, flush=True)


def bench_ms(fn, warmup=10, rep=50):
    "Median milliseconds of fn() (triton.testing.do_bench: flushes L2 between calls)."
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode='median')


def measure_hbm_bandwidth(n_bytes=4 * 2**30):
    "Bytes read + written per second by a device-to-device copy of n_bytes."
    x = torch.empty(n_bytes // 2, device='cuda', dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), warmup=5, rep=30)
    return 2 * n_bytes / (ms / 1e3)


def liger():
    "A dict of Liger-Kernel callables with our signatures (absent entries: not installed or no such kernel)."
    out = {}
    try: import liger_kernel
    except ImportError: return out
    out['version'] = getattr(liger_kernel, '__version__', None)
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        out['rms_norm'] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
    except Exception as e: out['rms_norm_error'] = repr(e)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        out['swiglu'] = lambda a, b: LigerSiLUMulFunction.apply(a, b)
    except Exception as e: out['swiglu_error'] = repr(e)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        out['rope'] = lambda q, k, cos, sin: liger_rotary_pos_emb(q, k, cos[None], sin[None])
    except Exception as e: out['rope_error'] = repr(e)
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction
        out['softmax'] = lambda x: LigerSoftmaxFunction.apply(x)
    except Exception as e: out['softmax_error'] = repr(e)
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        ce = LigerCrossEntropyLoss()
        out['cross_entropy'] = lambda logits, t: ce(logits, t)
    except Exception as e: out['cross_entropy_error'] = repr(e)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss()
        out['linear_cross_entropy'] = lambda h, W, t: flce(W, h, t)
    except Exception as e: out['linear_cross_entropy_error'] = repr(e)
    return out


# ------------------------------------------------------------------ 1. correctness in bf16
def run_checks(K):
    "bf16/fp16 forward and gradient errors of each kernel against float32 PyTorch; returns a list of records."
    dev, out = 'cuda', []
    def check(name, fn, ref, inputs, tol):
        torch.manual_seed(0)
        a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        b = [t.detach().float().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        ya, yb = fn(*a), ref(*b)
        ya, yb = (ya,) if torch.is_tensor(ya) else ya, (yb,) if torch.is_tensor(yb) else yb
        err = max(((u.float() - v.float()).abs().max() / (v.float().abs().max() + 1e-6)).item() for u, v in zip(ya, yb))
        gs = [torch.randn_like(v) for v in yb]
        torch.autograd.backward(ya, [g.to(u.dtype) for g, u in zip(gs, ya)]); torch.autograd.backward(yb, gs)
        gerr = max(((u.grad.float() - v.grad).abs().max() / (v.grad.abs().max() + 1e-6)).item()
                   for u, v in zip(a, b) if u.grad is not None)
        rec = dict(kernel=name, dtype=str(inputs[0].dtype).removeprefix('torch.'), rel_err=err, grad_rel_err=gerr,
                   passed=bool(err < tol and gerr < tol))
        out.append(rec); log('check', rec)
    for dt in (torch.bfloat16, torch.float16):
        r = lambda *s, scale=1.0: (torch.randn(*s, device=dev) * scale).to(dt)
        tol = 3e-2 if dt == torch.bfloat16 else 5e-3
        w = (torch.rand(4096, device=dev) + 0.5).to(dt)
        check('rms_norm', lambda x, w: K.rms_norm(x, w, 1e-5), lambda x, w: K.rms_norm_ref(x, w, 1e-5), [r(512, 4096), w], tol)
        check('softmax', K.softmax, lambda x: torch.softmax(x, -1), [r(512, 4096, scale=3)], tol)
        check('swiglu', K.swiglu, K.swiglu_ref, [r(512, 4096), r(512, 4096)], tol)
        cos, sin = rope_tables(1024, 128)
        check('rope', lambda q, k: K.apply_rope(q, k, cos, sin), lambda q, k: K.apply_rope_ref(q, k, cos, sin),
              [r(2, 8, 1024, 128), r(2, 2, 1024, 128)], tol)
        t = torch.randint(0, 50257, (512,), device=dev); t[:7] = -100
        check('cross_entropy', lambda l: K.cross_entropy(l, t), lambda l: K.cross_entropy_ref(l, t), [r(512, 50257, scale=3)], tol)
        check('linear_cross_entropy', lambda h, W: K.linear_cross_entropy(h, W, t), lambda h, W: K.linear_cross_entropy_ref(h, W, t),
              [r(512, 768), r(50257, 768, scale=0.05)], tol)
        for D in (64, 128):
            for causal in (True, False):
                check(f'attention_d{D}_{"causal" if causal else "full"}', lambda q, k, v: K.attention(q, k, v, causal),
                      lambda q, k, v: K.attention_ref(q, k, v, causal), [r(2, 8, 1000, D), r(2, 4, 1000, D), r(2, 4, 1000, D)], tol)
    return out


def rope_tables(T, D, device='cuda'):
    inv = 10000.0 ** (-torch.arange(0, D, 2, device=device).float() / D)
    ang = torch.outer(torch.arange(T, device=device).float(), inv)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


# ------------------------------------------------------------------ 3. memory-bound kernels
def memory_bound(K, L, bw, quick):
    "Time and achieved bandwidth of each memory-bound kernel, every implementation, forward and forward+backward."
    dev, bf, out = 'cuda', torch.bfloat16, []
    rows = 4096 if quick else 16384

    def eager_rms(x, w, eps): return F.rms_norm(x, (x.shape[-1],), w, eps)
    def eager_rms_manual(x, w, eps):
        xf = x.float(); return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
    def eager_rope(q, k, cos, sin):
        return K.apply_rope_ref(q, k, cos, sin)
    def cos_cos(x): return x.cos().cos()

    D = 4096
    x, w = torch.randn(rows, D, device=dev, dtype=bf), torch.rand(D, device=dev, dtype=bf) + 0.5
    g, u = torch.randn(rows, 11008 if not quick else 4096, device=dev, dtype=bf), None
    u = torch.randn_like(g)
    B, H, T, hd = (4, 32, 2048, 128) if not quick else (2, 32, 1024, 128)
    q, k = torch.randn(B, H, T, hd, device=dev, dtype=bf), torch.randn(B, 8, T, hd, device=dev, dtype=bf)
    cos, sin = rope_tables(T, hd)
    xc = torch.randn(2**28 if not quick else 2**26, device=dev, dtype=torch.float32)
    n = lambda *ts: sum(t.numel() * t.element_size() for t in ts)

    cases = [  # name, shape, inputs, {impl: fn}, bytes forward, bytes backward (minimum traffic)
        ('rms_norm', f'{rows}x{D} bf16', (x, w, 1e-5),
         {'eager': eager_rms, 'eager_manual': eager_rms_manual, 'compile': torch.compile(eager_rms_manual),
          'minillm': K.rms_norm, 'liger': L.get('rms_norm')},
         2 * n(x), 3 * n(x)),                                          # fwd: x in, y out; bwd: x, dy in, dx out
        ('softmax', f'{rows}x{D} bf16', (x,),
         {'eager': lambda x: torch.softmax(x, -1), 'compile': torch.compile(lambda x: torch.softmax(x, -1)),
          'minillm': K.softmax, 'liger': L.get('softmax')},
         2 * n(x), 3 * n(x)),
        ('swiglu', f'{tuple(g.shape)} bf16', (g, u),
         {'eager': K.swiglu_ref, 'compile': torch.compile(K.swiglu_ref), 'minillm': K.swiglu, 'liger': L.get('swiglu')},
         3 * n(g), 5 * n(g)),                                          # fwd: g, u in, y out; bwd: dy, g, u in, dg, du out
        ('rope', f'q {tuple(q.shape)} k {tuple(k.shape)} bf16', (q, k, cos, sin),
         {'eager': eager_rope, 'compile': torch.compile(eager_rope), 'minillm': K.apply_rope, 'liger': L.get('rope')},
         2 * n(q, k), 2 * n(q, k)),
        ('cos_cos', f'{xc.numel()} fp32', (xc,),
         {'eager': cos_cos, 'compile': torch.compile(cos_cos), 'minillm': K.cos_cos}, 2 * n(xc), None),
    ]
    for name, shape, inputs, impls, bytes_fwd, bytes_bwd in cases:
        for impl, fn in impls.items():
            if fn is None: continue
            for mode in ('fwd', 'fwd+bwd'):
                if mode == 'fwd+bwd' and bytes_bwd is None: continue
                rec = dict(kernel=name, shape=shape, impl=impl if impl != 'minillm' else 'minillm_triton', mode=mode)
                try:
                    if mode == 'fwd':
                        with torch.no_grad(): ms = bench_ms(lambda: fn(*inputs))
                        nbytes = bytes_fwd
                    else:
                        leaves = [t.detach().requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0
                                  and t is not cos and t is not sin else t for t in inputs]
                        outs = fn(*leaves); outs = (outs,) if torch.is_tensor(outs) else tuple(outs)
                        grads = [torch.randn_like(o) for o in outs]
                        def step():
                            o = fn(*leaves); o = (o,) if torch.is_tensor(o) else tuple(o)
                            torch.autograd.backward(o, grads)
                            for t in leaves:
                                if torch.is_tensor(t): t.grad = None
                        ms = bench_ms(step)
                        nbytes = bytes_fwd + bytes_bwd
                    rec.update(ms=ms, gb_per_s=nbytes / (ms / 1e3) / 1e9, fraction_of_bandwidth=nbytes / (ms / 1e3) / bw)
                except Exception as e:
                    rec.update(error=repr(e)[:300])
                out.append(rec); log('memory_bound', rec)
    return out


# ------------------------------------------------------------------ 4. attention
def attention(K, quick):
    "FlashAttention-2 (minillm) against SDPA's flash and cuDNN back ends: causal, TFLOP/s forward and backward."
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev, bf, out = 'cuda', torch.bfloat16, []
    seqs = (1024, 4096) if quick else (1024, 2048, 4096, 8192)
    for D in (64, 128):
        H = 2048 // D                                                  # d_model 2048
        for T in seqs:
            B = max(1, 16384 // T)                                     # 16k tokens per batch
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            flops_fwd = 4 * B * H * T * T * D / 2                      # causal: half of the two matmuls
            flops_bwd = 2.5 * flops_fwd                                # five matmuls instead of two
            impls = {'minillm_triton': lambda q, k, v: K.attention(q, k, v, causal=True)}
            for name, backend in (('sdpa_flash', SDPBackend.FLASH_ATTENTION), ('sdpa_cudnn', SDPBackend.CUDNN_ATTENTION)):
                impls[name] = (lambda backend: lambda q, k, v: _sdpa(q, k, v, backend, sdpa_kernel))(backend)
            for name, fn in impls.items():
                rec = dict(impl=name, batch=B, heads=H, seq=T, head_dim=D, causal=True)
                try:
                    with torch.no_grad(): ms_f = bench_ms(lambda: fn(q, k, v))
                    o = fn(q, k, v)
                    ms_b = bench_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                    rec.update(fwd_ms=ms_f, bwd_ms=ms_b, fwd_tflops=flops_fwd / ms_f / 1e9, bwd_tflops=flops_bwd / ms_b / 1e9)
                except Exception as e:
                    rec.update(error=repr(e)[:300])
                out.append(rec); log('attention', rec)
    return out


def _sdpa(q, k, v, backend, sdpa_kernel):
    with sdpa_kernel(backend): return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ------------------------------------------------------------------ 5. cross-entropy peak memory
def ce_memory(K, L, quick):
    "Peak extra GPU memory of loss + backward at vocabulary 50,257 for each implementation."
    dev, bf, out = 'cuda', torch.bfloat16, []
    N, D, V = (4096 if quick else 16384), 2048, 50257
    h = torch.randn(N, D, device=dev, dtype=bf, requires_grad=True)
    W = (torch.randn(V, D, device=dev, dtype=bf) * 0.02).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=dev)
    impls = {
        'eager': lambda: F.cross_entropy((h @ W.T).float(), t),
        'minillm_cross_entropy': lambda: K.cross_entropy(h @ W.T, t),
        'minillm_linear_cross_entropy': lambda: K.linear_cross_entropy(h, W, t),
        'compile': torch.compile(lambda h, W, t: F.cross_entropy((h @ W.T).float(), t)),
    }
    if 'cross_entropy' in L: impls['liger_cross_entropy'] = lambda: L['cross_entropy'](h @ W.T, t)
    if 'linear_cross_entropy' in L: impls['liger_linear_cross_entropy'] = lambda: L['linear_cross_entropy'](h, W, t)
    for name, fn in impls.items():
        rec = dict(impl=name, tokens=N, d_model=D, vocab=V, dtype='bfloat16')
        try:
            call = (lambda: fn(h, W, t)) if name == 'compile' else fn
            call().backward(); h.grad = W.grad = None                   # warm-up (and compile)
            torch.cuda.synchronize(); torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
            loss = call(); loss.backward(); torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            h.grad = W.grad = None
            ms = bench_ms(lambda: (call().backward(), setattr(h, 'grad', None), setattr(W, 'grad', None)), warmup=3, rep=10)
            rec.update(peak_extra_bytes=peak, peak_extra_gib=peak / 2**30, loss=loss.item(), fwd_bwd_ms=ms)
        except Exception as e:
            rec.update(error=repr(e)[:300])
        out.append(rec); log('cross_entropy_memory', rec)
    return out


# ------------------------------------------------------------------ 6. targets
def targets(res):
    "The issue's targets, evaluated on this run."
    out = []
    mb = {(r['kernel'], r['impl'], r['mode']): r for r in res['memory_bound'] if 'ms' in r}
    for kern in ('rms_norm', 'softmax', 'swiglu', 'rope'):
        for mode in ('fwd', 'fwd+bwd'):
            m = mb.get((kern, 'minillm_triton', mode))
            if not m: continue
            out.append(dict(target=f'{kern} {mode} >= 80% of HBM bandwidth', value=m['fraction_of_bandwidth'],
                            passed=m['fraction_of_bandwidth'] >= 0.8))
            lg = mb.get((kern, 'liger', mode))
            if lg: out.append(dict(target=f'{kern} {mode} at least as fast as Liger', value=lg['ms'] / m['ms'], passed=m['ms'] <= lg['ms'] * 1.02))
    ce = {r['impl']: r for r in res['cross_entropy_memory'] if 'peak_extra_bytes' in r}
    if 'eager' in ce and 'minillm_linear_cross_entropy' in ce:
        ratio = ce['minillm_linear_cross_entropy']['peak_extra_bytes'] / ce['eager']['peak_extra_bytes']
        out.append(dict(target='fused cross-entropy peak memory <= 1/4 of eager (vocab 50k)', value=ratio, passed=ratio <= 0.25))
    att = {(r['impl'], r['seq'], r['head_dim']): r for r in res['attention'] if 'fwd_tflops' in r}
    for (impl, T, D), r in att.items():
        if impl != 'minillm_triton': continue
        for peer in ('sdpa_flash', 'sdpa_cudnn'):
            p = att.get((peer, T, D))
            if not p: continue
            out.append(dict(target=f'attention fwd T={T} d={D} >= 0.9x {peer}', value=r['fwd_tflops'] / p['fwd_tflops'],
                            passed=r['fwd_tflops'] >= 0.9 * p['fwd_tflops']))
            out.append(dict(target=f'attention bwd T={T} d={D} >= 0.7x {peer}', value=r['bwd_tflops'] / p['bwd_tflops'],
                            passed=r['bwd_tflops'] >= 0.7 * p['bwd_tflops']))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='smaller shapes and fewer sequence lengths')
    p.add_argument('--out', default=None, help='output folder (default: $OUT, else bench/results)')
    p.add_argument('--skip', nargs='*', default=[], choices=['checks', 'memory_bound', 'attention', 'cross_entropy_memory'])
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): sys.exit('bench/kernels.py needs a CUDA GPU (none found): run it on a GPU machine.')
    from minillm import kernels as K
    import triton
    if not K.triton_available('cuda'): sys.exit('Triton cannot run the kernels here (is TRITON_INTERPRET set?).')
    torch.backends.cuda.matmul.allow_tf32 = True
    L = liger()
    name = torch.cuda.get_device_name()
    res = dict(device=name, torch=torch.__version__, triton=triton.__version__, liger=L.get('version'),
               python=platform.python_version(), date=time.strftime('%Y-%m-%d %H:%M:%S'), quick=a.quick,
               liger_missing={k: v for k, v in L.items() if k.endswith('_error')})
    t0 = time.time()
    res['bandwidth'] = measure_hbm_bandwidth(1 * 2**30 if a.quick else 4 * 2**30)
    log(f'{name}: measured HBM bandwidth {res["bandwidth"] / 1e12:.2f} TB/s')
    for section, fn in (('checks', lambda: run_checks(K)), ('memory_bound', lambda: memory_bound(K, L, res['bandwidth'], a.quick)),
                        ('attention', lambda: attention(K, a.quick)), ('cross_entropy_memory', lambda: ce_memory(K, L, a.quick))):
        if section in a.skip: res[section] = []; continue
        try: res[section] = fn()
        except Exception: res[section] = [dict(error=traceback.format_exc()[-2000:])]; log(res[section])
        torch.cuda.empty_cache()
    res['targets'] = targets(res)
    res['seconds'] = time.time() - t0
    out_dir = Path(a.out or os.environ.get('OUT') or ROOT / 'bench' / 'results')
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = ''.join(c if c.isalnum() else '_' for c in name.lower()).strip('_')
    path = out_dir / f'kernels_{slug}.json'
    path.write_text(json.dumps(res, indent=2) + '\n')
    for t in res['targets']: log(('PASS ' if t['passed'] else 'MISS ') + f"{t['target']}: {t['value']:.3f}")
    log(f'wrote {path} in {res["seconds"]:.0f} s')


if __name__ == '__main__':
    main()
