"SFTTrainer end to end, where a notebook page can't: killed and resumed runs, signals, two processes, combinations."
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from sft_nb.tiny import save_tiny, save_tiny_dataset

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

@pytest.mark.parametrize('sig', ['TERM', 'INT'])
def test_signal_saves_checkpoint_and_exits_cleanly(base, sig):
    "SIGTERM (a scheduler) or SIGINT (Ctrl-C) at step 3 with checkpoints every 100 steps: checkpoint-3 is written, then the process exits"
    r = _run(base/'a', '--max_steps', '50', '--save_steps', '100', '--signal_at', '3', '--signal', sig, '--record', str(base/'a.json'), check=False)
    assert r.returncode == 128 + getattr(signal, f'SIG{sig}') and 'Traceback' not in r.stderr, r.stderr[-3000:]
    ckpts = sorted(p.name for p in (base/'a'/'run').glob('checkpoint-*'))
    assert ckpts == ['checkpoint-3'], ckpts
    assert json.loads((base/'a'/'run'/'checkpoint-3'/'trainer_state.json').read_text())['global_step'] == 3
    assert _record(base/'a.json')['step'] == 3 and not (base/'a'/'final').exists()  # stopped: no "final" save of a half-trained model

def test_signal_without_checkpoints_stops_without_saving(base):
    "With save_strategy='no' a SIGTERM still stops training at the end of the step and exits cleanly, writing nothing"
    r = _run(base/'a', '--max_steps', '50', '--save_strategy', 'no', '--signal_at', '2', '--record', str(base/'a.json'), check=False)
    assert r.returncode == 128 + signal.SIGTERM and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert _record(base/'a.json')['step'] == 2 and not list((base/'a'/'run').glob('checkpoint-*'))

def test_two_processes_match_single_process(base):
    """Two processes through accelerate on CPU (gloo): the dataset is tokenized once (rank 1 loads rank 0's cache), ranks see
    different data, the loss equals one process with the same global batch, and one copy of model, card and checkpoints is
    written. accelerate 1.15's `--cpu` flag starts a single process unless mpirun is configured, so this launches through
    torchrun (`--multi_gpu`) and the config's `use_cpu=True` selects gloo."""
    data = save_tiny_dataset(base/'data', n=256)
    _run(base/'a', '--max_steps', '4', '--per_device', '8', '--data', str(data), '--record', str(base/'a.json'))
    launcher = (sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '29533')
    _run(base/'b', '--max_steps', '4', '--per_device', '4', '--data', str(data), '--record', str(base/'b.json'), launcher=launcher)
    r0, r1 = _record(base/'b.json', 0), _record(base/'b.json', 1)
    assert r0['cache_files'] and r0['cache_files'] == r1['cache_files']  # same fingerprint: rank 1 reused rank 0's tokenized data
    assert r0['seen'] and r0['seen'] != r1['seen']
    assert not {json.dumps(b) for b in r0['seen']} & {json.dumps(b) for b in r1['seen']}
    single, dist = _losses(_record(base/'a.json')), _losses(r0)
    assert set(single) == set(dist) == {1, 2, 3, 4}
    for step in single: assert dist[step] == pytest.approx(single[step], rel=1e-4), step
    run, final = base/'b'/'run', base/'b'/'final'
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith('runs')) == ['checkpoint-4']  # no staging folder left
    ckpt = sorted(p.name for p in (run/'checkpoint-4').iterdir())
    assert ckpt.count('model.safetensors') == 1 and {'rng_state_0.pth', 'rng_state_1.pth'} <= set(ckpt), ckpt
    assert (final/'model.safetensors').exists() and (final/'README.md').exists()
    assert not [p.name for p in final.iterdir() if 'rank' in p.name or p.name.startswith('_tmp')]
    assert sorted(p.name for p in final.parent.iterdir() if p.name.startswith('final')) == ['final']
    w_single, w_dist = _weights(base/'a'/'final'), _weights(final)
    for k in w_single: torch.testing.assert_close(w_dist[k], w_single[k], rtol=1e-4, atol=1e-5)


