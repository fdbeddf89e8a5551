"""Dataset preparation on realistic work: sft_nb vs TRL 1.16 vs the tokenizer floor, in one run.

For each workload of `bench/workloads.py` (multi-turn chats, tool calling, reasoning, conversational
prompt-completion, plain text) and each tokenizer (byte-level BPE at 32k and 151k, Qwen pre-tokenizer and specials,
the real Qwen2.5 / Qwen3 chat templates), on the same rows, interleaved, best of `--repeat`:

- sft_nb: `sft_nb.trainer.prepare_for_training` (what `SFTTrainer(...)` runs on the train set): validation,
  rendering, assistant-only masks (completion-only for prompt-completion), truncation to 1024 or BFD packing to 1024.
- TRL 1.16: `SFTTrainer._prepare_dataset` with the training template TRL itself swaps in (`{% generation %}`).
- floor: the Rust tokenizer alone, one batched call over the exact texts sft_nb renders (for prompt-completion, the
  prompts and the full texts, as any implementation that masks the prompt must tokenize): `encode_batch_fast`, the
  ids only, which is all sft_nb asks of a byte-level tokenizer (assistant spans are counted in tokens from the ids,
  `sft_nb.offsets`). For conversations trained on their assistant turns, `encode_batch` (which also works out each
  token's character offsets, as `tokenizer(texts)` and TRL's `apply_chat_template` masks do) is timed too and
  reported beside it (`floor_with_offsets`). Both are the tokenizer as loaded, its NFC normalizer included: sft_nb
  encodes the texts already in NFC with a twin that skips it (`sft_nb.normalizer`), the same ids for 9-13% less
  tokenizer time, so a row can come in under the floor.
  It is timed in every round of every config of a workload (`--repeat`, default 8) and each row is held to the best
  of them all: it encodes the same texts whatever the config. The rounds run the contenders in the orders of a
  balanced Latin square (`balanced_orders`), so that none always runs right after the same other one.

Each workload and tokenizer runs in a fresh process, as a user's run starts: in one process running them all, the
later workloads ran up to 25% slower for sft_nb than alone (reasoning at 8,000 rows: 1.50x the floor after the
others, 1.20x alone), much less for the floor, from what the earlier workloads left behind in the process.

Checks that input_ids and labels agree with TRL row for row (truncation mode; for tool calls, TRL on the rows as
written, in `datasets.Json` columns, as it trains on Arrow's null-filled arguments otherwise), measures
`dataset_num_proc` 1 against 2 on 8,000 rows (`--n-procs`: sft_nb forks only for 2 MiB of rows a process, as a fork
costs more than it saves on fewer; TRL's `datasets.map` starts its workers however few the rows), and the peak
memory of a child process preparing growing numbers of rows from an on-disk (memory-mapped) dataset:
anonymous memory (RssAnon, what preparing needs) is the measure, as RSS also counts the mapped Arrow files' pages,
which belong to the page cache. `--rss-only` runs just that (`--rss 20000,100000,1000000` for the issue's 1M run).
Writes bench/results/prep.json.

    python bench/bench_prep.py            # 1,000 rows per workload (8,000 for num_proc): ~25 minutes on 2 cores
    python bench/bench_prep.py --full     # 20,000 rows, every combination, and a 1M-conversation peak-RSS run
"""
import argparse, contextlib, gc, json, os, platform, subprocess, sys, tempfile, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
sys.path.insert(0, os.path.dirname(__file__))
import warnings
warnings.filterwarnings('ignore', category=FutureWarning)
import datasets
from datasets import Dataset
import workloads as W
from results_file import machine  # noqa: E402
TOKENIZERS = f"tokenizers {__import__('tokenizers').__version__}"
# imported before any clock starts: both sides pay their imports once per process, not per dataset
import sft_nb.trainer, trl.trainer.sft_trainer, trl.chat_template_utils  # noqa: E401

