"""Packing and collation: sft_nb vs TRL 1.16 on the same data, in one run (CPU).

1. Packing quality on 200k documents with a long-tailed length distribution: rows, efficiency (real tokens / row
   capacity), truncated tokens, and packing time, for `bfd` and `bfd_split`.
2. Training throughput with packing on: the tiny Llama, sdpa attention, the same tokenized chats packed into rows of
   `MAX_LEN` by each library's `pack_dataset`, batches from each library's collator (TRL's SFTTrainer uses
   `padding_free=True` with bfd packing), the same plain AdamW loop. Throughput counts real (non-pad) tokens.

Run: `python bench/bench_packing.py` (about 3 minutes on 2 cores).
"""
import os, time, warnings
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
    for strategy in ('bfd', 'bfd_split'):
        res = {}
        for name, fn in (('sft_nb', pack_dataset), ('trl', trl_pack_dataset)):
            t0 = time.time(); packed = fn(ds, max_len, strategy); secs = time.time() - t0
            rows, eff = quality(packed, max_len)
            trunc = int(lens.sum() - eff * rows * max_len + 0.5)
            res[name] = (rows, eff, trunc, secs)
            print(f"{strategy:10} {name:7} {rows:8,} {eff:10.4f} {trunc:10,} {secs:8.2f}")
        assert res['sft_nb'][1] >= res['trl'][1] and res['sft_nb'][2] <= res['trl'][2]
    return res

def chat_docs(tok, n):
    texts = [tok.apply_chat_template(c['messages'], tokenize=False) for c in tiny_conversations(n, seed=0, max_turns=12)]
    ids = tok(texts, add_special_tokens=False)['input_ids']
    return Dataset.from_dict({'input_ids': ids, 'labels': ids})

def batches(rows, collator, n, batch=BATCH):
    "The first `n` batches, collated once up front so only training is timed"
    return [collator([rows[j] for j in range(i * batch, (i + 1) * batch)]) for i in range(n)]

def train_tokens_per_s(batches, tok, real_tokens):
    model = tiny_model(tokenizer=tok, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    def step(b):
        loss = model(**{**b, 'use_cache': False}).loss
        loss.backward(); opt.step(); opt.zero_grad()
    for b in batches[:WARMUP]: step(b)
    t0 = time.time()
    for b in batches[WARMUP:]: step(b)
    return sum(real_tokens(b) for b in batches[WARMUP:]) / (time.time() - t0)

def real_tokens(pad_id):
    return lambda b: int((b['input_ids'] != pad_id).sum())

if __name__ == '__main__':
    bench_quality()
    tok = tiny_tokenizer()
    ds = chat_docs(tok, 4000)
    n = STEPS + WARMUP
    ours = batches(pack_dataset(ds, MAX_LEN, 'bfd'), DataCollatorForLanguageModeling(tok.pad_token_id), n)
    trl = batches(trl_pack_dataset(ds, MAX_LEN, 'bfd'), TRLCollator(tok.pad_token_id, padding_free=True), n)
    print(f"\n## Training throughput: tiny Llama (hidden 128, 2 layers), sdpa, {BATCH} rows of {MAX_LEN}, {STEPS} timed steps")
    print(f"batch shapes: sft_nb {tuple(ours[0]['input_ids'].shape)}, trl {tuple(trl[0]['input_ids'].shape)}")
    count = real_tokens(tok.pad_token_id)
    ours_tps = train_tokens_per_s(ours, tok, count)
    trl_tps = train_tokens_per_s(trl, tok, count)
    print(f"sft_nb packed: {ours_tps:10,.0f} real tokens/s")
    print(f"trl packed:    {trl_tps:10,.0f} real tokens/s")
    padded = batches(ds, TRLCollator(tok.pad_token_id), n, batch=BATCH * 8)
    pad_tps = train_tokens_per_s(padded, tok, count)
    print(f"trl padded:    {pad_tps:10,.0f} real tokens/s (no packing, {BATCH * 8} chats per batch, for context)")
    print(f"ratio sft_nb packed / trl packed: {ours_tps / trl_tps:.2f}x")
