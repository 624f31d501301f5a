"""Benchmark chapter 07 (web data) on all the real pages and WARC records in ../shared/data/web.

Writes bench/results/webdata.json: extraction F1 (Resiliparse, trafilatura vs the hand-written baseline), language
keep rates, PII precision/recall, rule counts and agreement with datatrove, MinHash precision/recall and the
datasketch comparison, classifier accuracy (torch vs scikit-learn), the end-to-end funnel and docs/s on 2 processes,
and the same per-document stages on datatrove's LocalPipelineExecutor.

Run: python bench/webdata.py [--quick]   (needs ../shared/data; --quick subsamples for a smoke run)
"""
import argparse, gzip, json, os, random, sys, tarfile, tempfile, time
from collections import Counter
from pathlib import Path

import numpy as np

from minillm.core import SHARED_DATA, atomic_write
from minillm import webdata as W

RESULTS = Path(__file__).resolve().parent / 'results' / 'webdata.json'


def timed(fn, *args, **kwargs):
    t = time.time(); out = fn(*args, **kwargs)
    return out, time.time() - t


def bench_extraction(web, limit):
    sets = {'article-extraction': list(W.aeb_pages(web, limit)), 'readability': list(W.readability_pages(web, limit)),
            'trafilatura-eval': list(W.trafilatura_pages(web, limit))}
    out = {}
    for name, pages in sets.items():
        out[name] = W.score_extractors(pages)
        print(name, {m: round(v['f1'], 3) for m, v in out[name].items()}, flush=True)
    return out, sets


def bench_language(sets, warc_records):
    pages = [p for s in sets.values() for p in s] + [r for r in warc_records if r['html']]
    langs = [W.detect_language(W.extract_text(p['html'])) for p in pages]
    by_lang = Counter(l for l, _ in langs)
    kept = sum(l == 'en' and s >= 0.65 for l, s in langs)
    declared = [(p['lang'][:2].lower(), W.detect_language(W.extract_text(p['html']))[0]) for p in sets['readability'] if p['lang']]
    return {'pages': len(pages), 'by_language': dict(by_lang.most_common()), 'english_keep_rate': kept / len(pages),
            'agreement_with_declared_lang': sum(a == b for a, b in declared) / len(declared), 'declared_pages': len(declared)}


def bench_pii(web, limit):
    tricky = W.pii_scores([W.pii_spans(t) for t in W.PII_TRICKY])
    rows = [json.loads(l) for l in open(web / 'pii' / 'enterprise_pii_classification.jsonl', encoding='utf-8')]
    passages = [(r['query'].split("'''\n", 1)[1].rsplit("\n'''", 1)[0], r['gold']) for r in rows]
    flagged = [(bool(W.find_pii(t)), g) for t, g in passages]
    tp = sum(f and g for f, g in flagged); fp = sum(f and not g for f, g in flagged); fn = sum(g and not f for f, g in flagged)
    rng = random.Random(0)
    clean = [t for t, _ in passages if not W.find_pii(t)][:limit]
    planted = W.pii_scores([W.plant_pii(t, rng) for t in clean])
    keep = ('precision', 'recall', 'tp', 'fp', 'fn')
    return {'tricky_cases': {**{k: tricky[k] for k in keep}, 'cases': len(W.PII_TRICKY),
                             'misses': [m[1] for m in tricky['misses']], 'false_alarms': [f[1] for f in tricky['false_alarms']]},
            'labelled_set_document_level': {'passages': len(passages), 'labelled_sensitive': sum(g for _, g in passages),
                                            'precision': tp / (tp + fp) if tp + fp else None, 'recall': tp / (tp + fn),
                                            'tp': tp, 'fp': fp, 'fn': fn,
                                            'note': 'labels mark business-sensitive content (revenues, reviews), not contact identifiers'},
            'planted_in_labelled_passages': {**{k: planted[k] for k in keep}, 'passages': len(clean)}}