# In-process runs: every combination the issue names, each a few steps on the tiny model.
from datasets import IterableDataset
from peft import LoraConfig
from sft_nb import SFTConfig, SFTTrainer, ModelConfig, get_quantization_config
from sft_nb.tiny import tiny_dataset, tiny_pairs

_ARGS = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, gradient_checkpointing=False,
             report_to='none', save_strategy='no', use_cpu=True, max_length=128, seed=0)

def _args(out, **kw): return SFTConfig(**{**_ARGS, 'output_dir': str(out), **kw})

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
    assert {p.dtype for p in t.model.parameters() if p.requires_grad} == {torch.float32}  # TRL: bfloat16 (see the adapters notebook)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_qlora_on_cuda_trains_saves_and_merges_in_full_precision(tmp_path):
    "QLoRA as usually run: nf4 with double quant on the GPU, bfloat16 compute and mixed precision; both saves reload to the trained model"
    pytest.importorskip('bitsandbytes')
    from sft_nb.adapters import load_adapter
    from sft_nb.models import load_model
    model, mc = save_tiny(tmp_path/'m'), ModelConfig(load_in_4bit=True, use_bnb_nested_quant=True, dtype='bfloat16')
    args = _args(tmp_path/'o', use_cpu=False, max_steps=12, learning_rate=2e-2, assistant_only_loss=True, save_merged_model=True,
                 model_init_kwargs={'quantization_config': get_quantization_config(mc)})
    assert args.bf16
    t = _train(tmp_path, model, args, tiny_dataset(n=48), **ADAPTERS['lora'])
    assert t.model.device.type == 'cuda' and any('Linear4bit' in type(m).__name__ for m in t.model.modules())
    losses = [h['loss'] for h in t.state.log_history if 'loss' in h]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    t.save_model()
    out, ids = Path(args.output_dir), torch.tensor([[5, 17, 42, 9, 3, 77]])
    assert 'quantization_config' not in json.loads((out/'merged'/'config.json').read_text())
    t.model.eval()
    again = load_adapter(out, is_trainable=False, quantization_config=get_quantization_config(mc)).eval()  # on a fresh 4-bit base
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):  # as in training, whether or not accelerate kept its wrapper
        trained = t.model(input_ids=ids.cuda()).logits.float().cpu()
        torch.testing.assert_close(again(input_ids=ids.cuda()).logits.float().cpu(), trained)
        with again.disable_adapter(): untrained = again(input_ids=ids.cuda()).logits.float().cpu()
    assert not torch.allclose(untrained, trained, atol=1e-2)  # the adapter is what makes them equal
    with torch.no_grad():
        merged, on_full = load_model(out/'merged').eval(), load_adapter(out, is_trainable=False).eval()
        assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear and merged.dtype == torch.float32
        torch.testing.assert_close(merged(input_ids=ids).logits, on_full(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_accumulation_checkpointing_eval_best_model(tmp_path):
    "GA + gradient checkpointing + eval during training + load_best_model_at_end on eval loss"
    model = save_tiny(tmp_path/'m')
    args = _args(tmp_path/'o', max_steps=6, gradient_accumulation_steps=2, gradient_checkpointing=True, eval_strategy='steps',
                 eval_steps=2, save_strategy='steps', save_steps=2, load_best_model_at_end=True, metric_for_best_model='eval_loss',
                 assistant_only_loss=True, save_total_limit=1)
    t = _train(tmp_path, model, args, tiny_dataset(n=64), eval_dataset=tiny_dataset(n=16, seed=1))
    evals = [h for h in t.state.log_history if 'eval_loss' in h]
    assert len(evals) == 3 and all('eval_mean_token_accuracy' in h and 'eval_entropy' in h for h in evals)
    best = min(evals, key=lambda h: h['eval_loss'])
    assert t.state.best_model_checkpoint == str(tmp_path/'o'/f"checkpoint-{best['step']}") and t.state.best_metric == best['eval_loss']
    saved = load_file(str(Path(t.state.best_model_checkpoint)/'model.safetensors'))
    for k, v in t.model.state_dict().items():   # the model in memory at the end is the best checkpoint's
        if k in saved: torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert t.evaluate()['eval_loss'] == pytest.approx(best['eval_loss'], rel=1e-5)

def test_load_best_model_with_another_metric(tmp_path):
    "metric_for_best_model='mean_token_accuracy' (greater is better) picks the checkpoint with the highest eval accuracy"
    model = save_tiny(tmp_path/'m')
    args = _args(tmp_path/'o', max_steps=6, eval_strategy='steps', eval_steps=2, save_strategy='steps', save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model='mean_token_accuracy', assistant_only_loss=True)
    t = _train(tmp_path, model, args, tiny_dataset(n=64), eval_dataset=tiny_dataset(n=16, seed=1))
    evals = [h for h in t.state.log_history if 'eval_loss' in h]
    best = max(evals, key=lambda h: h['eval_mean_token_accuracy'])
    assert t.args.greater_is_better and t.state.best_metric == best['eval_mean_token_accuracy']
    assert t.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")

def test_eval_dict_of_datasets(tmp_path):
    model = save_tiny(tmp_path/'m')
    args = _args(tmp_path/'o', eval_strategy='steps', eval_steps=4)
    t = _train(tmp_path, model, args, tiny_dataset(n=32), eval_dataset={'chat': tiny_dataset(n=8), 'pc': tiny_dataset('prompt_completion', n=8)})
    keys = set().union(*[h.keys() for h in t.state.log_history])
    assert {'eval_chat_loss', 'eval_pc_loss'} <= keys, keys

@pytest.mark.parametrize('packing,shuffle', [(False, False), (True, False), (True, True)])
def test_iterable_dataset(tmp_path, packing, shuffle):
    model = save_tiny(tmp_path/'m')
    rows = list(tiny_dataset(n=64))
    stream = IterableDataset.from_generator(lambda: iter(rows))
    t = _train(tmp_path, model, _args(tmp_path/'o', assistant_only_loss=True, packing=packing, shuffle_dataset=shuffle), stream)
    b = next(iter(t.get_train_dataloader()))
    assert ('attention_mask' in b) != packing
    if packing: assert (b['position_ids'] == 0).sum() > b['input_ids'].shape[0]  # several documents per row

def test_lora_gradient_checkpointing_packing_accumulation(tmp_path):
    "LoRA + gradient checkpointing + packing + GA together: checkpointing recomputes, it must not change a single loss"
    model = save_tiny(tmp_path/'m')
    runs = {}
    for gc in (False, True):
        args = _args(tmp_path/f'o{gc}', gradient_checkpointing=gc, packing=True, gradient_accumulation_steps=2, assistant_only_loss=True)
        t = _train(tmp_path, model, args, tiny_dataset(n=64), **ADAPTERS['lora'])
        runs[gc] = [h['loss'] for h in t.state.log_history if 'loss' in h]
        assert t.args.gradient_checkpointing == gc and getattr(t.model.base_model.model, 'is_gradient_checkpointing', False) == gc
    assert len(runs[True]) == 4 and runs[True] == pytest.approx(runs[False], rel=1e-5)

def test_tensorboard_logs_sft_metrics(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model = save_tiny(tmp_path/'m')
    _train(tmp_path, model, _args(tmp_path/'o', report_to='tensorboard', assistant_only_loss=True), tiny_dataset(n=32))
    ev = EventAccumulator(str(next((tmp_path/'o'/'runs').rglob('events.out.tfevents*')).parent)); ev.Reload()  # transformers 5: <output_dir>/runs
    tags = set(ev.Tags()['scalars'])
    assert {'train/loss', 'train/mean_token_accuracy', 'train/entropy', 'train/num_trained_tokens'} <= tags, tags

def test_disk_full_fails_before_first_step(tmp_path, monkeypatch):
    "Too little free space for one checkpoint: train() raises ENOSPC before any step, nothing is written"
    import shutil
    model = save_tiny(tmp_path/'m')
    t = SFTTrainer(model=str(model), args=_args(tmp_path/'o', save_strategy='steps', save_steps=2), train_dataset=tiny_dataset(n=16))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match='GiB free but a checkpoint') as e: t.train()
    assert e.value.errno == 28 and t.state.global_step == 0 and not _changed(t, before)
    assert not list((tmp_path/'o').glob('checkpoint-*'))

def test_formatting_func(tmp_path):
    "TRL's formatting_func: rows in any shape become text; the labels are that text's tokens"
    model = save_tiny(tmp_path/'m')
    rows = [{'question': p, 'answer': a} for p, a in tiny_pairs(32)]
    from datasets import Dataset
    fmt = lambda r: f"Q: {r['question']} A: {r['answer']}"
    t = _train(tmp_path, model, _args(tmp_path/'o'), Dataset.from_list(rows), formatting_func=fmt)
    tok = t.processing_class
    first = t.train_dataset[0]
    assert tok.decode(first['input_ids']).startswith(fmt(rows[0]))
    assert [l for l in first['labels'] if l != -100] == first['input_ids']

def test_compute_metrics_and_custom_optimizer(tmp_path):
    "optimizers=(opt, sched) is used as given; compute_metrics gets the eval logits and labels, its results logged with eval_"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path/'m'))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    seen = {}
    def metrics(p):
        seen['shapes'] = (p.predictions.shape, p.label_ids.shape)
        return {'n_labelled': float((p.label_ids != -100).sum())}
    t = SFTTrainer(model=model, args=_args(tmp_path/'o', eval_strategy='steps', eval_steps=4, assistant_only_loss=True),
                   train_dataset=tiny_dataset(n=32), eval_dataset=tiny_dataset(n=8, seed=1), optimizers=(opt, sched),
                   compute_metrics=metrics)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert t.optimizer.optimizer is opt if hasattr(t.optimizer, 'optimizer') else t.optimizer is opt
    assert all(h['learning_rate'] == 0.5 for h in t.state.log_history if 'learning_rate' in h)
    assert _changed(t, before)
    ev = next(h for h in t.state.log_history if 'eval_loss' in h)
    n = sum(sum(l != -100 for l in r['labels']) for r in t.eval_dataset)
    assert ev['eval_n_labelled'] == n and seen['shapes'][0][:2] == seen['shapes'][1] and seen['shapes'][0][2] == len(t.processing_class)