MAX_LEN = 1024
AOL = {'multi_turn', 'tool_calling', 'reasoning'}  # conversations trained on assistant turns only

def sft_args(cls, workload, num_proc, packing, **kw):
    return cls(output_dir=tempfile.mkdtemp(), report_to=[], max_length=MAX_LEN, dataset_num_proc=num_proc,
               assistant_only_loss=workload in AOL, packing=packing, packing_strategy='bfd', **kw)

def ours(ds, tok, workload, num_proc, packing):
    from sft_nb.config import SFTConfig
    from sft_nb.trainer import prepare_for_training
    return prepare_for_training(ds, tok, sft_args(SFTConfig, workload, num_proc, packing), packing=packing)

def trl(ds, tok, workload, num_proc, packing):
    from trl import SFTConfig as TRLConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template
    # TRL passes `num_proc=1` to `map`, which forks one worker with the tokenizer's threads off: 1 runs as the
    # default (None, in-process) on both sides
    num_proc = None if num_proc == 1 else num_proc
    args = sft_args(TRLConfig, workload, num_proc, packing, use_cpu=True, bf16=False)
    trainer = SFTTrainer.__new__(SFTTrainer)  # only the dataset preparation is timed, not model loading
    trainer.args, trainer._tokenizer, trainer._is_vision_dataset = args, tok, False
    trainer._signature_columns = None
    trainer.chat_template = get_training_chat_template(tok) if workload in AOL else None
    trainer.completion_only_loss = workload == 'prompt_completion'
    out = trainer._prepare_dataset(ds, tok, args, packing=packing, formatting_func=None, dataset_name='train')
    # `datasets`' map(num_proc=2) leaves TOKENIZERS_PARALLELISM=false in the process environment (not in
    # `os.environ`): without this, every later floor in this process would encode on one thread
    from sft_nb.data import sync_tokenizers_parallelism
    sync_tokenizers_parallelism()
    return out

def rendered(rows, tok, workload):
    """The texts sft_nb tokenizes (what the floor encodes): `rows` as written, rendered with the template sft_nb
    (and TRL) renders with (TRL's training template where TRL swaps it in). The dataset stores tool calls as Arrow
    structs, which give each call's `arguments` every other tool's keys as None; sft_nb takes them out before
    rendering (`sft_nb.nulls`), so the text it tokenizes is the text of the rows as written"""
    from sft_nb.chat import training_template
    from sft_nb.stencil import StencilRenderer
    if workload == 'plain_text': return [r['text'] + tok.eos_token for r in rows]
    render = StencilRenderer(tok, training_template(tok) if workload in AOL else None)
    if workload == 'prompt_completion':
        prompts = [render(r['prompt'], add_generation_prompt=True)[0] for r in rows]
        return prompts + [render(r['prompt'] + r['completion'])[0] for r in rows]
    return [render(r['messages'], r.get('tools'))[0] for r in rows]

def floors(backend, workload) -> dict:
    """The floor, the cheapest batched call that gives what sft_nb needs of a byte-level tokenizer: the ids
    (`encode_batch_fast`). For assistant-only conversations, also the call with each token's character offsets
    (`encode_batch`, what `tokenizer(texts)` runs and TRL's masks read)"""
    out = {'floor': backend.encode_batch_fast}
    if workload in AOL: out['floor_with_offsets'] = backend.encode_batch
    return out

FLOOR_NAME = 'tokenizer alone, ids only'

def timed(f, *a):
    gc.collect()
    t = time.perf_counter()
    out = f(*a)
    return out, time.perf_counter() - t

def same(a, b, tok):
    """'identical', 'whitespace' (labels differ only where TRL's training template also trains the newline after
    the assistant header: a documented difference, see tests/test_data.py) or 'different'"""
    if len(a) != len(b) or a['input_ids'][:] != b['input_ids'][:]: return 'different'
    la, lb = a['labels'][:], b['labels'][:]
    if la == lb: return 'identical'
    blank = {}
    for ids, xs, ys in zip(a['input_ids'][:], la, lb):
        for t, x, y in zip(ids, xs, ys):
            if x == y: continue
            if t not in blank: blank[t] = tok.decode([t]).strip() == ''
            if x != -100 or not blank[t]: return 'different'
    return 'whitespace'