def bench_rules(texts):
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text): return text.split()
        def sent_tokenize(self, text): return [text[a:b] for a, b in self.span_tokenize(text)]
        def span_tokenize(self, text):
            ends = [m.end() for m in W._SENTENCE_END_RE.finditer(text)]
            if not ends or ends[-1] < len(text.rstrip()): ends.append(len(text))
            return list(zip([0] + ends[:-1], ends))

    ws = WhitespaceWords('en')
    fired, examples = Counter(), {}
    agreement = {}
    for name, ours, theirs in [('gopher_quality', W.gopher_quality_rules, GopherQualityFilter(language=ws)),
                               ('gopher_repetition', W.gopher_repetition_rules, GopherRepetitionFilter(language=ws)),
                               ('c4', lambda t: W.c4_filter(t)[1], C4QualityFilter(language=ws))]:
        same = same_long = n_long = 0
        for t in texts:
            failed = ours(t)
            for rule in failed:
                fired[f'{name}:{rule}'] += 1
                examples.setdefault(f'{name}:{rule}', ' '.join(t.split())[:160])
            r = theirs.filter(Document(text=t, id='x'))
            agree = (not failed) == (r if isinstance(r, bool) else r[0])
            same += agree
            if len(t.split()) >= 50: n_long += 1; same_long += agree
        agreement[name] = {'all_pages': same / len(texts), 'pages_50_words_or_more': same_long / max(1, n_long)}
    return {'english_pages': len(texts), 'rule_counts': dict(fired.most_common()), 'examples': examples,
            'agreement_with_datatrove': agreement}


def bench_dedup(shared, n_planted):
    import datasketch
    docs = [json.loads(l)['text'] for l in open(shared / 'pretrain' / 'llama-factory' / 'c4_demo.jsonl', encoding='utf-8')]
    rng = random.Random(0)
    texts, planted = list(docs), []
    rates = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
    for k, i in enumerate(rng.sample(range(len(docs)), n_planted)):
        texts.append(W.make_near_duplicate(docs[i], rates[k % len(rates)], rng)); planted.append((i, len(texts) - 1, rates[k % len(rates)]))
    sh = [W.shingles(t) for t in texts]
    mh = W.MinHasher(112, 5, 1)
    sigs, t_ours = timed(lambda: np.stack([mh.signature(t) for t in texts]))
    keep, pairs = W.minhash_dedup(texts, signatures=sigs)
    truth = {(a, b) for a, b, _ in planted}
    true_j = {(a, b): W.jaccard(sh[a], sh[b]) for a, b, _ in planted}
    near = [p for p in truth if true_j[p] >= 0.8]
    by_rate = {str(r): {'mean_true_jaccard': float(np.mean([true_j[(a, b)] for a, b, rr in planted if rr == r])),
                        'recall': float(np.mean([(a, b) in pairs for a, b, rr in planted if rr == r]))} for r in rates}

    def ds_sig(s):
        m = datasketch.MinHash(num_perm=112, seed=1); m.update_batch([x.encode() for x in s]); return m
    ds_sigs, t_ds = timed(lambda: [ds_sig(s) for s in sh])
    mae_ours = float(np.mean([abs(W.estimate_jaccard(sigs[a], sigs[b]) - j) for (a, b), j in true_j.items()]))
    mae_ds = float(np.mean([abs(ds_sigs[a].jaccard(ds_sigs[b]) - j) for (a, b), j in true_j.items()]))
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    for i, m in enumerate(ds_sigs): lsh.insert(i, m)
    ds_pairs = {(min(i, j), max(i, j)) for i, m in enumerate(ds_sigs) for j in lsh.query(m) if j != i}
    return {'params': {'ngram': 5, 'num_perm': 112, 'bands': 14, 'rows': 8, 'threshold_approx': W.lsh_threshold(8, 14)},
            'documents': len(texts), 'planted_pairs': len(planted), 'candidate_pairs': len(pairs),
            'precision': len(pairs & truth) / max(1, len(pairs)), 'recall_true_jaccard_ge_0.8': sum(p in pairs for p in near) / max(1, len(near)),
            'recall_all_planted': len(pairs & truth) / len(truth), 'by_edit_rate': by_rate,
            'datasketch': {'jaccard_mae_ours': mae_ours, 'jaccard_mae_datasketch': mae_ds, 'candidate_pairs': len(ds_pairs),
                           'pair_overlap_jaccard': len(ds_pairs & pairs) / max(1, len(ds_pairs | pairs)),
                           'recall_all_planted': len(ds_pairs & truth) / len(truth),
                           'signature_seconds_ours': t_ours, 'signature_seconds_datasketch': t_ds,
                           'ours_over_datasketch_speed': t_ds / t_ours}}