# TRL parity: the same script through trl.SFTTrainer and sft_nb.SFTTrainer, compared attribute by attribute and loss by loss.
import trl
from transformers import AutoModelForCausalLM

def _family(path, family):
    "A tiny model of a real family (TRL's test suite trains these), with the tiny tokenizer, saved in float32"
    from transformers import Cohere2Config, Lfm2Config, Olmo3Config, Qwen2Config, Qwen3MoeConfig
    from sft_nb.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    cfg = {'qwen2.5': lambda: Qwen2Config(**common),
           'cohere2': lambda: Cohere2Config(**common, logit_scale=1.0, layer_switch=4),
           'olmo3': lambda: Olmo3Config(**common),
           'lfm2': lambda: Lfm2Config(**common, full_attn_idxs=[1], block_multiple_of=8, conv_L_cache=3),
           'qwen3_moe': lambda: Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)}[family]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path

TRL_ATTRS = ['padding_free', 'completion_only_loss', 'aux_loss_enabled', 'router_aux_loss_coef', '_is_vlm', '_is_vision_dataset',
             '_skip_prepare_dataset', '_formatting_func', '_tp_size', '_total_train_tokens', 'chat_template', '_name']

def _both(tmp_path, model, data, **kw):
    "(sft_nb trainer, TRL trainer) of the same script"
    out = {}
    for lib in (trl, __import__('sft_nb')):
        args = lib.SFTConfig(**{**_ARGS, 'output_dir': str(tmp_path/lib.__name__), **kw})
        out[lib.__name__] = lib.SFTTrainer(model=str(model), args=args, train_dataset=data)
    return out['sft_nb'], out['trl']

