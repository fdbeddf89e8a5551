"""Dataset preparation: sft_nb's `prepare_dataset` vs TRL 1.16's `SFTTrainer._prepare_dataset`, on the same multi-turn
conversations with assistant-only loss and truncation to 1024 tokens, in one run. Prints both times, the speed ratio
and whether input_ids and labels are identical row for row. It also times the one step no implementation can skip: the
Rust tokenizer over all the rendered texts in one batch call, ids only, which bounds the ratio any implementation
that uses it can reach on this machine; and sft_nb's rendering (by conversation shape) of the same texts.

    python bench/bench_data.py [--n 20000] [--num_proc N]
"""
import argparse, os, random, tempfile, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import datasets
from datasets import Dataset

from sft_nb.config import SFTConfig
from sft_nb.data import prepare_dataset
from sft_nb.tiny import tiny_tokenizer, tiny_pairs, SYSTEM_PROMPTS, CHATML_GENERATION_TEMPLATE

def conversations(n, seed=0):
    "Multi-turn chats of 1-8 turns; some answers are long, so ~5% of the rows pass 1024 tokens and get truncated"
    rng, pairs = random.Random(seed), iter(tiny_pairs(n * 8, seed))
    rows = []
    for i in range(n):
        msgs = [{'role': 'system', 'content': SYSTEM_PROMPTS[i % 3]}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 8)):
            p, a = next(pairs)
            a = ' '.join([a] * (rng.randint(50, 300) if rng.random() < 0.05 else rng.randint(1, 6)))
            msgs += [{'role': 'user', 'content': p}, {'role': 'assistant', 'content': a}]
        rows.append({'messages': msgs})
    return Dataset.from_list(rows)

def trl_prepare(ds, tok, max_length, num_proc):
    from trl import SFTConfig as TRLConfig, SFTTrainer
    args = TRLConfig(output_dir=tempfile.mkdtemp(), report_to=[], assistant_only_loss=True, max_length=max_length,
                     dataset_num_proc=num_proc, use_cpu=True, bf16=False)
    trainer = SFTTrainer.__new__(SFTTrainer)  # only the dataset preparation is timed, not model loading
    trainer._tokenizer, trainer.completion_only_loss, trainer.chat_template = tok, False, None
    return trainer._prepare_dataset(ds, tok, args, packing=False, formatting_func=None, dataset_name='train')

def ours_prepare(ds, tok, max_length, num_proc):
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], assistant_only_loss=True, max_length=max_length, dataset_num_proc=num_proc)
    return prepare_dataset(ds, tok, args)

def timed(f, *a):
    t = time.perf_counter()
    out = f(*a)
    return out, time.perf_counter() - t

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=20000)
    ap.add_argument('--max_length', type=int, default=1024)
    ap.add_argument('--num_proc', type=int, default=None)
    ap.add_argument('--repeat', type=int, default=2, help="interleaved runs of each; the best time counts (shared machines are noisy)")
    a = ap.parse_args()
    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok, ds = tiny_tokenizer(CHATML_GENERATION_TEMPLATE), conversations(a.n)
    # first, while the Rust tokenizer may still use every core (after a fork, `tokenizers` turns its threads off)
    from sft_nb.stencil import StencilRenderer
    from sft_nb.tokens import fast_backend
    render, backend = StencilRenderer(tok), fast_backend(tok)
    texts, t_render = timed(lambda: [render(r, markers=True)[0] for r in ds[:]['messages']])
    # ids only, all sft_nb asks of a byte-level tokenizer (`sft_nb.offsets`); the encodings dropped before the timed runs
    t_encode = timed(backend.encode_batch_fast, texts, False)[1]
    t_ours = t_trl = float('inf')
    for _ in range(a.repeat):
        ours, t = timed(ours_prepare, ds, tok, a.max_length, a.num_proc)
        t_ours = min(t_ours, t)
        trl, t = timed(trl_prepare, ds, tok, a.max_length, a.num_proc)
        t_trl = min(t_trl, t)
    same = ours['input_ids'][:] == trl['input_ids'][:] and ours['labels'][:] == trl['labels'][:]
    n_trunc = sum(len(x) == a.max_length for x in ours['input_ids'])
    print(f"{a.n} conversations, assistant_only_loss, max_length={a.max_length} ({n_trunc} rows truncated), num_proc={a.num_proc}")
    print(f"TRL 1.16: {t_trl:.2f} s   sft_nb: {t_ours:.2f} s   speed-up: {t_trl / t_ours:.1f}x   (best of {a.repeat}, {os.cpu_count()} CPUs)")
    print(f"floor: the Rust tokenizer alone takes {t_encode:.2f} s ({os.cpu_count()} threads): at most {t_trl / t_encode:.1f}x TRL here; "
          f"sft_nb's time beyond it: {t_ours - t_encode:.2f} s, of which rendering (by shape) {t_render:.2f} s")
    print(f"identical input_ids and labels: {same} ({len(ours)} vs {len(trl)} rows)")