def as_written(rows):
    "`rows` in a dataset that keeps each value verbatim (`datasets.Json`), with none of Arrow's padding"
    from datasets import Features, Json
    return Dataset.from_list(rows, features=Features({k: Json() for k in rows[0]}))

@contextlib.contextmanager
def exact_json():
    """`datasets.Json` read back by `json.loads`: its ujson decoder reads some floats a last digit off (3.57 as
    3.5700000000000003), which the template would then write"""
    import datasets.features.features as F
    old, F.ujson_loads = F.ujson_loads, json.loads
    try: yield
    finally: F.ujson_loads = old

def reference(trl_out, rows, tok, workload):
    """What sft_nb's rows must equal: TRL's. For tool calls, TRL's on the rows as written (`as_written`): from the
    Arrow structs both sides are timed on, TRL trains on every other tool's arguments as `null` (`sft_nb.nulls`)"""
    if workload != 'tool_calling': return trl_out
    with exact_json(): return trl(as_written(rows), tok, workload, 1, False)

def balanced_orders(n:int, rounds:int) -> list[list[int]]:
    """`rounds` orders of `n` contenders from a balanced Latin square (Williams design): over its rows each
    contender runs first as often as any other, and right after each other contender equally often (for odd `n`
    the square and its mirror, 2n rows). What runs just before moves a measurement: on 1,000 multi-turn rows
    sft_nb took 2-3% longer right after the floor with offsets (which frees hundreds of MB of encodings) than
    after the ids-only floor, and the ids-only floor 7% longer (165.8 ms against 154.6) in that place. With
    best-of over the rounds, no contender keeps one neighbour."""
    first = [0]
    for k in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        first.append((k + 1) // 2 if k % 2 else n - k // 2)
    square = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2: square += [row[::-1] for row in square]  # odd n: the mirrored rows balance it
    return [square[r % len(square)] for r in range(rounds)]

def run_case(workload, vocab, n, repeat, configs):
    "Each (mode, num_proc) of `configs` on the same rows: best of `repeat` interleaved rounds (`balanced_orders`)"
    rows, tok = W.workload(workload, n, vocab)
    ds = Dataset.from_list(rows)
    texts = rendered(rows, tok, workload)
    calls = floors(tok.backend_tokenizer, workload)
    warm = ds.select(range(min(50, n)))
    for packing in sorted({mode == 'packed' for mode, _ in configs}):
        # first-call costs (lazy imports, template compiles, the packing code's first run) out of the clock
        ours(warm, tok, workload, 1, packing)
        trl(warm, tok, workload, 1, packing)
    out = []
    for mode, num_proc in configs:
        packing = mode == 'packed'
        # the floor's encodings (hundreds of MB at 8,000 rows) are dropped at once: held while sft_nb ran, they
        # made it 15-20% slower than alone
        runs = {**{k: (lambda call=call: (None, timed(call, texts, False)[1])) for k, call in calls.items()},
                'sft_nb': lambda: timed(ours, ds, tok, workload, num_proc, packing),
                'trl': lambda: timed(trl, ds, tok, workload, num_proc, packing)}
        best, res, names = {k: float('inf') for k in runs}, {}, list(runs)
        for order in balanced_orders(len(names), repeat):
            for k in (names[i] for i in order):
                got, t = runs[k]()
                best[k] = min(best[k], t)
                if got is not None: res[k] = got
        agree = same(res['sft_nb'], reference(res['trl'], rows, tok, workload), tok) if not packing else None
        n_tok = sum(map(len, res['sft_nb']['input_ids'][:]))
        out.append(dict(workload=workload, vocab=vocab, mode=mode, num_proc=num_proc, rows=n,
                        out_rows=len(res['sft_nb']), tokens=n_tok, agree=agree, **best))
    # the floor encodes the same texts in every config: each row is held to the best of all its rounds
    lowest = {k: min(r[k] for r in out) for k in calls}
    for r in out:
        r.update(lowest)
        slow = r.get('floor_with_offsets')
        with_offsets = f"  (with offsets {slow:5.2f} s: {r['sft_nb'] / slow:4.2f}x)" if slow else ''
        print(f"{workload:18} {vocab // 1000:>3}k {r['mode']:8} np={r['num_proc']}  sft_nb {r['sft_nb']:6.2f} s  "
              f"TRL {r['trl']:6.2f} s  floor {r['floor']:6.2f} s  vs TRL {r['trl'] / r['sft_nb']:4.1f}x faster  "
              f"vs floor {r['sft_nb'] / r['floor']:4.2f}x{with_offsets}  labels vs TRL: {r['agree']}", flush=True)
    return out

def matrix(workloads, vocabs, everything, only=None, n=1000, n_procs=8000):
    """(workload, vocab, [(mode, num_proc)], rows) in order of importance, so a cut-short run has the main numbers:
    every workload and tokenizer truncated in one process, then packing on the first tokenizer, then
    `dataset_num_proc` 1 against 2 on `n_procs` rows (enough that forking pays: `sft_nb.data.FORK_MIN_BYTES`), and
    packing on those rows too;
    every combination on `n` rows with `everything`; `only`: just these (mode, num_proc), on every tokenizer"""
    if only:
        for w in workloads:
            for v in vocabs: yield w, v, only, n
        return
    if everything:
        for w in workloads:
            for v in vocabs: yield w, v, [(m, p) for m in ('truncate', 'packed') for p in (1, 2)], n
        return
    for w in workloads:
        for v in vocabs: yield w, v, [('truncate', 1)], n
    for w in workloads: yield w, vocabs[0], [('packed', 1)], n
    for w in workloads: yield w, vocabs[0], [('truncate', 1), ('truncate', 2), ('packed', 1)], n_procs

# ---------------------------------------------------------------- memory
def _write_dataset(workload, n, path, chunk=20_000):
    "`n` rows of `workload` written to Arrow files in chunks (never all in memory), then saved at `path`"
    gen = W.WORKLOADS[workload][0]
    def rows():
        for k in range(0, n, chunk):
            yield from gen(min(chunk, n - k), seed=k)
    Dataset.from_generator(rows, cache_dir=os.path.join(path, 'gen')).save_to_disk(os.path.join(path, 'ds'))

def _status(key):
    "One field of /proc/self/status in MiB"
    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))
    return int(line.split()[1]) / 1024

