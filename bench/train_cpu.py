"""CPU training throughput as model FLOP utilisation (MFU): minillm's training step beside nanoGPT's.

MFU = tokens/s x model FLOPs/token / FLOP/s of a 1024x1024 fp32 matmul measured in the same process, for full training
steps (forward, loss, backward, gradient clipping, AdamW) of a 4-layer, d_model 256, context 256, vocab 8192 model at batch 16.
minillm runs its trainer's step: `LanguageModelLoss` (the LM head fused with the loss) through `forward_backward`, and
`make_optimizer`'s AdamW. The peer runs nanoGPT's step: its GPT-2 model, `F.cross_entropy` on the full logits, and
`torch.optim.AdamW` configured as nanoGPT's `configure_optimizers` does on a CPU.
Measurements alternate between the models round by round (this machine is shared), and each measurement's MFU uses the
mean of the matmul speeds measured just before and just after it; the medians over rounds are reported, and the ratio is the median of the rounds' ratios.

    python bench/train_cpu.py [--rounds 5] [--steps 6] [--compile]   ->  bench/results/train_cpu.json
"""
from __future__ import annotations
import argparse, json, math, os, platform, statistics, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm.model import ModelConfig, Transformer, flops_per_token

SIZE = dict(n_layers=4, d_model=256, context_length=256, vocab_size=8192)
BATCH = 16


# ----------------------------------------------------------------------------- the peer: a nanoGPT-style GPT-2 model
class PeerBlock(nn.Module):
    "GPT-2 block as in nanoGPT: pre-LayerNorm, causal attention through SDPA, GELU MLP 4x, biases."
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):                                                  # (B, T, d)
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)               # 3 x (B, T, d)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # (B, H, T, hd)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PeerGPT(nn.Module):
    "nanoGPT's GPT: token + learned position embeddings, blocks, final LayerNorm, LM head tied to the token embedding."
    def __init__(self, vocab_size: int, context_length: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(PeerBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)): nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None: nn.init.zeros_(m.bias)

    def forward(self, idx):                                                # (B, T) -> (B, T, V)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks: x = block(x)
        return self.lm_head(self.ln_f(x))

    def flops_per_token(self, T: int) -> float:
        "nanoGPT's estimate: 6 N (N without position embeddings; the tied head counted once) + 12 L d T for attention."
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        L, d = len(self.blocks), self.wte.weight.shape[1]
        return 6 * n + 12 * L * d * T


# ----------------------------------------------------------------------------- measurement
def matmul_flops(n_iter: int = 30, repeats: int = 3) -> float:
    "FLOP/s of a 1024x1024 fp32 matmul on this process's threads (median of `repeats` timings)."
    a, b, c = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.empty(1024, 1024)
    for _ in range(5): torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n_iter): torch.mm(a, b, out=c)
        rates.append(2 * 1024 ** 3 * n_iter / (time.perf_counter() - t))
    return statistics.median(rates)


class Trainee:
    "A model and a training step (forward, loss, backward, clip, AdamW), timed on random tokens."
    def __init__(self, name: str, model: nn.Module, flops_per_tok: float, loss_fn, optimizer: torch.optim.Optimizer):
        self.name, self.model, self.flops_per_tok, self.loss_fn, self.optimizer = name, model, flops_per_tok, loss_fn, optimizer
        self.gen = torch.Generator().manual_seed(0)

    def step(self):
        from minillm.train import forward_backward
        x = torch.randint(0, SIZE['vocab_size'], (BATCH, SIZE['context_length'] + 1), generator=self.gen)
        loss = forward_backward(self.loss_fn, [(x[:, :-1], x[:, 1:])])     # forward, loss, backward (float32 on a CPU)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step(); self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def tokens_per_s(self, n_steps: int) -> float:
        t = time.perf_counter()
        for _ in range(n_steps): self.step()
        return n_steps * BATCH * SIZE['context_length'] / (time.perf_counter() - t)


def minillm_trainee(name: str, compile: bool = False) -> Trainee:
    "minillm's trainer step; compiled, the trainer leaves the loss fusion to torch.compile (as `train` does)."
    from minillm.train import LanguageModelLoss, TrainConfig, make_optimizer
    cfg = ModelConfig.preset('cpu', **SIZE)
    model = Transformer(cfg)
    loss_fn = LanguageModelLoss(model, fused=not compile)
    return Trainee(name, model, flops_per_token(cfg, cfg.context_length), torch.compile(loss_fn) if compile else loss_fn,
                   make_optimizer(model, TrainConfig.preset('cpu', device='cpu'), 'cpu'))