@pytest.mark.parametrize('family', ['qwen2.5', 'cohere2', 'olmo3', 'lfm2', 'qwen3_moe'])
def test_families_train_with_trls_attributes(tmp_path, family):
    "TRL's `test_train` on each family: every weight changes, the loss is TRL's, TRL's attributes hold TRL's values"
    model = _family(tmp_path/'m', family)
    ours, theirs = _both(tmp_path, model, tiny_dataset('text', n=8), max_steps=2, learning_rate=1e-3)
    for a in TRL_ATTRS: assert getattr(ours, a) == getattr(theirs, a), a
    for t in (ours, theirs):
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        t.train()
        assert not [n for n, p in t.model.named_parameters() if torch.equal(before[n], p)]
    assert ours.state.log_history[-1]['train_loss'] == pytest.approx(theirs.state.log_history[-1]['train_loss'], rel=1e-3)
    mine, ref = ([h for h in t.state.log_history if 'loss' in h][-1] for t in (ours, theirs))
    assert ours.aux_loss_enabled == (family == 'qwen3_moe') and ('aux_loss' in mine) == ('aux_loss' in ref) == ours.aux_loss_enabled
    if ours.aux_loss_enabled: assert mine['aux_loss'] == pytest.approx(ref['aux_loss'], rel=1e-3)
    assert ours._total_train_tokens == theirs._total_train_tokens == mine['num_tokens']

