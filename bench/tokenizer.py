"""Benchmark minillm's tokenizer against its peers, side by side in one run, and write bench/results/tokenizer.json.

- Training: minillm `Tokenizer.train` vs Hugging Face `tokenizers` (BpeTrainer + ByteLevel pre-tokenizer), same
  text, vocabulary size and special token, both on `--workers` cores. Each run is its own process, so wall time and
  peak memory (VmHWM, plus the peak of minillm's worker processes) don't mix.
- Encoding: the GPT-2 vocabulary through minillm vs tiktoken's gpt2 encoding (built offline from the same files),
  on one core (`encode` on the whole text) and on two (`encode_batch` over documents), checking the ids match.
  minillm starts every timed run with an empty cache ("cold"); a second pass with the warm cache is reported too.

Runs are interleaved and repeated (`--repeats`); the best wall time of each is kept, every run is recorded.
Usage: python bench/tokenizer.py [--megabytes 20] [--vocab-size 8192] [--workers 2] [--repeats 3]
"""
import argparse, datetime, gzip, json, os, platform, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minillm.core import SHARED_DATA, atomic_write  # noqa: E402

SPECIAL = '<|endoftext|>'


def load_books(path: Path, megabytes: float) -> list[str]:
    "The first `megabytes` MB (UTF-8) of text from books.jsonl.gz, one string per book (the last one cut)."
    limit, docs, size = int(megabytes * 1e6), [], 0
    with gzip.open(path, 'rt', encoding='utf-8') as f:
        for line in f:
            text = json.loads(line)['text']
            n = len(text.encode('utf-8'))
            if size + n > limit:
                text = text.encode('utf-8')[:limit - size].decode('utf-8', errors='ignore'); n = len(text.encode('utf-8'))
            docs.append(text); size += n
            if size >= limit: break
    return docs


def rss_mb(field: str) -> float:
    "A memory figure of this process from /proc (VmRSS now, VmHWM peak), in MB."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'): return int(line.split()[1]) / 1024
    return float('nan')


def cpu_seconds() -> float:
    "User + system CPU time of this process and its finished children."
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ---------------------------------------------------------------- child processes
def child_train(args) -> dict:
    docs = load_books(Path(args.data), args.megabytes)
    baseline = rss_mb('VmRSS')
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if args.child == 'train-minillm':
        from minillm.tokenizer import Tokenizer
        tok = Tokenizer.train(docs, args.vocab_size, special_tokens=[SPECIAL], workers=args.workers, show_progress=False)
        vocab_size = tok.vocab_size
    else:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
        vocab_size = tok.get_vocab_size()
    wall = time.perf_counter() - t0
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024   # KB on Linux
    return {'wall_s': wall, 'cpu_s': cpu_seconds() - cpu0, 'peak_rss_mb': rss_mb('VmHWM'), 'baseline_rss_mb': baseline,
            'workers_peak_rss_mb': workers_peak if args.child == 'train-minillm' and args.workers > 1 else 0.0,
            'vocab_size': vocab_size}