def nanogpt_trainee(name: str, n_heads: int, compile: bool = False) -> Trainee:
    "nanoGPT's step: model(x) logits, F.cross_entropy, AdamW over decay / no-decay groups (fused only on CUDA, so default here)."
    model = PeerGPT(n_heads=n_heads, **SIZE)
    fwd = torch.compile(model) if compile else model
    loss_fn = lambda x, y: F.cross_entropy(fwd(x).view(-1, SIZE['vocab_size']), y.reshape(-1))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=0.1), dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return Trainee(name, model, model.flops_per_token(SIZE['context_length']), loss_fn,
                   torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=5, help='alternating measurement rounds')
    ap.add_argument('--steps', type=int, default=6, help='timed training steps per model per round')
    ap.add_argument('--warmup', type=int, default=3, help='untimed steps per model first')
    ap.add_argument('--compile', action='store_true', help='also measure both models under torch.compile')
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'train_cpu.json'))
    args = ap.parse_args()

    torch.manual_seed(0)
    mcfg = ModelConfig.preset('cpu', **SIZE)
    trainees = [minillm_trainee('minillm'), nanogpt_trainee('nanogpt_peer', mcfg.n_heads)]
    if args.compile:
        trainees += [minillm_trainee('minillm_compiled', compile=True), nanogpt_trainee('nanogpt_peer_compiled', mcfg.n_heads, compile=True)]
    for tr in trainees:
        t = time.perf_counter()
        for _ in range(args.warmup): tr.step()
        print(f'{tr.name}: warm-up {time.perf_counter() - t:.1f} s', flush=True)

    rows = {tr.name: dict(tokens_per_s=[], mfu=[]) for tr in trainees}
    peaks = []
    for r in range(args.rounds):
        before = matmul_flops(); peaks.append(before)
        for tr in (trainees if r % 2 == 0 else trainees[::-1]):     # alternate the order too
            tps = tr.tokens_per_s(args.steps)
            after = matmul_flops(); peaks.append(after)
            peak = (before + after) / 2                                 # the matmul speed just before and just after
            rows[tr.name]['tokens_per_s'].append(tps); rows[tr.name]['mfu'].append(tps * tr.flops_per_tok / peak)
            before = after
        print(f'round {r + 1}/{args.rounds}: matmul {statistics.median(peaks[-len(trainees) - 1:]) / 1e9:.1f} GFLOP/s, '
              + ', '.join(f"{n} {v['mfu'][-1]:.3f}" for n, v in rows.items()), flush=True)

    results = {}
    for tr in trainees:
        v = rows[tr.name]
        results[tr.name] = dict(params=sum(p.numel() for p in tr.model.parameters()), flops_per_token=tr.flops_per_tok,
                                tokens_per_s=round(statistics.median(v['tokens_per_s']), 1),
                                mfu=round(statistics.median(v['mfu']), 4), mfu_per_round=[round(m, 4) for m in v['mfu']])
    # the headline ratio pairs the two models round by round (same matmul speed, minutes apart), then takes the median
    paired = [a / b for a, b in zip(rows['minillm']['mfu'], rows['nanogpt_peer']['mfu'])]
    ratio = statistics.median(paired)
    out = dict(
        benchmark='CPU training MFU, minillm trainer step vs nanoGPT step: fwd+loss+bwd+clip+AdamW, 4 layers, d_model 256, context 256, vocab 8192, batch 16',
        definition='tokens/s x model FLOPs/token / FLOP/s of a 1024x1024 fp32 matmul timed just before and after, same process; medians over rounds',
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, python=platform.python_version(),
                     load_average_1min=round(os.getloadavg()[0], 2)),   # > cores means other processes shared the CPU
        matmul_gflops=round(statistics.median(peaks) / 1e9, 1), matmul_gflops_all=[round(p / 1e9, 1) for p in peaks],
        minillm_config={k: getattr(mcfg, k) for k in ('n_layers', 'd_model', 'n_heads', 'context_length', 'vocab_size')},
        rounds=args.rounds, steps_per_round=args.steps, results=results,
        mfu_ratio_minillm_over_peer=round(ratio, 3), mfu_ratio_per_round=[round(r, 3) for r in paired],
        tokens_per_s_ratio=round(results['minillm']['tokens_per_s'] / results['nanogpt_peer']['tokens_per_s'], 3), target_mfu=0.65, meets_target=results['minillm']['mfu'] >= 0.65)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + '\n')
    print(json.dumps({k: out[k] for k in ('matmul_gflops', 'mfu_ratio_minillm_over_peer', 'meets_target')}))
    for n, v in results.items(): print(f"{n:24s} {v['tokens_per_s']:8.0f} tok/s  MFU {v['mfu']:.3f}")


if __name__ == '__main__':
    main()
