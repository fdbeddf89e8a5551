"""Saving at realistic size: sft_nb's crash-safe, verified `save_model` vs a plain `save_pretrained` vs TRL 1.16.

Model: a Qwen2-shaped causal LM built locally (hidden 1,024, 16 layers, MLP 2,816, vocabulary 32,000, untied head:
~246M parameters, float32: ~1.0 GB on disk), random init. One process, contenders interleaved round-robin
(ROUNDS rounds, the order rotated each round so that each contender runs first, second and third: the write after
another's 1 GB delete or sync is slower, and a fixed order credited that to whoever ran first), one untimed warm-up
save each, `os.sync()` before each timed call so that no contender pays for another's pending writes.

Rows:
- save full: `trainer.save_model(dir)` of sft_nb's SFTTrainer (staged, verified, renamed into place, card and loss
  plot) and of TRL's SFTTrainer, vs the floor `model.save_pretrained(dir)` + tokenizer.
- save LoRA: the same with LoRA adapters (r 16, all linear layers) on that model.
- checkpoint full / LoRA: the stall one checkpoint adds to training, `trainer._save_checkpoint(model, None)` (what
  the Trainer calls every `save_steps`), sft_nb vs TRL vs the floor, `transformers.Trainer`'s own
  `_save_checkpoint`. Full: model only (`save_only_model=True`, 1 GB); LoRA: adapter, AdamW state, scheduler, RNG.
sft_nb's fsync (and a new loss plot) run on a background thread after its save returns (see nbs/07b_checkpoints):
the bench waits for it untimed after each sft_nb call (`trainer.wait_for_saves()`), so that it never overlaps
another contender's timing, and prints how long it took ("flush"); neither TRL nor save_pretrained fsyncs at all.
Each trainer carries 200 logged losses, so its card has a loss plot as after a real run, and one more loss is
logged before each round (as between two saves in training), so no save reuses the previous plot.

Run: `PYTHONPATH=. python bench/bench_save.py` (a few minutes on 2 cores; writes ~1 GB per full save).
Writes bench/results/save.json.
"""
import json, os, platform, shutil, statistics, sys, tempfile, time
os.environ.update(HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', WANDB_DISABLED='true')
import warnings
warnings.filterwarnings('ignore')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import tokenizer, machine as _machine  # the 32k tokenizer; the machine line

ROUNDS = int(os.environ.get('BENCH_ROUNDS', 5 if '--full' in sys.argv else 3))
THREADS = 2


def model():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, bos_token_id=None, use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def data():
    from datasets import Dataset
    return Dataset.from_list([{'input_ids': list(range(3, 40)), 'completion_mask': [0] * 10 + [1] * 27}] * 8)


def _args(kind, out, **kw):
    common = dict(output_dir=out, report_to=[], use_cpu=True, disable_tqdm=True, bf16=False, save_strategy='no',
                  max_steps=10, logging_steps=1, seed=0, save_only_model=False) | kw
    if kind == 'trl':
        from trl import SFTConfig
    elif kind == 'sft_nb':
        from sft_nb import SFTConfig
    else:
        from transformers import TrainingArguments
        return TrainingArguments(**common)
    return SFTConfig(**common, packing=False, max_length=64, dataset_num_proc=None)


def trainers(m, tok, ds, tmp, **kw):
    "The three trainers around the same model, each with a run's worth of logged losses"
    from transformers import Trainer, TrainerState
    from transformers.trainer_callback import ExportableState
    from trl import SFTTrainer as TRLTrainer
    from sft_nb import SFTTrainer
    history = [{'loss': 10.0 - i / 50, 'grad_norm': 1.0, 'learning_rate': 1e-4, 'step': i + 1} for i in range(200)]
    out = {'plain': Trainer(model=m, args=_args('plain', f"{tmp}/plain", **kw), train_dataset=ds,
                            processing_class=tok),
           'trl': TRLTrainer(model=m, args=_args('trl', f"{tmp}/trl", **kw), train_dataset=ds,
                             processing_class=tok),
           'sft_nb': SFTTrainer(model=m, args=_args('sft_nb', f"{tmp}/sft_nb", **kw), train_dataset=ds,
                                processing_class=tok)}
    for t in out.values():
        # the state `train()` would start from (its stateful callbacks are saved in checkpoints)
        stateful = [cb for cb in [*t.callback_handler.callbacks, t.control] if isinstance(cb, ExportableState)]
        t.state = TrainerState(stateful_callbacks=stateful)
        t.state.log_history = [dict(h) for h in history]
        t.state.global_step = 200
    return out


def timed(fn):
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flushed(t, flushes):
    "Wait for sft_nb's background flush, untimed in the save, timed on its own (no `os.sync` first: it would flush)"
    if hasattr(t, 'wait_for_saves'):
        t0 = time.perf_counter()
        t.wait_for_saves()
        flushes.append(time.perf_counter() - t0)


def order(r):
    "Each round rotated: every contender runs first, second and third in turn"
    names = ['plain', 'trl', 'sft_nb']
    return names[r % 3:] + names[:r % 3]


def save_rows(ts, m, tok, tmp, what):
    "Best-of-ROUNDS seconds of each contender's final save"
    times = {k: [] for k in ('plain', 'trl', 'sft_nb')}

    flushes = []

    def plain(d):
        m.save_pretrained(d)
        tok.save_pretrained(d)
    for r in range(-1, ROUNDS):  # round -1: the warm-up, untimed
        new_loss(ts, r)
        for k in order(r):
            d = f"{tmp}/save-{k}-{r}"
            fn = (lambda: plain(d)) if k == 'plain' else (lambda: ts[k].save_model(d))
            took = timed(fn)
            flushed(ts[k], flushes if r >= 0 else [])
            if r >= 0: times[k].append(took)
            shutil.rmtree(d)
        if r >= 0: print(what, order(r), {k: f"{v[-1]:.2f}" for k, v in times.items()}, flush=True)
    print(f"{what}: sft_nb's background flush took {min(flushes):.2f}-{max(flushes):.2f} s after the save returned")
    return times


def checkpoint_rows(ts, tmp, what):
    "Best-of-ROUNDS seconds of one `_save_checkpoint` (the stall in training), each trainer"
    times = {k: [] for k in ('plain', 'trl', 'sft_nb')}
    flushes = []
    for r in range(-1, ROUNDS):  # round -1: the warm-up, untimed
        new_loss(ts, r)
        for k in order(r):
            t = ts[k]
            t.state.global_step = 300 + r
            took = timed(lambda: t._save_checkpoint(t.model, None))
            flushed(t, flushes if r >= 0 else [])
            if r >= 0: times[k].append(took)
            shutil.rmtree(f"{t.args.output_dir}/checkpoint-{300 + r}")
        if r >= 0: print(what, order(r), {k: f"{v[-1]:.2f}" for k, v in times.items()}, flush=True)
    print(f"{what}: sft_nb's background flush took {min(flushes):.2f}-{max(flushes):.2f} s after the stall")
    return times


def new_loss(ts, r):
    "One more logged loss before each round, as between two saves in training: every card's plot is drawn anew"
    for t in ts.values():
        t.state.log_history.append({'loss': 6.0 - (r + 1) / 10, 'grad_norm': 1.0, 'learning_rate': 1e-4, 'step': 202 + r})


def with_optimizer(ts):
    "Give each trainer an AdamW with state (one step on zero gradients), as mid-training"
    import torch
    for t in ts.values():
        t.create_optimizer_and_scheduler(num_training_steps=1000)
        for p in t.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)


