"""Training step time: sft_nb's SFTTrainer vs TRL 1.16's SFTTrainer vs a plain PyTorch loop, on the same batches.

Model: a Qwen2-shaped causal LM built locally (hidden 512, 8 layers, 8 heads / 2 KV heads, MLP 1,408, vocabulary
32,000, untied head: ~55M parameters), random init (seed 0), float32 on CPU. Data: a pre-tokenized
prompt-completion dataset with a realistic length distribution (log-normal, median ~65 tokens, ~8% past
`max_length`, truncated), `completion_mask` labelling only completions.

Workloads:
- padded: `packing=False`, `max_length=128`, batch 2 (padded to the longest row of each batch)
- packed: `packing=True` (BFD), `max_length=256`, batch 1 (one packed row of up to 256 tokens)
(Small batches, so that a step takes about a second on 2 cores; the model's shape is what makes attention, MLP
and the 32k LM head weigh as in real models.)

Contenders, each in its own process, round-robin (ROUNDS rounds; other load on the machine comes and goes):
- sft_nb: `sft_nb.SFTTrainer`
- trl: `trl.SFTTrainer` (1.16)
- plain: the floor. The batches sft_nb's trainer would draw (same sampler, same collator), collated beforehand,
  then a bare loop: `model(**batch)` (the model's own loss), `loss.backward()`, `AdamW.step()`, `zero_grad()`.
All three use `torch.set_num_threads(THREADS)`, the same init, lr 1e-4 constant, and the optimizer both trainers
default to (`optim='adamw_torch_fused'`: `torch.optim.AdamW(fused=True)`, one pass over the weights), logging every
step (the most logging a user can ask for). What the floor leaves out, and the trainers do:
- gradient clipping: both trainers clip at `max_grad_norm=1.0` (their default; two more passes over the gradients,
  about 5% of a step here); the floor does not clip. So the floor is the strict "forward + backward + AdamW".
- activation checkpointing is off in all three (`gradient_checkpointing=False` in both trainers). TRL's default
  (and so sft_nb's) turns it on: the forward then runs twice, a memory-for-time trade that is the same in both
  trainers and no cost of the Trainer; `--checkpointing` turns it on in all three (the floor through
  `model.activation_checkpointing_enable()`, as `Trainer` does), to see the default configuration's step times.

Step time: the time between consecutive step ends (so it includes data loading, logging and callbacks), median over
the steps after WARMUP; the best round counts. Fairness check: the first losses of the three must agree.

Run: `PYTHONPATH=. python bench/bench_train.py` (a few minutes on 2 cores); `--full` runs more steps and rounds;
`--checkpointing` as above (it writes bench/results/train_checkpointing.json instead).
Writes bench/results/train.json after each complete round (a run cut short keeps its complete rounds;
`--from-log LOG LO-HI` rebuilds the file from a run's printed `round ...` lines and the load average seen).
"""
import json, os, platform, statistics, subprocess, sys, time
os.environ.update(HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', WANDB_DISABLED='true')
import warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import machine  # noqa: E402
warnings.filterwarnings('ignore')

VOCAB, HIDDEN, LAYERS, MLP = 32000, 512, 8, 1408
THREADS, WARMUP = int(os.environ.get('BENCH_THREADS', 2)), 2
FULL = '--full' in sys.argv
CHECKPOINTING = '--checkpointing' in sys.argv
STEPS, ROUNDS = (20, 5) if FULL else (5, 3)
STEPS, ROUNDS = int(os.environ.get('BENCH_STEPS', STEPS)), int(os.environ.get('BENCH_ROUNDS', ROUNDS))
WORKLOADS = {'padded': dict(packing=False, max_length=128, per_device_train_batch_size=2),
             'packed': dict(packing=True, max_length=256, per_device_train_batch_size=1)}
CONTENDERS = ('plain', 'trl', 'sft_nb')
NAME = 'train_checkpointing' if CHECKPOINTING else 'train'


def tokenizer():
    "A fast tokenizer with a 32k vocabulary (word-level: the data is pre-tokenized, only ids and specials matter)"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {'<|pad|>': 0, '<|endoftext|>': 1, '<|im_end|>': 2} | {f"t{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<|endoftext|>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|pad|>',
                                   model_max_length=4096)


def dataset(n=512, seed=0):
    "Prompt-completion rows: log-normal lengths (median ~65 tokens, ~8% over 128), completion-only labels"
    import random
    from datasets import Dataset
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = min(100, max(8, int(rng.lognormvariate(3.1, 0.7))))
        c = max(4, int(rng.lognormvariate(3.6, 0.7)))
        ids = [rng.randrange(3, VOCAB) for _ in range(p + c)] + [2]
        rows.append({'input_ids': ids, 'completion_mask': [0] * p + [1] * (c + 1)})
    return Dataset.from_list(rows)


def model():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, bos_token_id=None, use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def config(kind, out, workload, **kw):
    common = dict(output_dir=out, learning_rate=1e-4, lr_scheduler_type='constant', warmup_steps=0,
                  logging_steps=1, save_strategy='no', report_to=[], seed=0, data_seed=0, use_cpu=True,
                  disable_tqdm=True, bf16=False, max_steps=STEPS, dataloader_num_workers=0,
                  dataset_num_proc=None, completion_only_loss=True, gradient_checkpointing=CHECKPOINTING,
                  **WORKLOADS[workload])
    if kind == 'trl':
        from trl import SFTConfig
    else:
        from sft_nb import SFTConfig
    return SFTConfig(**common, **kw)


def trainer(kind, out, workload, ds, tok, **kw):
    if kind == 'trl':
        from trl import SFTTrainer
    else:
        from sft_nb import SFTTrainer
    return SFTTrainer(model=model(), args=config(kind, out, workload, **kw), train_dataset=ds, processing_class=tok)


def run_trainer(kind, workload, ds, tok, tmp):
    from transformers import TrainerCallback
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k): ends.append((time.perf_counter(), time.process_time()))
    t = trainer(kind, f"{tmp}/{kind}", workload, ds, tok)
    t.add_callback(Clock())
    t.train()
    losses = [h['loss'] for h in t.state.log_history if 'loss' in h]
    return ends, losses


