"SFTTrainer end to end, where a notebook page can't: killed and resumed runs, signals, two processes, combinations."
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from sft_nb.tiny import save_tiny

HERE = Path(__file__).parent
SCRIPT = HERE/'trainer_script.py'

def _run(out, *flags, launcher=(sys.executable,), check=True):
    r = subprocess.run([*launcher, str(SCRIPT), str(out), *flags], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if check: assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    return r

def _record(path, rank=0): return json.loads(Path(f"{path}.rank{rank}").read_text())
def _losses(rec): return {h['step']: h['loss'] for h in rec['log'] if 'loss' in h}
def _weights(d): return load_file(str(Path(d)/'model.safetensors'))

@pytest.fixture
def base(tmp_path):
    save_tiny(tmp_path/'a'/'base'); save_tiny(tmp_path/'b'/'base')
    return tmp_path

def test_resume_after_kill_matches_uninterrupted_run(base):
    "Kill -9 after step 6 (last checkpoint at 4), resume: same losses, counters and final weights as one whole run"
    _run(base/'a', '--max_steps', '12', '--record', str(base/'a.json'))
    r = _run(base/'b', '--max_steps', '12', '--kill_at', '6', check=False)
    assert r.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (base/'b'/'run').glob('checkpoint-*')) == ['checkpoint-4']
    _run(base/'b', '--max_steps', '12', '--resume', '--record', str(base/'b.json'))
    whole, resumed = _record(base/'a.json'), _record(base/'b.json')
    for step, loss in _losses(resumed).items(): assert loss == pytest.approx(_losses(whole)[step], rel=1e-5), step
    assert set(_losses(resumed)) == set(range(1, 13))  # 1-4 restored from checkpoint-4, 5-12 trained after the resume
    last = lambda rec, k: [h[k] for h in rec['log'] if k in h][-1]
    for k in ('num_tokens', 'num_trained_tokens'): assert last(resumed, k) == last(whole, k), k
    wa, wb = _weights(base/'a'/'final'), _weights(base/'b'/'final')
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

def test_sigterm_saves_checkpoint_and_exits_cleanly(base):
    "SIGTERM at step 3 with checkpoints every 100 steps: a checkpoint at step 3 is written, then the process exits"
    r = _run(base/'a', '--max_steps', '50', '--save_steps', '100', '--sigterm_at', '3', check=False)
    assert r.returncode == 128 + signal.SIGTERM and 'Traceback' not in r.stderr, r.stderr[-3000:]
    ckpts = sorted(p.name for p in (base/'a'/'run').glob('checkpoint-*'))
    assert ckpts == ['checkpoint-3'], ckpts
    assert (base/'a'/'run'/'checkpoint-3'/'model.safetensors').exists()

def test_two_processes_match_single_process(base):
    """Two processes through accelerate on CPU (gloo): ranks see different data, the loss equals one process with the same global
    batch, and one copy of model and card is written. accelerate 1.15's `--cpu` flag starts a single process unless mpirun is
    configured, so this launches through torchrun (`--multi_gpu`) and the config's `use_cpu=True` selects gloo."""
    _run(base/'a', '--max_steps', '4', '--per_device', '8', '--record', str(base/'a.json'))
    launcher = (sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29533')
    _run(base/'b', '--max_steps', '4', '--per_device', '4', '--record', str(base/'b.json'), launcher=launcher)
    r0, r1 = _record(base/'b.json', 0), _record(base/'b.json', 1)
    assert r0['seen'] and r0['seen'] != r1['seen']
    single, dist = _losses(_record(base/'a.json')), _losses(r0)
    for step in single: assert dist[step] == pytest.approx(single[step], rel=1e-4), step
    final = base/'b'/'final'
    assert (final/'model.safetensors').exists() and (final/'README.md').exists()
    assert not list(final.glob('*rank*')) and not list(final.parent.glob('final?*'))


# In-process runs: every combination the issue names, each a few steps on the tiny model.
from datasets import IterableDataset
from peft import LoraConfig
from sft_nb import SFTConfig, SFTTrainer, ModelConfig, get_quantization_config
from sft_nb.tiny import tiny_dataset

def _args(out, **kw):
    d = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
             gradient_checkpointing=False, report_to='none', save_strategy='no', use_cpu=True, max_length=128, seed=0)
    return SFTConfig(**{**d, **kw})

def _changed(trainer, before):
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return any(not torch.equal(before[n], after[n]) for n in after)

def _train(out, model, args, data, **kw):
    t = SFTTrainer(model=str(model), args=args, train_dataset=data, **kw)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.train()
    losses = [h['loss'] for h in t.state.log_history if 'loss' in h]
    assert losses and all(l == l and l < 20 for l in losses), losses
    assert _changed(t, before)
    return t