def row(name, times, metric, floor_name, target, limit):
    s, t, p = (min(times[k]) for k in ('sft_nb', 'trl', 'plain'))
    print(f"{name}: sft_nb {s:.2f} s, TRL {t:.2f} s, {floor_name} {p:.2f} s -> sft_nb/floor {s / p:.2f}x, "
          f"sft_nb/TRL {s / t:.2f}x  (all: {times})")
    return {'workload': name, 'metric': metric, 'sft_nb': round(s, 3), 'trl': round(t, 3), 'floor': round(p, 3),
            'floor_name': floor_name, 'ratio_vs_trl': round(s / t, 3), 'ratio_vs_floor': round(s / p, 3),
            'target': target, 'met': s <= limit * p}


def main():
    import torch
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(THREADS)
    tok, ds, rows, loads = tokenizer(), data(), [], []
    m = model()
    n = sum(p.numel() for p in m.parameters())
    size = f"Qwen2 {n / 1e6:.0f}M fp32 ({n * 4 / 2**30:.2f} GiB)"
    with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_TMP')) as tmp:
        loads.append(os.getloadavg()[0])
        ts = trainers(m, tok, ds, f"{tmp}/full")
        rows.append(row(f"save full: {size}", save_rows(ts, m, tok, tmp, 'save full'), 'save seconds',
                        'save_pretrained', '<= 1.2x floor', 1.2))
        ts = trainers(m, tok, ds, f"{tmp}/ckfull", save_only_model=True)
        rows.append(row(f"checkpoint full, model only: {size}", checkpoint_rows(ts, tmp, 'checkpoint full'),
                        'checkpoint stall seconds', 'Trainer checkpoint', '<= 1x floor (+5% noise)', 1.05))
        loads.append(os.getloadavg()[0])
        del ts
        lora = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules='all-linear', task_type='CAUSAL_LM'))
        ts = trainers(lora, tok, ds, f"{tmp}/lora")
        rows.append(row(f"save LoRA r16: {size} base", save_rows(ts, lora, tok, tmp, 'save LoRA'), 'save seconds',
                        'save_pretrained', '<= 1.2x floor', 1.2))
        with_optimizer(ts)
        rows.append(row(f"checkpoint LoRA r16 + AdamW state: {size} base", checkpoint_rows(ts, tmp, 'checkpoint LoRA'),
                        'checkpoint stall seconds', 'Trainer checkpoint', '<= 1x floor (+5% noise)', 1.05))
        loads.append(os.getloadavg()[0])
    os.makedirs('bench/results', exist_ok=True)
    command = 'python bench/bench_save.py' + (' --full' if '--full' in sys.argv else '')
    out = {'bench': 'save', 'machine': _machine(), 'command': command, 'rows': rows,
           'load_average': [round(min(loads), 2), round(max(loads), 2)]}
    with open('bench/results/save.json', 'w') as f:
        json.dump(out, f, indent=1)
    print(f"load average (1 min) while measured: {min(loads):.1f}-{max(loads):.1f}")


if __name__ == '__main__':
    main()