@pytest.mark.parametrize('kw', [dict(packing=True), dict(padding_free=True, max_length=None), dict(completion_only_loss=False),
                                dict(dataset_kwargs={'skip_prepare_dataset': True})])
def test_trl_attributes_follow_the_config(tmp_path, kw):
    model = save_tiny(tmp_path/'m')
    data = tiny_dataset('prompt_completion', n=8)
    if 'dataset_kwargs' in kw: data = data.map(lambda r: {'input_ids': [1, 2, 3], 'labels': [1, 2, 3]}, remove_columns=data.column_names)
    ours, theirs = _both(tmp_path, model, data, **kw)
    for a in TRL_ATTRS: assert getattr(ours, a) == getattr(theirs, a), a

def test_user_metrics_are_logged_as_in_trl(tmp_path):
    "A subclass appending to `self._metrics[mode]` gets the mean logged, as in TRL"
    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            self._metrics['train' if model.training else 'eval']['rows'].append(float(inputs['input_ids'].shape[0]))
            return super().compute_loss(model, inputs, *a, **k)
    t = Counting(model=str(save_tiny(tmp_path/'m')), args=_args(tmp_path/'o', max_steps=2, per_device_eval_batch_size=4),
                 train_dataset=tiny_dataset(n=8),
                 eval_dataset=tiny_dataset(n=6, seed=1))
    t.train()
    assert [h['rows'] for h in t.state.log_history if 'loss' in h] == [4.0, 4.0]
    assert t.evaluate()['eval_rows'] == 3.0  # the mean of two batches: 4 rows, then 2

def test_train_dataset_is_required_at_init_as_in_trl(tmp_path):
    model = save_tiny(tmp_path/'m')
    for lib in (trl, __import__('sft_nb')):
        with pytest.raises(ValueError, match="`train_dataset` is required"):
            lib.SFTTrainer(model=str(model), args=lib.SFTConfig(output_dir=str(tmp_path/'o'), report_to='none', use_cpu=True))