ADAPTERS = {'full': {}, 'lora': dict(peft_config=LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'))}
DATA = {'assistant_only': ('conversational', dict(assistant_only_loss=True)),
        'completion_only': ('prompt_completion', dict(completion_only_loss=True)),
        'text': ('text', {})}

@pytest.mark.parametrize('adapter', list(ADAPTERS))
@pytest.mark.parametrize('packing', [False, True])
@pytest.mark.parametrize('data', list(DATA))
def test_combinations_train(tmp_path, adapter, packing, data):
    kind, kw = DATA[data]
    model = save_tiny(tmp_path/'m')
    t = _train(tmp_path, model, _args(tmp_path/'o', packing=packing, **kw), tiny_dataset(kind, n=64), **ADAPTERS[adapter])
    if packing:  # rows hold several documents, each restarting its positions, and nothing merges them back into one
        b = next(iter(t.get_train_dataloader()))
        assert len(t.train_dataset) < 64 and 'attention_mask' not in b
        assert (b['position_ids'] == 0).sum() > b['input_ids'].shape[0]
    last = [h for h in t.state.log_history if 'loss' in h][-1]
    if data != 'text': assert last['num_trained_tokens'] < last['num_tokens']

def test_qlora_trains_on_cpu(tmp_path):
    pytest.importorskip('bitsandbytes')
    q = get_quantization_config(ModelConfig(load_in_4bit=True, use_bnb_nested_quant=True))
    model = save_tiny(tmp_path/'m')
    args = _args(tmp_path/'o', assistant_only_loss=True, model_init_kwargs={'quantization_config': q, 'dtype': torch.float32})
    t = _train(tmp_path, model, args, tiny_dataset(n=32), **ADAPTERS['lora'])
    assert any('Linear4bit' in type(m).__name__ for m in t.model.modules())

def test_accumulation_checkpointing_eval_best_model(tmp_path):
    "GA + gradient checkpointing + eval during training + load_best_model_at_end on eval loss"
    model = save_tiny(tmp_path/'m')
    args = _args(tmp_path/'o', max_steps=6, gradient_accumulation_steps=2, gradient_checkpointing=True, eval_strategy='steps',
                 eval_steps=2, save_strategy='steps', save_steps=2, load_best_model_at_end=True, metric_for_best_model='eval_loss',
                 assistant_only_loss=True, save_total_limit=1)
    t = _train(tmp_path, model, args, tiny_dataset(n=64), eval_dataset=tiny_dataset(n=16, seed=1))
    evals = [h for h in t.state.log_history if 'eval_loss' in h]
    assert len(evals) == 3 and all('eval_mean_token_accuracy' in h and 'eval_entropy' in h for h in evals)
    assert t.state.best_model_checkpoint and Path(t.state.best_model_checkpoint).exists()

def test_eval_dict_of_datasets(tmp_path):
    model = save_tiny(tmp_path/'m')
    args = _args(tmp_path/'o', eval_strategy='steps', eval_steps=4)
    t = _train(tmp_path, model, args, tiny_dataset(n=32), eval_dataset={'chat': tiny_dataset(n=8), 'pc': tiny_dataset('prompt_completion', n=8)})
    keys = set().union(*[h.keys() for h in t.state.log_history])
    assert {'eval_chat_loss', 'eval_pc_loss'} <= keys, keys

def test_iterable_dataset(tmp_path):
    model = save_tiny(tmp_path/'m')
    rows = list(tiny_dataset(n=64))
    stream = IterableDataset.from_generator(lambda: iter(rows))
    _train(tmp_path, model, _args(tmp_path/'o', assistant_only_loss=True), stream)

def test_tensorboard_logs_sft_metrics(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model = save_tiny(tmp_path/'m')
    _train(tmp_path, model, _args(tmp_path/'o', report_to='tensorboard', assistant_only_loss=True), tiny_dataset(n=32))
    ev = EventAccumulator(str(next((tmp_path/'o'/'runs').rglob('events.out.tfevents*')).parent)); ev.Reload()  # transformers 5: <output_dir>/runs
    tags = set(ev.Tags()['scalars'])
    assert {'train/loss', 'train/mean_token_accuracy', 'train/entropy', 'train/num_trained_tokens'} <= tags, tags

def test_bad_input_fails_before_loading(tmp_path):
    model = save_tiny(tmp_path/'m')
    with pytest.raises(ValueError, match='`train_dataset` is empty'):
        SFTTrainer(model=str(model), args=_args(tmp_path/'o'), train_dataset=tiny_dataset(n=0))
    with pytest.raises(ValueError, match='no `eval_dataset`'):
        SFTTrainer(model=str(model), args=_args(tmp_path/'o', eval_strategy='steps', eval_steps=2), train_dataset=tiny_dataset(n=8))
    from transformers import DataCollatorWithPadding
    with pytest.raises(ValueError, match='position_ids'):
        SFTTrainer(model=str(model), args=_args(tmp_path/'o', packing=True), train_dataset=tiny_dataset(n=8), data_collator=DataCollatorWithPadding(None))
    with pytest.raises(ValueError, match='max_steps'):
        SFTTrainer(model=str(model), args=_args(tmp_path/'o', max_steps=-1), train_dataset=IterableDataset.from_generator(lambda: iter(list(tiny_dataset(n=4)))))
