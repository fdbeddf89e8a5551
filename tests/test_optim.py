"""Full fine-tuning of a bfloat16 checkpoint through SFTTrainer with TRL's defaults (lr 2e-5, linear decay): every weight trains,
the loss follows float32 master weights, resume continues exactly, and the user's own optimizer choices are kept.

Also a worker for the two-process test: `python -m accelerate.commands.launch ... tests/test_optim.py OUT MODEL`."""
import logging, os, sys
from pathlib import Path
import pytest, torch
from transformers import AutoModelForCausalLM
from sft_nb import SFTConfig, SFTTrainer
from sft_nb.optim import AdamW, master_weight
from sft_nb.tiny import save_tiny, tiny_dataset

def _args(out, **kw):
    "TRL's defaults (lr 2e-5, linear decay, AdamW), small batches on CPU"
    d = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, logging_steps=1, report_to='none',
             save_strategy='no', use_cpu=True, max_length=128, seed=0, gradient_checkpointing=False)
    return SFTConfig(**{**d, **kw})

@pytest.fixture(scope='module')
def bf16_path(tmp_path_factory):
    "A tiny Qwen2 saved in bfloat16, as Hub checkpoints are: `dtype='auto'` loads it in bfloat16"
    d = tmp_path_factory.mktemp('bf16')
    save_tiny(d/'f32', arch='qwen2')
    AutoModelForCausalLM.from_pretrained(d/'f32', dtype=torch.bfloat16).save_pretrained(d/'bf16')
    for f in (d/'f32').glob('*token*'): (d/'bf16'/f.name).write_bytes(f.read_bytes())
    return d/'bf16'

def _fit(path, args, **kw):
    "Train; return the trainer, the losses, and the share of weight elements the optimizer changed"
    t = SFTTrainer(model=str(path), args=args, train_dataset=tiny_dataset(n=64), **kw)
    ps = [p for p in t.model.parameters() if p.requires_grad]
    before = [p.detach().float().clone() for p in ps]
    t.train()
    opt = t.optimizer
    changed = sum((master_weight(opt, p) != b).sum().item() for p, b in zip(ps, before)) / sum(b.numel() for b in before)
    return t, [h['loss'] for h in t.state.log_history if 'loss' in h], changed

def test_default_trains_every_weight(bf16_path, tmp_path):
    "Defaults on a bfloat16 checkpoint: sft_nb's Kahan AdamW, >= 99% of weight elements change; 'naive' (torch's AdamW) loses most"
    t, _, changed = _fit(bf16_path, _args(tmp_path/'k'))
    assert next(t.model.parameters()).dtype == torch.bfloat16
    assert isinstance(t.optimizer.optimizer, AdamW) and t.optimizer.optimizer.updates == 'kahan'
    assert changed >= 0.99, changed
    t, _, naive = _fit(bf16_path, _args(tmp_path/'n', half_precision_updates='naive'))
    assert type(t.optimizer.optimizer) is torch.optim.AdamW
    assert naive < 0.6, naive

def test_loss_follows_float32_master_weights(bf16_path, tmp_path):
    "Kahan's loss curve is within 1e-3 of float32 master weights'; stochastic rounding within 1%"
    _, master, _ = _fit(bf16_path, _args(tmp_path/'m', half_precision_updates='master'))
    for updates, tol in (('kahan', 1e-3), ('stochastic', 1e-2)):
        _, losses, _ = _fit(bf16_path, _args(tmp_path/updates, half_precision_updates=updates))
        assert losses == pytest.approx(master, rel=tol), updates

@pytest.mark.parametrize('updates', ['kahan', 'stochastic'])
def test_resume_continues_exactly(bf16_path, tmp_path, updates):
    """Checkpoint at step 3 of 6 and resume: same weights and optimizer state as one uninterrupted run, with gradient accumulation,
    clipping, weight decay and the linear schedule"""
    kw = dict(max_steps=6, gradient_accumulation_steps=2, max_grad_norm=0.5, weight_decay=0.1, save_strategy='steps', save_steps=3,
              half_precision_updates=updates)
    whole, _, _ = _fit(bf16_path, _args(tmp_path/'a', **kw))
    SFTTrainer(model=str(bf16_path), args=_args(tmp_path/'b', **kw), train_dataset=tiny_dataset(n=64)).train()
    resumed = SFTTrainer(model=str(bf16_path), args=_args(tmp_path/'c', **kw), train_dataset=tiny_dataset(n=64))
    resumed.train(resume_from_checkpoint=str(tmp_path/'b'/'checkpoint-3'))
    for (n, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(master_weight(whole.optimizer, a), master_weight(resumed.optimizer, b)), n
    sa, sb = whole.optimizer.optimizer.state, resumed.optimizer.optimizer.state
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        for k in sa[a]: assert sa[a][k].dtype == sb[b][k].dtype and torch.equal(sa[a][k], sb[b][k]), k

def test_loaded_bf16_model_gets_kahan(bf16_path, tmp_path):
    "A model passed in already loaded in bfloat16 is trained the same way as one loaded from its path"
    model = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.bfloat16)
    t = SFTTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=tiny_dataset(n=8))
    t.train()
    assert isinstance(t.optimizer.optimizer, AdamW)

def test_user_choices_are_kept(bf16_path, tmp_path, capsys, caplog):
    "Another optim, the user's optimizer, or LoRA (float32 adapters): sft_nb's AdamW is not used, and a different optim is reported"
    with caplog.at_level(logging.WARNING, logger='sft_nb.optim'):
        t, _, _ = _fit(bf16_path, _args(tmp_path/'o', max_steps=1, optim='adafactor'))
    assert type(t.optimizer.optimizer).__name__ == 'Adafactor'
    said = [r.getMessage() for r in caplog.records if r.name == 'sft_nb.optim']
    assert len(said) == 1 and "optim='adafactor'" in said[0] and "optim='adafactor'" not in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.bfloat16)
    mine = torch.optim.SGD(model.parameters(), lr=1e-3)
    t = SFTTrainer(model=model, args=_args(tmp_path/'s', max_steps=1), train_dataset=tiny_dataset(n=8), optimizers=(mine, None))
    t.train()
    assert t.optimizer.optimizer is mine
    from peft import LoraConfig
    t, _, _ = _fit(bf16_path, _args(tmp_path/'l', max_steps=1), peft_config=LoraConfig(r=4, target_modules='all-linear'))
    assert type(t.optimizer.optimizer) is torch.optim.AdamW

def test_two_processes_keep_ranks_identical(bf16_path, tmp_path):
    "DDP on CPU (gloo), two ranks: Kahan's deterministic updates keep every rank's weights and compensations identical"
    import subprocess
    launcher = (sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29547')
    r = subprocess.run([*launcher, __file__, str(tmp_path), str(bf16_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    w0, w1 = (torch.load(tmp_path/f'weights{i}.pt') for i in (0, 1))
    for k in w0: assert torch.equal(w0[k], w1[k]), k
    assert any(k.endswith('.compensation') and w0[k].abs().sum() > 0 for k in w0)

if __name__ == '__main__':  # the worker of test_two_processes_keep_ranks_identical
    out, model = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    t = SFTTrainer(model=model, args=_args(out/'run', max_steps=3), train_dataset=tiny_dataset(n=64))
    t.train()
    st = t.optimizer.optimizer.state
    w = {n: p.detach() for n, p in t.model.named_parameters()}
    w |= {f"{n}.compensation": st[p]['compensation'] for n, p in t.model.named_parameters()}
    torch.save(w, out/f"weights{t.args.process_index}.pt")