def run_plain(workload, ds, tok, tmp):
    "The floor: sft_nb's trainer only draws the batches (before the clock); then a bare loop on a fresh model"
    import torch
    t = trainer('sft_nb', f"{tmp}/batches", workload, ds, tok, verify_packing=False)  # no gate: only batches
    batches, it = [], iter(t.get_train_dataloader())
    for _ in range(STEPS):
        b = next(it)
        keep = ('input_ids', 'labels', 'position_ids', 'attention_mask')
        batches.append({k: v for k, v in b.items() if k in keep})
    del t, it
    m = model()
    m.train()
    if CHECKPOINTING:
        m.activation_checkpointing_enable()  # what `Trainer` calls for `activation_checkpointing=True`
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    ends, losses = [], []
    for b in batches:
        loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ends.append((time.perf_counter(), time.process_time()))
    return ends, losses


def child(kind):
    "One contender, both workloads; prints JSON {workload: {step, losses}}"
    import tempfile, torch
    torch.set_num_threads(THREADS)
    tok, ds, res = tokenizer(), dataset(), {}
    for w in WORKLOADS:
        with tempfile.TemporaryDirectory() as tmp:
            ends, losses = run_plain(w, ds, tok, tmp) if kind == 'plain' else run_trainer(kind, w, ds, tok, tmp)
        gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends, ends[1:])][WARMUP - 1:]
        res[w] = {'step': statistics.median(g[0] for g in gaps), 'cpu': statistics.median(g[1] for g in gaps),
                  'losses': losses[:4]}
    print(json.dumps(res))