def bench_classifier(shared, english_texts, threshold):
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression
    data = W.quality_training_texts(shared)
    (good_tr, bad_tr), (good_te, bad_te) = data['train'], data['test']
    model, t_train = timed(W.train_quality_classifier, good_tr, bad_tr)
    acc = W.accuracy(model, good_te, bad_te)
    hv = HashingVectorizer(ngram_range=(1, 2), n_features=2**18, alternate_sign=False)
    (sk, t_sk) = timed(lambda: LogisticRegression(C=10, solver='liblinear').fit(hv.transform(good_tr + bad_tr), [1] * len(good_tr) + [0] * len(bad_tr)))
    sk_acc = sk.score(hv.transform(good_te + bad_te), [1] * len(good_te) + [0] * len(bad_te))
    scores = model.score(english_texts)
    return model, {'documents': data['documents'], 'train_passages': len(good_tr) + len(bad_tr), 'test_passages': len(good_te) + len(bad_te),
                   'heldout_accuracy': acc, 'sklearn_heldout_accuracy': sk_acc, 'train_seconds': t_train, 'sklearn_seconds': t_sk,
                   'threshold': threshold, 'page_score_quantiles': {q: float(np.quantile(scores, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                   'page_keep_rate_at_threshold': float((scores >= threshold).mean())}


def all_pages_as_warc(web, tmp):
    "Every HTML page of the three benchmarks as WARC response records with the page's URL where known."
    urls = {v['file']: url for url, v in json.loads((web / 'trafilatura' / 'evaldata.json').read_text()).items()}
    pages = [(p['url'] or f'https://aeb.invalid/{p["name"]}', p['html'].encode(), 'text/html; charset=utf-8') for p in W.aeb_pages(web)]
    for archive in ('eval_html.tar.xz', 'cache_html.tar.xz'):
        with tarfile.open(web / 'trafilatura' / archive) as tar:
            for m in tar:
                name = m.name.split('/')[-1]
                if m.isfile():
                    pages.append((urls.get(name, f'https://unknown.invalid/{name}'), tar.extractfile(m).read(), 'text/html'))
    with tarfile.open(web / 'readability' / 'test-pages.tar.xz') as tar:
        for m in tar:
            if m.isfile() and m.name.endswith('/source.html'):
                raw = tar.extractfile(m).read()
                url = W._page_url(W.decode_html(raw) or '') or f'https://readability.invalid/{m.name.split("/")[1]}'
                pages.append((url, raw, 'text/html'))
    path = tmp / 'benchmark_pages.warc.gz'
    W.write_warc(path, pages)
    return path, len(pages)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='subsample everything (smoke run)')
    ap.add_argument('--out', default=str(RESULTS))
    args = ap.parse_args()
    if SHARED_DATA is None or not (SHARED_DATA / 'web').is_dir():
        sys.exit('bench/webdata.py needs ../shared/data/web (set MINILLM_SHARED_DATA).')
    web, limit = SHARED_DATA / 'web', (15 if args.quick else None)
    tmp = Path(tempfile.mkdtemp(prefix='bench-webdata-'))
    res = {'machine': {'cpus': os.cpu_count(), 'loadavg_at_start': os.getloadavg()}, 'quick': args.quick}
    t0 = time.time()

    res['extraction'], sets = bench_extraction(web, limit)
    warc_files = sorted(p for p in web.rglob('*') if p.is_file() and '.warc' in p.name)
    warc_stats = Counter()
    warc_records = [r for p in warc_files for r in W.read_warc(p, warc_stats)]
    res['warc'] = {'files': len(warc_files), 'records': len(warc_records), **warc_stats}
    res['language'] = bench_language(sets, warc_records); print('language', res['language']['english_keep_rate'], flush=True)
    res['pii'] = bench_pii(web, 200 if args.quick else None); print('pii', res['pii']['planted_in_labelled_passages'], flush=True)
    texts = [W.extract_text(p['html']) for s in sets.values() for p in s] + [W.extract_text(r['html']) if r['html'] else r['text'] for r in warc_records]
    english = [t for t in texts if t.strip() and W.detect_language(t)[0] == 'en']
    res['rules'] = bench_rules(english); print('rules', res['rules']['agreement_with_datatrove'], flush=True)
    res['dedup'] = bench_dedup(SHARED_DATA, 36 if args.quick else 120); print('dedup', res['dedup']['precision'], res['dedup']['recall_true_jaccard_ge_0.8'], flush=True)
    threshold = 0.3
    model, res['classifier'] = bench_classifier(SHARED_DATA, english, threshold); print('classifier', res['classifier']['heldout_accuracy'], flush=True)
    model.save(tmp / 'quality.safetensors')

    pages_warc, n_pages = all_pages_as_warc(web, tmp)
    inputs = [pages_warc] + warc_files
    funnel = W.run_webdata_pipeline(inputs, tmp / 'out', num_proc=2, quality_model=tmp / 'quality.safetensors', quality_threshold=threshold,
                                    limit=200 if args.quick else None)
    res['pipeline'] = {k: funnel[k] for k in ('docs_in', 'docs_out', 'tokens_out', 'seconds', 'docs_per_second', 'num_proc',
                                              'extractor', 'token_counter', 'input_stats', 'domain_tokens')}
    res['pipeline']['html_pages'] = n_pages
    res['pipeline']['funnel'] = [{k: r[k] for k in ('stage', 'docs', 'tokens', 'seconds', 'removed')} for r in funnel['stages']]
    print('pipeline', res['pipeline']['docs_in'], '->', res['pipeline']['docs_out'], res['pipeline']['docs_per_second'], 'docs/s', flush=True)

    weights = {'news': 0.35, 'blog': 0.2, 'encyclopedia': 0.15, 'forum': 0.05, 'other': 0.25}  # as in the notebook
    rates = W.mixture_rates(funnel['domain_tokens'], weights)
    expected = {d: rates[d] * n for d, n in funnel['domain_tokens'].items()}
    rows = [json.loads(l) for l in gzip.open(tmp / 'out' / 'clean.jsonl.gz', 'rt')]
    mixed = W.apply_mixture([{'domain': r['domain'], 'tokens': r['tokens']} for r in rows], rates)
    got = Counter(); [got.__setitem__(r['domain'], got[r['domain']] + r['tokens']) for r in mixed]
    res['mixture'] = {'weights': weights, 'natural_token_share': {d: n / sum(funnel['domain_tokens'].values()) for d, n in funnel['domain_tokens'].items()},
                      'rates': rates, 'expected_token_share': {d: n / sum(expected.values()) for d, n in expected.items()},
                      'achieved_token_share_one_sample': {d: n / sum(got.values()) for d, n in got.items()},
                      'tokens_before': sum(funnel['domain_tokens'].values()), 'tokens_after_one_sample': sum(got.values())}

    ex = W.datatrove_pipeline(inputs, tmp / 'dt_out', tmp / 'dt_logs', tasks=2, workers=2)
    _, t_dt = timed(ex.run)
    dt_docs = sum(1 for f in (tmp / 'dt_out').glob('*.jsonl.gz') for _ in gzip.open(f, 'rt'))
    res['datatrove_per_document_stages'] = {'docs_out': dt_docs, 'seconds': t_dt, 'docs_per_second': funnel['docs_in'] / t_dt,
                                            'note': 'extract..c4, pii, domain only (no dedup or classifier); forkserver start-up included'}
    res['total_seconds'] = time.time() - t0
    res['machine']['loadavg_at_end'] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(res, indent=1, default=float) + '\n')
    print('wrote', out, f'in {res["total_seconds"]:.0f} s')


if __name__ == '__main__':
    main()