def _hwm():
    "This process's peak RSS in MiB (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)"
    return _status('VmHWM')

class AnonPeak:
    """The largest anonymous resident memory (RssAnon: heap, Arrow and tokenizer buffers) seen while running.
    RSS also counts the file pages of the memory-mapped Arrow files read and written, which the kernel shares
    with its page cache and drops under memory pressure; RssAnon is the memory a longer dataset would need."""
    def __enter__(self):
        import threading
        self.peak, self.done = _status('RssAnon'), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self
    def _watch(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, _status('RssAnon'))
    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _status('RssAnon'))

def rss_child(path, workload, vocab):
    "In a fresh process: load the saved dataset memory-mapped, prepare it with sft_nb, report peak RSS (MiB)"
    tok = W.bench_tokenizer(vocab, W.WORKLOADS[workload][1])
    ds = datasets.load_from_disk(os.path.join(path, 'ds'))
    ours(ds.select(range(50)), tok, workload, 1, False)  # imports and compiles, as in the timed runs
    before, before_anon = _hwm(), _status('RssAnon')
    t = time.perf_counter()
    with AnonPeak() as anon:
        out = ours(ds, tok, workload, 1, False)
    secs = time.perf_counter() - t
    peak = _hwm()
    print(json.dumps({'rows': len(ds), 'out_rows': len(out), 'before_mib': before, 'peak_mib': peak,
                      'before_anon_mib': before_anon, 'peak_anon_mib': anon.peak, 'seconds': secs}))

