"""sft_nb's loss vs TRL 1.16's SFTTrainer (and a plain full-logits Trainer) on the same model, data and seed, on CPU.

1. Loss curve: the tiny model, 10 steps, no packing, same init and batches: max relative difference to TRL.
2. Speed and memory: a Qwen2-shaped model with a 151,936-token vocabulary and a small hidden size, sequence 2,048,
   batch 1, assistant-only labels. Each trainer runs in its own process; peak memory is the process's peak RSS
   during `train()` (reset just before). Prints step time and peak memory, and the ratios to TRL.

Run: `PYTHONPATH=. python bench/bench_loss.py` (a few minutes on 2 cores).
"""
import json, os, statistics, subprocess, sys, time
os.environ.update(HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', WANDB_DISABLED='true')
import warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import row, write  # noqa: E402
warnings.filterwarnings('ignore')

VOCAB, HIDDEN, LAYERS, SEQ, STEPS, ROUNDS = 151936, 256, 2, 2048, 4, 2

def _rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

def _chat_row(rng, seq, vocab):
    "One row of `seq` tokens: alternating prompt turns (no label) and assistant turns (labelled)"
    ids, labels = [], []
    while len(ids) < seq:
        p, a = rng.randint(60, 240), rng.randint(40, 200)
        turn = [rng.randrange(vocab) for _ in range(p + a)]
        ids += turn
        labels += [-100] * p + turn[p:]
    return {'input_ids': ids[:seq], 'labels': labels[:seq]}

def _args(cls, out, **kw):
    kw = dict(output_dir=out, per_device_train_batch_size=1, learning_rate=1e-4, logging_steps=1, save_strategy='no',
              report_to=[], seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, lr_scheduler_type='constant',
              remove_unused_columns=False, bf16=False) | kw  # TRL's SFTConfig turns bf16 on by default
    if cls.__name__ == 'SFTConfig': kw |= dict(max_length=None, packing=False, dataset_num_proc=None)
    return cls(**kw)

def _trainer(kind, model, ds, tok, out, **kw):
    "A trainer of `kind`: 'trl' (TRL's SFTTrainer), 'plain' (Trainer, model's own loss on full logits), 'ours'"
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from sft_nb.loss_trainer import SFTLossMixin
    if kind == 'trl': return SFTTrainer(model=model, args=_args(SFTConfig, out, **kw), train_dataset=ds, processing_class=tok)
    cls = Trainer if kind == 'plain' else type('LossTrainer', (SFTLossMixin, Trainer), {})
    return cls(model=model, args=_args(TrainingArguments, out, **kw), train_dataset=ds,
               data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))

def _losses(t): return [h['loss'] for h in t.state.log_history if 'loss' in h]

def loss_curve():
    "Max relative difference of the first 10 losses, sft_nb vs TRL"
    import tempfile
    from datasets import Dataset
    from sft_nb.tiny import tiny_model, tiny_tokenizer, tiny_conversations
    tok = tiny_tokenizer()
    rows = []
    for c in tiny_conversations(64):
        o = tok.apply_chat_template(c['messages'], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        rows.append({'input_ids': list(o['input_ids']), 'labels': [t if m else -100 for t, m in zip(o['input_ids'], o['assistant_masks'])]})
    ds, curves = Dataset.from_list(rows), {}
    with tempfile.TemporaryDirectory() as d:
        for kind in ('trl', 'ours'):
            t = _trainer(kind, tiny_model(tokenizer=tok), ds, tok, f"{d}/{kind}", per_device_train_batch_size=4,
                         max_steps=10, learning_rate=3e-3)
            t.train()
            curves[kind] = _losses(t)
    return max(abs(a - b) / abs(b) for a, b in zip(curves['ours'], curves['trl'])), curves

def _child(kind):
    "Train STEPS steps of `kind` on the large-vocabulary model; print JSON with step times and peak RSS"
    import random, tempfile, torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from sft_nb.tiny import tiny_config, tiny_tokenizer
    torch.set_num_threads(2)
    tok = tiny_tokenizer()
    rng = random.Random(0)
    ds = Dataset.from_list([_chat_row(rng, SEQ, VOCAB) for _ in range(STEPS)])
    cfg = tiny_config('qwen2', vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    times = []
    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k): self.t0 = time.perf_counter()
        def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t0)
    with tempfile.TemporaryDirectory() as d:
        t = _trainer(kind, model, ds, tok, d, max_steps=STEPS)
        t.add_callback(Timer())
        base = _rss('VmRSS')
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # reset the peak RSS to now
        t.train()
        peak = _rss('VmHWM')
    labelled = sum(sum(l != -100 for l in r[1:]) for r in ds['labels'][:]) / (STEPS * SEQ)
    print(json.dumps({'times': times, 'peak': peak, 'base': base, 'losses': _losses(t), 'labelled': labelled}))

