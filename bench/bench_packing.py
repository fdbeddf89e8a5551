"""Packing and collation: sft_nb vs TRL 1.16 on the same data, in one run (CPU).

1. Packing quality on 200k documents with a long-tailed length distribution: rows, efficiency (real tokens / row
   capacity), truncated tokens, and packing time, for `bfd` and `bfd_split`.
2. Training throughput with packing on: the tiny Llama, sdpa attention, the same tokenized chats packed into rows of
   `MAX_LEN` by each library's `pack_dataset`, batches from each library's collator (TRL's SFTTrainer uses
   `padding_free=True` with bfd packing), the same plain AdamW loop from the same initial weights. Throughput counts
   real (non-pad) tokens; batches are collated before timing. Both sides' batches are nearly full rows (TRL packs in
   blocks of 1000 documents, so its first rows hold other documents than ours, not fewer tokens).

Run: `python bench/bench_packing.py` (about 3 minutes on 2 cores).
"""
import os, sys, time, warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import row, write  # noqa: E402
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np, torch
from datasets import Dataset, disable_progress_bars
from trl.data_utils import pack_dataset as trl_pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator
from sft_nb.packing import pack_dataset, DataCollatorForLanguageModeling
from sft_nb.tiny import tiny_tokenizer, tiny_model, tiny_conversations

MAX_LEN, BATCH, STEPS, WARMUP = 1024, 8, 6, 1
torch.set_num_threads(2)
warnings.filterwarnings('ignore')
disable_progress_bars()

def quality(ds, max_len):
    "Rows and efficiency (real tokens / row capacity) of a packed dataset"
    total = int(np.sum([len(x) for x in ds.with_format('arrow')['input_ids'].to_pylist()]))
    return len(ds), total / (len(ds) * max_len)

def bench_quality(n=200_000, max_len=MAX_LEN):
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(5.0, 1.0, n).astype(int), 1, 4 * max_len)
    ids = np.arange(lens.sum()) % 1000
    ds = Dataset.from_dict({'input_ids': np.split(ids, np.cumsum(lens)[:-1])})
    print(f"\n## Packing quality: {n:,} documents, {lens.sum():,} tokens, {(lens > max_len).sum():,} longer than {max_len}")
    print(f"{'strategy':10} {'library':7} {'rows':>8} {'efficiency':>10} {'truncated':>10} {'seconds':>8}")
    out = {}
    for strategy in ('bfd', 'bfd_split'):
        res = out[strategy] = {}
        for name, fn in (('sft_nb', pack_dataset), ('trl', trl_pack_dataset)):
            t0 = time.time()
            packed = fn(ds, max_len, strategy)
            secs = time.time() - t0
            rows, eff = quality(packed, max_len)
            trunc = int(lens.sum() - eff * rows * max_len + 0.5)
            res[name] = (rows, eff, trunc, secs)
            print(f"{strategy:10} {name:7} {rows:8,} {eff:10.4f} {trunc:10,} {secs:8.2f}")
        assert res['sft_nb'][1] >= res['trl'][1] and res['sft_nb'][2] <= res['trl'][2]
    return out

def chat_docs(tok, n):
    texts = [tok.apply_chat_template(c['messages'], tokenize=False) for c in tiny_conversations(n, seed=0, max_turns=12)]
    ids = tok(texts, add_special_tokens=False)['input_ids']
    return Dataset.from_dict({'input_ids': ids, 'labels': ids})

def batches(rows, collator, n, batch=BATCH):
    "The first `n` batches, collated once up front so only training is timed"
    return [collator([rows[j] for j in range(i * batch, (i + 1) * batch)]) for i in range(n)]

class Run:
    "One training run: its own model (same initial weights for every run), optimizer, batches and clock"
    def __init__(self, name, batches, tok):
        self.name, self.batches, self.secs, self.tokens = name, batches, 0., 0
        self.pad_id = tok.pad_token_id
        self.model = tiny_model(tokenizer=tok, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def step(self, i, timed=True):
        b = self.batches[i]
        t0 = time.perf_counter()
        self.model(**{**b, 'use_cache': False}).loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        if timed:
            self.secs += time.perf_counter() - t0
            self.tokens += int((b['input_ids'] != self.pad_id).sum())

    @property
    def tokens_per_s(self): return self.tokens / self.secs

def interleaved(runs):
    "Step the runs in turn, so a busy machine slows them all alike"
    for i in range(WARMUP + STEPS):
        for r in runs: r.step(i, timed=i >= WARMUP)
    return runs

def result_rows(quality, runs, n=200_000):
    "The rows of bench/results/packing.json"
    (rows, eff, trunc, secs), (trows, teff, ttrunc, tsecs) = quality['bfd']['sft_nb'], quality['bfd']['trl']
    docs = f"{n:,} documents into rows of {MAX_LEN} (bfd)"
    per_m = [1e6 / r.tokens_per_s for r in runs]
    return [row(f'packing efficiency: {docs}', 'real tokens / row capacity', eff, teff, target='>= TRL',
                met=eff >= teff, truncated={'sft_nb': trunc, 'trl': ttrunc}),
            row(f'packing time: {docs}', 'prep seconds', secs, tsecs, target='< TRL', met=secs < tsecs),
            row(f'packed training, tiny Llama (hidden 128, 2 layers), sdpa, {BATCH} rows of {MAX_LEN}',
                'seconds per million real tokens', per_m[0], per_m[1], per_m[2], 'TRL padded (no packing)',
                target='< TRL packed', met=per_m[0] < per_m[1])]

if __name__ == '__main__':
    packing_quality = bench_quality()
    tok = tiny_tokenizer()
    ds = chat_docs(tok, 4000)
    n = STEPS + WARMUP
    ours = batches(pack_dataset(ds, MAX_LEN, 'bfd'), DataCollatorForLanguageModeling(tok.pad_token_id, block_diagonal=True), n)
    trl = batches(trl_pack_dataset(ds, MAX_LEN, 'bfd'), TRLCollator(tok.pad_token_id, padding_free=True), n)
    per_batch = BATCH * MAX_LEN // int(np.mean([len(x) for x in ds['input_ids']]))   # about as many real tokens per step
    padded = batches(ds, TRLCollator(tok.pad_token_id), n, batch=per_batch)
    print(f"\n## Training throughput: tiny Llama (hidden 128, 2 layers), sdpa, {BATCH} rows of {MAX_LEN}, {STEPS} timed steps")
    print(f"batch shapes: sft_nb {tuple(ours[0]['input_ids'].shape)}, trl {tuple(trl[0]['input_ids'].shape)}, "
          f"trl padded {tuple(padded[0]['input_ids'].shape)}")
    runs = interleaved([Run('sft_nb packed', ours, tok), Run('trl packed', trl, tok), Run('trl padded', padded, tok)])
    for r in runs: print(f"{r.name:14} {r.tokens_per_s:10,.0f} real tokens/s")
    print(f"ratio sft_nb packed / trl packed: {runs[0].tokens_per_s / runs[1].tokens_per_s:.2f}x")
    write('packing', 'python bench/bench_packing.py', result_rows(packing_quality, runs), threads=2)