def case_run(workload, vocab, n, repeat, configs) -> list:
    "`run_case` in a fresh process: its lines printed, its cases returned"
    spec = json.dumps([workload, vocab, n, repeat, configs])
    res = subprocess.run([sys.executable, __file__, '--case-child', spec], capture_output=True, text=True)
    if res.returncode: raise RuntimeError(res.stderr[-3000:])
    *lines, last = res.stdout.strip().splitlines()
    for line in lines:
        if line.startswith(workload): print(line, flush=True)
    return json.loads(last)

def rss_run(workload, vocab, n):
    with tempfile.TemporaryDirectory() as d:
        _write_dataset(workload, n, d)
        env = {**os.environ, 'HF_DATASETS_CACHE': os.path.join(d, 'cache')}
        cmd = [sys.executable, __file__, '--rss-child', d, '--workloads', workload, '--vocabs', str(vocab)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode: raise RuntimeError(res.stderr[-3000:])
        return json.loads(res.stdout.strip().splitlines()[-1])

# ---------------------------------------------------------------- results
def result_rows(cases, rss):
    rows = []
    for c in cases:
        name = f"{c['workload']} {c['vocab'] // 1000}k {c['mode']} num_proc={c['num_proc']} ({c['rows']} rows)"
        rows.append(dict(workload=name, metric='prep seconds', sft_nb=round(c['sft_nb'], 3),
                         trl=round(c['trl'], 3), floor=round(c['floor'], 3),
                         floor_name=FLOOR_NAME,
                         ratio_vs_trl=round(c['sft_nb'] / c['trl'], 3),
                         ratio_vs_floor=round(c['sft_nb'] / c['floor'], 3), target='<= 1.3x floor',
                         met=c['sft_nb'] <= 1.3 * c['floor'], same_as_trl=c['agree']))
        if 'floor_with_offsets' in c:
            rows[-1].update(floor_with_offsets=round(c['floor_with_offsets'], 3),
                            ratio_vs_floor_with_offsets=round(c['sft_nb'] / c['floor_with_offsets'], 3))
    for workload, vocab, r in rss:
        rows.append(dict(workload=f"{workload} {vocab // 1000}k, {r['rows']} rows (memory-mapped)",
                         metric='peak anonymous MiB (RssAnon)', sft_nb=round(r['peak_anon_mib'], 1), trl=None,
                         floor=round(r['before_anon_mib'], 1), floor_name='RssAnon after loading, before preparing',
                         ratio_vs_trl=None, ratio_vs_floor=round(r['peak_anon_mib'] / r['before_anon_mib'], 3),
                         target='flat in rows', met=None, seconds=round(r['seconds'], 2),
                         peak_rss_mib=round(r['peak_mib'], 1)))
    if len(rss) > 1:  # flat: the largest run's peak within 1.25x the smallest's
        small, big = rss[0][2]['peak_anon_mib'], rss[-1][2]['peak_anon_mib']
        for r in rows[-len(rss):]: r['met'] = big <= 1.25 * small
    return rows

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=1000)
    ap.add_argument('--n-procs', type=int, default=8000, help="rows of the dataset_num_proc 1 vs 2 rows")
    ap.add_argument('--full', action='store_true', help="20,000 rows per workload and a 1M-conversation RSS run")
    ap.add_argument('--repeat', type=int, default=8)
    ap.add_argument('--workloads', default=','.join(W.WORKLOADS))
    ap.add_argument('--vocabs', default='32000,151000')
    ap.add_argument('--all', action='store_true', help="packing and num_proc=2 on every workload and tokenizer")
    ap.add_argument('--rss', default='2000,8000,32000', help="row counts of the peak-RSS runs ('' for none)")
    ap.add_argument('--rss-child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--case-child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--rss-only', action='store_true', help="only the memory runs (results to --out)")
    ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'prep.json'))
    ap.add_argument('--only', default='', help="just these configs, e.g. 'packed:1,truncate:2' (implies --merge)")
    ap.add_argument('--merge', action='store_true',
                    help="keep --out's other rows: a row measured now replaces the row of the same name")
    a = ap.parse_args()
    workloads, vocabs = a.workloads.split(','), [int(v) for v in a.vocabs.split(',')]
    if a.rss_child:
        rss_child(a.rss_child, workloads[0], vocabs[0])
        sys.exit()
    datasets.disable_caching()
    datasets.disable_progress_bars()
    import logging
    logging.getLogger('sft_nb').setLevel(logging.ERROR)
    if a.case_child:
        w, v, n, repeat, configs = json.loads(a.case_child)
        print(json.dumps(run_case(w, v, n, repeat, [tuple(c) for c in configs])))
        sys.exit()
    if a.full:
        a.n, a.rss = 20_000, '20000,100000,1000000'
    only = [(m, int(p)) for m, p in (c.split(':') for c in a.only.split(',') if c)]
    a.merge = a.merge or bool(only)
    old = json.load(open(a.out)) if a.merge and os.path.exists(a.out) else {'rows': []}
    kept = old['rows']
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    cmd = 'python bench/bench_prep.py' + (' --full' if a.full else '')
    if only: cmd += f" --only {a.only} --workloads {a.workloads} --vocabs {a.vocabs} --rss '{a.rss}'"
    if only and a.n != ap.get_default('n'): cmd += f" --n {a.n}"
    if only and a.repeat != ap.get_default('repeat'): cmd += f" --repeat {a.repeat}"
    if a.rss_only: cmd += f' --rss-only --rss {a.rss} --out {os.path.relpath(a.out)}'
    if kept: cmd = f"{old['command']}; then, re-measuring its rows: {cmd}"
    def write(cases, rss):
        "Rewritten after every case: a run cut short keeps what it measured (and with --merge, the other rows)"
        new = {r['workload']: r for r in result_rows(cases, rss)}
        rows = [new.pop(r['workload'], r) for r in kept]  # in place
        rows += list(new.values())
        with open(a.out, 'w') as f:
            json.dump({'bench': 'prep', 'machine': machine(extra=TOKENIZERS), 'command': cmd, 'load': os.getloadavg(),
                       'rows': rows}, f, indent=1)
    print(f"load: {os.getloadavg()}")
    cases, rss = [], []
    rss_sizes = [int(x) for x in a.rss.split(',') if x]
    def memory():
        for n in rss_sizes:
            r = rss_run('multi_turn', 32_000, n)
            print(f"multi_turn 32k, {n} rows memory-mapped: peak anonymous memory {r['peak_anon_mib']:.0f} MiB "
                  f"(after loading: {r['before_anon_mib']:.0f} MiB); peak RSS with the mapped files' pages "
                  f"{r['peak_mib']:.0f} MiB (after loading: {r['before_mib']:.0f} MiB); prepared in "
                  f"{r['seconds']:.1f} s", flush=True)
            rss.append(('multi_turn', 32_000, r))
            write(cases, rss)
    if a.rss_only:
        memory()
        print(f"wrote {a.out}")
        sys.exit()
    for k, (w, v, configs, n) in enumerate(matrix(workloads, vocabs, a.all or a.full, only, a.n, a.n_procs)):
        if k == len(workloads) * len(vocabs) and not only: memory()  # after the main numbers
        # the larger scaling rows: best of at most 5 (of 3, one run put multi-turn truncated at 1.97 s, 9% over the
        # same rows packed, which do more)
        cases += case_run(w, v, n, a.repeat if n == a.n else min(a.repeat, 5), configs)
        write(cases, rss)
    if len(rss) < len(rss_sizes) and not only: memory()
    print(f"load: {os.getloadavg()}")
    print(f"wrote {a.out}")