def speed_memory():
    "Each trainer in its own process, ROUNDS times round-robin (other load on the machine comes and goes): the best round"
    res = {}
    for _ in range(ROUNDS):
        for kind in ('trl', 'plain', 'ours'):
            r = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True)
            if r.returncode: raise RuntimeError(f"{kind} run failed:\n{r.stderr[-4000:]}")
            new = json.loads(r.stdout.strip().splitlines()[-1])
            new['step'] = statistics.median(new['times'][1:])
            if kind not in res or new['step'] < res[kind]['step']: res[kind] = new | {'peak': max(new['peak'], res.get(kind, new)['peak'])}
    return res

if __name__ == '__main__':
    if len(sys.argv) > 1:
        _child(sys.argv[1])
        sys.exit()
    rel, curves = loss_curve()
    print(f"loss curve, 10 steps, tiny model: max relative difference to TRL = {rel:.2e} (target <= 1e-4)")
    print("  TRL   ", ' '.join(f"{x:.4f}" for x in curves['trl']))
    print("  sft_nb", ' '.join(f"{x:.4f}" for x in curves['ours']))
    res = speed_memory()
    print(f"\nvocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, seq {SEQ}, batch 1, assistant-only "
          f"({res['ours']['labelled']:.0%} of tokens labelled), {STEPS} steps, step time = median after the first, best of {ROUNDS} rounds")
    step = {k: v['step'] for k, v in res.items()}
    mem = {k: v['peak'] / 2**20 for k, v in res.items()}
    for k, name in (('trl', 'TRL 1.16 SFTTrainer'), ('plain', 'plain Trainer, full logits'), ('ours', 'sft_nb SFTLossMixin')):
        print(f"  {name:28s} step {step[k]:6.2f} s   peak RSS {mem[k]:7.0f} MiB (+{(res[k]['peak'] - res[k]['base']) / 2**20:5.0f} MiB in train)"
              f"   first losses {' '.join(f'{x:.4f}' for x in res[k]['losses'][:3])}")
    print(f"  step time  sft_nb / TRL = {step['ours'] / step['trl']:.2f}x (target <= 0.5x);  sft_nb / plain = {step['ours'] / step['plain']:.2f}x;"
          f"  TRL / plain = {step['trl'] / step['plain']:.2f}x")
    print(f"  peak RSS   sft_nb / TRL = {mem['ours'] / mem['trl']:.2f}x (target <= 1x);  sft_nb / plain = {mem['ours'] / mem['plain']:.2f}x")
    shape = f"vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, seq {SEQ}, batch 1, assistant-only"
    write('loss', 'python bench/bench_loss.py', [
        row('loss curve, 10 steps, tiny model, same init and batches', 'max relative difference to TRL', rel,
            target='<= 1e-4', met=rel <= 1e-4),
        row(f'step time: {shape}', 'step seconds', step['ours'], step['trl'], step['plain'],
            'plain Trainer, full logits', '<= 0.5x TRL', step['ours'] / step['trl'] <= 0.5),
        row(f'peak memory: {shape}', 'peak MiB', mem['ours'], mem['trl'], mem['plain'],
            'plain Trainer, full logits', '<= 1x TRL', mem['ours'] <= mem['trl'])])
