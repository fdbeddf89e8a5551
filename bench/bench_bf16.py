"""Full fine-tuning of a bfloat16 checkpoint with defaults: TRL 1.16 vs sft_nb, on the same model, data and seed, on CPU.

The model: Qwen2-shaped, hidden 512, 8 layers, 8 heads (2 key-value), MLP 1024, vocabulary 32,000, untied head (51M weights),
randomly initialised and saved locally in bfloat16, as Hub checkpoints are. The data: sft_nb's tiny chats (conversational).
Every run uses the library's defaults apart from `output_dir`, `max_steps`, `use_cpu`, logging and `save_strategy='no'`:
lr 2e-5 with linear decay, batch 8, AdamW, activation checkpointing, max_length 1024.

- TRL: loads float32 (its `create_model_from_path` default) and computes under bfloat16 autocast (`bf16=True` by default);
  torch's fused AdamW on float32 weights.
- sft_nb, `half_precision_updates` = 'kahan' (its default), 'master', 'stochastic', 'naive': `dtype='auto'` loads bfloat16;
  'naive' is torch's fused AdamW on the bfloat16 weights (what sft_nb did before), 'master' keeps float32 master weights
  (the reference the loss curves are compared with).

Loss: each run's largest relative difference from 'master' over the steps (target for the default: within 1%).

Memory, measured per run in its own process (so one run's freed memory can't hide another's): the peak resident set
(VmHWM from /proc/self/status) minus the resident set after the imports, before the model is loaded: what loading and
training the model added to the process, all of it (weights, gradients, optimizer state, activations, autocast's copies,
allocator slack). VmHWM is the kernel's own high-water mark, so no peak between two samples is missed. Also printed: the
whole process's peak (imports included, ~0.5 GB of libraries in each), and the bytes per weight of weights + gradients +
optimizer state counted from the tensors after the last step (gradients are freed by then: their size is added).
Target: sft_nb default / TRL <= 0.75 for the training memory. Not all of the saving is the optimizer's: 'master' (16 bytes
a weight, as TRL) also uses less than TRL, from bfloat16 activations without autocast's weight copies and sft_nb's loss
without full logits; the B/weight column isolates the optimizer's part.

Optimizer step time: the same weights (loaded in each run's dtype) with random gradients, the median of 5 steps after one
warm-up, each optimizer alone in this process: TRL's fused AdamW on float32 weights vs sft_nb's (chunked, unfused) steps.

Run: `PYTHONPATH=. python bench/bench_bf16.py` (about 25 minutes on 2 busy cores: each training run takes 4-5).
"""
import json, os, subprocess, sys, tempfile
os.environ.update(HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', WANDB_DISABLED='true')
import warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import row, write  # noqa: E402
warnings.filterwarnings('ignore')

STEPS, HIDDEN, LAYERS, VOCAB = 8, 512, 8, 32000
RUNS = ('trl', 'kahan', 'master', 'stochastic', 'naive')

def _rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

def save_model(path):
    "The bfloat16 checkpoint and the tiny tokenizer, in `path`"
    import torch
    from transformers import AutoModelForCausalLM
    from sft_nb.tiny import tiny_config, tiny_tokenizer
    tok = tiny_tokenizer()
    cfg = tiny_config('qwen2', vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=8, num_kv_heads=2,
                      tie_word_embeddings=False)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)

def _state_bytes(model, optimizer):
    "Bytes of weights + gradients (as allocated during the step) + optimizer state, per trainable weight"
    import torch
    ps = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in ps)
    b = sum(p.numel() * p.element_size() * 2 for p in ps)  # the weight and its gradient (same dtype)
    st = getattr(optimizer, 'optimizer', optimizer).state
    b += sum(t.numel() * t.element_size() for p in ps for k, t in st.get(p, {}).items() if torch.is_tensor(t) and k != 'step')
    return b / n

def _child(kind, path):
    "One run of `kind` in this process: print JSON with losses, memory and state bytes per weight"
    import torch
    torch.set_num_threads(2)
    from sft_nb.tiny import tiny_dataset
    import trl, sft_nb
    ds = tiny_dataset(n=STEPS * 8)
    imported = _rss('VmRSS')
    with tempfile.TemporaryDirectory() as out:
        kw = dict(output_dir=out, max_steps=STEPS, use_cpu=True, logging_steps=1, save_strategy='no', report_to='none',
                  disable_tqdm=True)
        if kind == 'trl': t = trl.SFTTrainer(model=path, args=trl.SFTConfig(**kw), train_dataset=ds)
        else: t = sft_nb.SFTTrainer(model=path, args=sft_nb.SFTConfig(**kw, half_precision_updates=kind), train_dataset=ds)
        t.train()
    losses = [h['loss'] for h in t.state.log_history if 'loss' in h]
    print(json.dumps({'losses': losses, 'peak': _rss('VmHWM'), 'imported': imported,
                      'dtype': str(next(t.model.parameters()).dtype), 'bytes_per_weight': _state_bytes(t.model, t.optimizer),
                      'optimizer': type(getattr(t.optimizer, 'optimizer', t.optimizer)).__name__}))