def report(best, loads, rounds):
    "Print the comparison of the best rounds and write bench/results/train.json"
    rows = []
    print(f"\n{machine(THREADS)}\nload average (1 min) while measured: {min(loads):.1f}-{max(loads):.1f}; rounds {rounds}")
    for w in WORKLOADS:
        s, t, p = (best[(k, w)]['step'] for k in ('sft_nb', 'trl', 'plain'))
        cs, ct, cp = (best[(k, w)]['cpu'] for k in ('sft_nb', 'trl', 'plain'))
        l0 = {k: best[(k, w)]['losses'] for k in CONTENDERS}
        drift = max(abs(a - b) / abs(b) for k in ('sft_nb', 'trl') for a, b in zip(l0[k], l0['plain']))
        met = s <= 1.15 * p and s < t
        print(f"{w}: sft_nb {s:.3f} s, TRL {t:.3f} s, plain loop {p:.3f} s -> sft_nb/TRL {s / t:.2f}x, "
              f"sft_nb/plain {s / p:.2f}x, TRL/plain {t / p:.2f}x; first losses max rel. diff {drift:.1e}\n"
              f"   CPU seconds per step (of the fastest round): sft_nb {cs:.3f}, TRL {ct:.3f}, plain {cp:.3f}")
        for k in CONTENDERS:
            print(f"   {k:6s} first losses {' '.join(f'{x:.4f}' for x in l0[k])}")
        rows.append({'workload': f"train {w}: Qwen2 55M, vocab 32k, {WORKLOADS[w]['max_length']} tok, "
                                 f"batch {WORKLOADS[w]['per_device_train_batch_size']}"
                                 + (", activation checkpointing" if CHECKPOINTING else ""),
                     'metric': 'step seconds', 'sft_nb': round(s, 4), 'trl': round(t, 4), 'floor': round(p, 4),
                     'floor_name': 'plain loop', 'ratio_vs_trl': round(s / t, 3), 'ratio_vs_floor': round(s / p, 3),
                     'target': '<= 1.15x floor, < TRL', 'met': met, 'first_loss_max_rel_diff': float(f"{drift:.2e}"),
                     'cpu_seconds': {'sft_nb': round(cs, 4), 'trl': round(ct, 4), 'plain': round(cp, 4)}})
    os.makedirs('bench/results', exist_ok=True)
    command = 'python bench/bench_train.py' + (' --checkpointing' if CHECKPOINTING else '')
    out = {'bench': NAME, 'machine': machine(THREADS), 'command': command, 'rows': rows,
           'rounds': rounds, 'load_average': [round(min(loads), 2), round(max(loads), 2)]}
    with open(f"bench/results/{NAME}.json", 'w') as f:
        json.dump(out, f, indent=1)


def keep_best(best, r, kind, res):
    for w, v in res.items():
        print(f"round {r} {kind:6s} {w}: step {v['step']:.3f} s (CPU {v['cpu']:.3f} s)  "
              f"losses {v['losses']}", flush=True)
        old = best.get((kind, w))
        if old is None or v['step'] < old['step']:
            best[(kind, w)] = v


def main():
    "Round-robin; the results file is rewritten after each complete round, so a run cut short keeps its rounds"
    best, loads = {}, []
    for r in range(ROUNDS):
        for kind in CONTENDERS:
            loads.append(os.getloadavg()[0])
            flags = ['--checkpointing'] if CHECKPOINTING else []
            p = subprocess.run([sys.executable, __file__, '--child', kind, *flags], capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"{kind} failed:\n{p.stderr[-4000:]}")
            keep_best(best, r, kind, json.loads(p.stdout.strip().splitlines()[-1]))
        report(best, loads, r + 1)


def from_log(path, loads):
    "Rebuild the results from the `round ...` lines a run printed (complete rounds only)"
    import ast, re
    best, seen = {}, {}
    pat = re.compile(r"round (\d+) (\w+) +(\w+): step ([\d.]+) s \(CPU ([\d.]+) s\)  losses (\[.*\])")
    for line in open(path):
        m = pat.match(line)
        if m:
            r, kind, w = int(m[1]), m[2], m[3]
            seen.setdefault(r, []).append((kind, w, float(m[4]), float(m[5]), ast.literal_eval(m[6])))
    rounds = [r for r, v in seen.items() if len(v) == len(CONTENDERS) * len(WORKLOADS)]
    for r in rounds:
        for kind, w, step, cpu, losses in seen[r]:
            keep_best(best, r, kind, {w: {'step': step, 'cpu': cpu, 'losses': losses}})
    report(best, loads, len(rounds))


if __name__ == '__main__':
    if '--child' in sys.argv:
        child(sys.argv[sys.argv.index('--child') + 1])
    elif '--from-log' in sys.argv:  # e.g. --from-log run.log 14.0-19.7 (the load average seen meanwhile)
        i = sys.argv.index('--from-log')
        from_log(sys.argv[i + 1], [float(x) for x in sys.argv[i + 2].split('-')])
    else:
        main()