def child_encode(args) -> dict:
    import tiktoken
    from minillm.tokenizer import Tokenizer, read_gpt2
    docs = load_books(Path(args.data), args.megabytes)
    text = SPECIAL.join(docs)
    nbytes = len(text.encode('utf-8'))
    gpt2_dir = Path(args.data).parents[1] / 'tokenizers' / 'gpt2'
    vocab, merges, special, pattern = read_gpt2(gpt2_dir)
    ref = tiktoken.Encoding(name='gpt2-offline', pat_str=pattern, mergeable_ranks={t: i for i, t in enumerate(vocab)}, special_tokens=special)
    fresh = lambda: Tokenizer(vocab, merges, special, pattern)   # an empty cache: every timed minillm run starts cold
    runs = {k: [] for k in ('tiktoken_1', 'minillm_1_cold', 'minillm_1_warm', 'tiktoken_2', 'minillm_2')}
    cpu = {k: [] for k in runs}
    identical, n_tokens, workers_cpu = True, 0, []   # workers_cpu: CPU seconds of all minillm worker processes

    def timed(key, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        runs[key].append(time.perf_counter() - t0); cpu[key].append(time.process_time() - c0)
        return out

    for _ in range(args.repeats):
        expected = timed('tiktoken_1', lambda: ref.encode(text, allowed_special='all'))
        n_tokens = len(expected)
        tok = fresh()
        identical &= timed('minillm_1_cold', lambda: tok.encode(text)) == expected
        identical &= timed('minillm_1_warm', lambda: tok.encode(text)) == expected
        expected_batch = timed('tiktoken_2', lambda: ref.encode_batch(docs, num_threads=args.workers, allowed_special='all'))
        tok = fresh()
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        identical &= timed('minillm_2', lambda: tok.encode_batch(docs, workers=args.workers)) == expected_batch
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        workers_cpu.append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
        del expected, expected_batch
    return {'bytes': nbytes, 'tokens': n_tokens, 'wall_s_runs': runs,
            'cpu_s_runs': cpu, 'workers_cpu_s_runs': workers_cpu, 'ids_identical': bool(identical)}


# ---------------------------------------------------------------- parent
def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, '--child', kind, '--data', str(args.data), '--megabytes', str(args.megabytes),
           '--vocab-size', str(args.vocab_size), '--workers', str(args.workers), '--repeats', str(args.repeats)]
    env = {**os.environ, 'RAYON_NUM_THREADS': str(args.workers), 'TOKENIZERS_PARALLELISM': 'true', 'PYTHONPATH': str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0: raise RuntimeError(f'{kind} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict:
    from importlib.metadata import version, PackageNotFoundError
    out = {}
    for p in ('minillm', 'tokenizers', 'tiktoken', 'regex', 'numpy'):
        try: out[p] = version(p)
        except PackageNotFoundError: out[p] = None
    out['python'] = platform.python_version()
    return out


def cpu_model() -> str:
    try: return next(l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', type=Path, default=SHARED_DATA / 'pretrain' / 'books.jsonl.gz' if SHARED_DATA else None)
    p.add_argument('--megabytes', type=float, default=20)
    p.add_argument('--vocab-size', type=int, default=8192)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--out', type=Path, default=ROOT / 'bench' / 'results' / 'tokenizer.json')
    p.add_argument('--child', choices=['train-minillm', 'train-hf', 'encode'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.data is None or not Path(args.data).exists():
        sys.exit('books.jsonl.gz not found: this benchmark needs ../shared/data (or pass --data PATH/books.jsonl.gz)')
    if args.child:
        print(json.dumps(child_encode(args) if args.child == 'encode' else child_train(args)))
        return

    docs = load_books(args.data, args.megabytes)
    load_start = os.getloadavg()
    print(f'{sum(len(d.encode()) for d in docs) / 1e6:.1f} MB in {len(docs)} documents; load average {load_start[0]:.1f}', flush=True)
    training = {'minillm': [], 'hf_tokenizers': []}
    for r in range(args.repeats):   # interleaved, alternating who goes first
        for name in (('minillm', 'hf_tokenizers') if r % 2 == 0 else ('hf_tokenizers', 'minillm')):
            res = run_child('train-minillm' if name == 'minillm' else 'train-hf', args)
            training[name].append(res)
            print(f'train {name:14s} run {r}: {res["wall_s"]:6.2f} s wall, {res["cpu_s"]:6.2f} s CPU, peak {res["peak_rss_mb"]:.0f} MB', flush=True)
    summary = {}
    for name, rs in training.items():
        best = min(rs, key=lambda x: x['wall_s'])
        summary[name] = {**best, 'wall_s_runs': [x['wall_s'] for x in rs], 'cpu_s_runs': [x['cpu_s'] for x in rs],
                         'peak_rss_mb': max(x['peak_rss_mb'] for x in rs), 'workers_peak_rss_mb': max(x['workers_peak_rss_mb'] for x in rs)}
    summary['time_ratio'] = summary['minillm']['wall_s'] / summary['hf_tokenizers']['wall_s']
    summary['target_time_ratio'] = 2.0
    summary['meets_target'] = summary['time_ratio'] <= 2.0

    enc = run_child('encode', args)
    mb = enc['bytes'] / 1e6
    best = {k: min(v) for k, v in enc['wall_s_runs'].items()}
    names = {'tiktoken_1': 'tiktoken, 1 thread', 'minillm_1_cold': 'minillm, 1 process (cold cache)',
             'minillm_1_warm': 'minillm, 1 process (warm cache)', 'tiktoken_2': f'tiktoken, {args.workers} threads',
             'minillm_2': f'minillm, {args.workers} processes'}
    encoding = {'throughput_mb_s': {names[k]: mb / best[k] for k in names},
                'ratio_single': best['tiktoken_1'] / best['minillm_1_cold'],
                'ratio_single_warm': best['tiktoken_1'] / best['minillm_1_warm'],
                'ratio_two_cores': best['tiktoken_2'] / best['minillm_2'],
                'ratio_single_cpu_time': min(enc['cpu_s_runs']['tiktoken_1']) / min(enc['cpu_s_runs']['minillm_1_cold']),
                'target_ratio_single': 0.5, 'ids_identical': enc['ids_identical'], 'tokens': enc['tokens'],
                'wall_s_runs': enc['wall_s_runs'], 'cpu_s_runs': enc['cpu_s_runs'],
                'minillm_2_workers_cpu_s_runs': enc['workers_cpu_s_runs']}
    encoding['meets_target'] = encoding['ratio_single'] >= 0.5
    for k, v in encoding['throughput_mb_s'].items(): print(f'encode {k:34s} {v:6.2f} MB/s', flush=True)

    result = {'benchmark': 'tokenizer', 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'machine': {'cores': len(os.sched_getaffinity(0)), 'cpu': cpu_model(), 'platform': platform.platform(),
                          'load_average_start': load_start, 'load_average_end': os.getloadavg()},
              'versions': versions(),
              'data': {'source': 'shared/data/pretrain/books.jsonl.gz', 'megabytes': mb, 'documents': len(docs),
                       'characters': sum(map(len, docs))},
              'settings': {'vocab_size': args.vocab_size, 'workers': args.workers, 'repeats': args.repeats, 'special_tokens': [SPECIAL]},
              'training': summary, 'encoding': encoding}
    atomic_write(args.out, json.dumps(result, indent=2) + '\n')
    print(f"training: minillm {summary['minillm']['wall_s']:.2f} s vs HF {summary['hf_tokenizers']['wall_s']:.2f} s "
          f"(ratio {summary['time_ratio']:.2f}, target <= 2); encoding: {encoding['ratio_single']:.2f}x tiktoken on one core "
          f"(target >= 0.5), {encoding['ratio_two_cores']:.2f}x on {args.workers}; ids identical: {encoding['ids_identical']}")
    print('wrote', args.out)


if __name__ == '__main__':
    main()