def test_with_transform_names_skip_prepare_dataset_as_trl(tmp_path):
    "TRL's test's pattern matches both messages"
    from datasets import Dataset
    data = Dataset.from_dict({'text': ['hello world']}).with_transform(lambda b: {'text': [t + ' <AUG>' for t in b['text']]})
    model = save_tiny(tmp_path/'m')
    for lib in (trl, __import__('sft_nb')):
        with pytest.raises(ValueError, match=r"Dataset\.with_transform\(\).*skip_prepare_dataset.*trainer-ready"):
            lib.SFTTrainer(model=str(model), args=lib.SFTConfig(output_dir=str(tmp_path/'o'), report_to='none', use_cpu=True),
                           train_dataset=data)

@pytest.mark.parametrize('kind', ['dataset', 'iterable', 'datasetdict', 'iterable_datasetdict', 'dict', 'dict_of_iterable'])
def test_evaluate_prepares_raw_datasets_as_trl(tmp_path, kind):
    """evaluate(eval_dataset=raw): prepared, then the same eval losses as TRL's (same model, same rows). Trained on the eval
    data's format: TRL decides completion-only loss once, from the train dataset, sft_nb for each dataset"""
    from datasets import DatasetDict, IterableDatasetDict
    model = save_tiny(tmp_path/'m')
    raw, other = tiny_dataset('prompt_completion', n=8, seed=2), tiny_dataset('prompt_completion', n=4)
    ds = {'dataset': lambda: raw, 'iterable': lambda: raw.to_iterable_dataset(), 'datasetdict': lambda: DatasetDict(a=raw, b=other),
          'iterable_datasetdict': lambda: IterableDatasetDict(a=raw.to_iterable_dataset(), b=other.to_iterable_dataset()),
          'dict': lambda: {'a': raw}, 'dict_of_iterable': lambda: {'a': raw.to_iterable_dataset()}}[kind]()
    ours, theirs = _both(tmp_path, model, tiny_dataset('prompt_completion', n=8), per_device_eval_batch_size=8)
    mine, ref = ours.evaluate(eval_dataset=ds), theirs.evaluate(eval_dataset=ds)
    losses = sorted(k for k in ref if k.endswith('_loss'))
    assert losses and losses == sorted(k for k in mine if k.endswith('_loss'))
    for k in losses: assert mine[k] == pytest.approx(ref[k], rel=1e-4), k

def test_deviation_padding_free_without_packing_keeps_max_length(tmp_path):
    """TRL refuses padding_free=True without packing when max_length is set, because its preparation would not enforce it.
    sft_nb truncates during preparation, so max_length holds and the run trains: a deviation that does what was asked"""
    model = save_tiny(tmp_path/'m')
    data = tiny_dataset('text', n=16)
    with pytest.raises(ValueError, match='`max_length` is not enforced'):
        trl.SFTTrainer(model=str(model), train_dataset=data, args=trl.SFTConfig(**{**_ARGS, 'output_dir': str(tmp_path/'t'),
                                                                                   'padding_free': True, 'max_length': 8}))
    t = _train(tmp_path, model, _args(tmp_path/'o', padding_free=True, max_length=8), data)
    assert max(len(r) for r in t.train_dataset['input_ids']) == 8 and t.padding_free
    b = next(iter(t.get_train_dataloader()))
    assert b['input_ids'].shape[0] == 1 and 'attention_mask' not in b  # TRL's one-row layout