def run_all(path):
    res = {}
    for kind in RUNS:
        r = subprocess.run([sys.executable, __file__, kind, path], capture_output=True, text=True)
        if r.returncode: raise RuntimeError(f"{kind} run failed:\n{r.stderr[-4000:]}")
        res[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {kind}: done", file=sys.stderr)
    return res

def report(res):
    ref = res['master']['losses']
    rel = lambda k: max(abs(a - b) / b for a, b in zip(res[k]['losses'], ref))
    mib = lambda x: x / 2**20
    train = {k: v['peak'] - v['imported'] for k, v in res.items()}
    names = {'trl': 'TRL 1.16 (float32 + autocast)', 'kahan': "sft_nb default ('kahan')", 'master': "sft_nb 'master'",
             'stochastic': "sft_nb 'stochastic'", 'naive': "sft_nb 'naive'"}
    print(f"Qwen2-shaped, hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, bfloat16 checkpoint; {STEPS} steps of defaults "
          f"(lr 2e-5 linear, batch 8) on the tiny chats, CPU\n")
    print(f"  {'run':32s} {'weights':9s} {'optimizer':10s} {'loss vs master':>15s} {'train MiB':>10s} {'process MiB':>12s} "
          f"{'B/weight':>9s}")
    for k in RUNS:
        v = res[k]
        print(f"  {names[k]:32s} {v['dtype'].removeprefix('torch.'):9s} {v['optimizer']:10s} {rel(k):15.2e} "
              f"{mib(train[k]):10.0f} {mib(v['peak']):12.0f} {v['bytes_per_weight']:9.1f}")
    for k in RUNS: print(f"  losses {k:10s}", ' '.join(f"{x:.4f}" for x in res[k]['losses']))
    print(f"\n  loss curve, sft_nb default vs float32 master weights: max relative difference {rel('kahan'):.2e} "
          f"(target <= 1e-2); naive bfloat16: {rel('naive'):.2e}; TRL: {rel('trl'):.2e}")
    print(f"  training memory (peak RSS - RSS after imports), sft_nb default / TRL = {train['kahan'] / train['trl']:.2f}x "
          f"(target <= 0.75x); whole process {res['kahan']['peak'] / res['trl']['peak']:.2f}x; "
          f"'master' / TRL = {train['master'] / train['trl']:.2f}x")
    shape = f"Qwen2-shaped bf16 checkpoint, hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, {STEPS} steps of defaults"
    return [row(f'loss vs float32 master weights: {shape}', 'max relative difference', rel('kahan'), rel('trl'),
                target='<= 1e-2', met=rel('kahan') <= 1e-2),
            row(f'training memory: {shape}', 'peak MiB', mib(train['kahan']), mib(train['trl']), target='<= 0.75x TRL',
                met=train['kahan'] / train['trl'] <= 0.75)]

def step_times(path, n=5):
    "Median seconds of `optimizer.step()` on the model's weights, per optimizer"
    import statistics, time, torch
    from transformers import AutoModelForCausalLM
    from sft_nb.optim import AdamW
    torch.set_num_threads(2)
    make = {'trl': (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=2e-5, fused=True)),
            'naive': (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=2e-5, fused=True)),
            **{u: (torch.bfloat16, lambda ps, u=u: AdamW(ps, lr=2e-5, updates=u)) for u in ('kahan', 'master', 'stochastic')}}
    out = {}
    for kind, (dtype, opt_fn) in make.items():
        ps = list(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).parameters())
        for p in ps: p.grad = torch.randn_like(p) * 1e-3
        opt, times = opt_fn(ps), []
        for _ in range(n + 1):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[kind] = statistics.median(times[1:])
        del opt, ps
    return out

if __name__ == '__main__':
    if len(sys.argv) > 2:
        _child(sys.argv[1], sys.argv[2])
        sys.exit()
    with tempfile.TemporaryDirectory() as d:
        save_model(d)
        rows = report(run_all(d))
        t = step_times(d)
        print("\n  optimizer step, median of 5:", ', '.join(f"{k} {v * 1e3:.0f} ms ({v / t['trl']:.1f}x TRL)" for k, v in t.items()))
    write('bf16', 'python bench/bench_bf16.py', rows)