def test_deviation_mask_columns_without_labels_train_on_the_masks(tmp_path):
    """TRL refuses rows with `assistant_masks` / `completion_mask` but no `labels` under skip_prepare_dataset (its collator would
    train on every token). sft_nb's collator folds the masks in, so exactly the masked-in tokens are trained"""
    model = save_tiny(tmp_path/'m')
    from datasets import Dataset
    rows = [{'input_ids': [5, 6, 7, 8, 9, 10], 'assistant_masks': [0, 0, 1, 1, 1, 0], 'completion_mask': [1] * 6},
            {'input_ids': [11, 12, 13, 14], 'assistant_masks': [1] * 4, 'completion_mask': [0, 1, 1, 1]}] * 4
    skip = {'dataset_kwargs': {'skip_prepare_dataset': True}}
    with pytest.raises(ValueError, match="Add a 'labels' column"):
        trl.SFTTrainer(model=str(model), train_dataset=Dataset.from_list(rows), args=trl.SFTConfig(**{**_ARGS, **skip, 'output_dir': str(tmp_path/'t')}))
    t = _train(tmp_path, model, _args(tmp_path/'o', per_device_train_batch_size=2, **skip), Dataset.from_list(rows))
    b = t.data_collator([t.train_dataset[i] for i in range(2)])
    assert b['labels'].tolist() == [[-100, -100, 7, 8, 9, -100], [-100, 12, 13, 14, -100, -100]]

def test_quantization_config_argument_as_in_trl(tmp_path):
    "TRL's `quantization_config=` trainer argument loads the model quantized (here 4-bit, with LoRA: QLoRA on CPU)"
    pytest.importorskip('bitsandbytes')
    from transformers import BitsAndBytesConfig
    model = save_tiny(tmp_path/'m')
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    t = _train(tmp_path, model, _args(tmp_path/'o'), tiny_dataset(n=16), quantization_config=q, **ADAPTERS['lora'])
    assert any('Linear4bit' in type(m).__name__ for m in t.model.modules())
    with pytest.raises(ValueError, match='both as a trainer argument'):
        SFTTrainer(model=str(model), args=_args(tmp_path/'o', model_init_kwargs={'quantization_config': q}), train_dataset=tiny_dataset(n=8),
                   quantization_config=q)

# ---------------------------------------------------------------- what a user is told
# (bad input failing before the model loads is checked in nbs/08_trainer.ipynb, next to the checks)

def test_packing_stats_and_trainable_report_said_once(tmp_path, capsys, caplog):
    "The packing stats and the trainable-parameter line: each logged once by sft_nb.trainer at WARNING, never printed"
    import logging
    with caplog.at_level(logging.WARNING):
        SFTTrainer(model=str(save_tiny(tmp_path/'m')), args=_args(tmp_path/'o', packing=True), train_dataset=tiny_dataset(n=16),
                   **ADAPTERS['lora'])
    said = [r.getMessage() for r in caplog.records if r.name == 'sft_nb.trainer' and r.levelno == logging.WARNING]
    assert sum(m.startswith('Packed train: ') for m in said) == 1, said
    assert sum(m.startswith('trainable params: ') for m in said) == 1, said
    out = capsys.readouterr().out
    assert 'Packed train' not in out and 'trainable params' not in out

def test_packing_stats_and_trainable_report_seen_without_logging_setup(tmp_path):
    "A script that configures no logging shows each line once (Python's last-resort handler prints warnings to stderr)"
    save_tiny(tmp_path/'m')
    code = ("from peft import LoraConfig\nfrom sft_nb import SFTConfig, SFTTrainer\nfrom sft_nb.tiny import tiny_dataset\n"
            "SFTTrainer(model='m', train_dataset=tiny_dataset(n=16), peft_config=LoraConfig(r=4, target_modules='all-linear'),\n"
            "           args=SFTConfig(output_dir='o', packing=True, max_length=128, report_to='none', use_cpu=True))\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(HERE.parent)})
    assert r.returncode == 0, r.stderr[-3000:]
    told = r.stdout + r.stderr
    assert told.count('Packed train: ') == 1 and told.count('trainable params: ') == 1, told[-3000:]
