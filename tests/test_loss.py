"Integration tests of `sft_nb.loss` through a real `transformers.Trainer`: gradient accumulation, resume, TRL parity."
import json
from pathlib import Path
import pytest, torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from sft_nb.tiny import tiny_model, tiny_tokenizer, tiny_conversations
from sft_nb.loss import sft_loss
from sft_nb.loss_trainer import SFTLossMixin

class LossTrainer(SFTLossMixin, Trainer): pass

def _dataset(n=32):
    "Tokenized chats with labels on the assistant turns only (our `prepare_dataset` format)"
    tok = tiny_tokenizer()
    rows = []
    for conv in tiny_conversations(n, seed=0):
        out = tok.apply_chat_template(conv['messages'], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out['input_ids'])
        rows.append({'input_ids': ids, 'labels': [t if m else -100 for t, m in zip(ids, out['assistant_masks'])]})
    return Dataset.from_list(rows), tok

def _args(out, **kw):
    kw = dict(output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3,
              max_steps=2, logging_steps=1, save_strategy='no', report_to=[], seed=0, data_seed=0,
              remove_unused_columns=False, use_cpu=True, disable_tqdm=True, lr_scheduler_type='constant') | kw
    return TrainingArguments(**kw)

def _train(tmp_path, **kw):
    ds, tok = _dataset()
    model = tiny_model(tokenizer=tok)
    t = LossTrainer(model=model, args=_args(tmp_path, **kw), train_dataset=ds,
                    data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    t.train()
    return t

def test_grad_accumulation_equivalence(tmp_path):
    "batch 8 x GA 1 and batch 1 x GA 8 take the same optimizer steps, so they end with the same weights"
    a = _train(tmp_path/'a', per_device_train_batch_size=8, gradient_accumulation_steps=1)
    b = _train(tmp_path/'b', per_device_train_batch_size=1, gradient_accumulation_steps=8)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    init = tiny_model(tokenizer=tiny_tokenizer()).state_dict()
    assert any(not torch.equal(wa[k], init[k]) for k in wa), "training did not change the weights"
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    la = [h['loss'] for h in a.state.log_history if 'loss' in h]
    lb = [h['loss'] for h in b.state.log_history if 'loss' in h]
    assert len(la) == 2 and la == pytest.approx(lb, rel=1e-5)
    acc = [h['mean_token_accuracy'] for h in a.state.log_history if 'loss' in h]
    assert acc == pytest.approx([h['mean_token_accuracy'] for h in b.state.log_history if 'loss' in h], rel=1e-6)

def test_counters_survive_resume(tmp_path):
    "num_tokens / num_trained_tokens after resuming from checkpoint-2 equal those of an uninterrupted run"
    full = _train(tmp_path/'full', max_steps=4, per_device_train_batch_size=4)
    logs = [h for h in full.state.log_history if 'loss' in h]
    ds, _ = _dataset()
    assert logs[-1]['num_trained_tokens'] > 0 and logs[-1]['num_tokens'] > logs[-1]['num_trained_tokens']
    assert [h['num_tokens'] for h in logs] == sorted(h['num_tokens'] for h in logs)
    _train(tmp_path/'part', max_steps=4, per_device_train_batch_size=4, save_strategy='steps', save_steps=2)
    state = json.loads((tmp_path/'part'/'checkpoint-2'/'trainer_state.json').read_text())
    saved = state['stateful_callbacks']['TokenCounter']['attributes']
    test_logs = [h for h in state['log_history'] if 'loss' in h]
    assert saved['num_tokens'] == test_logs[-1]['num_tokens'] > 0
    for restore in (False, True):
        ds, tok = _dataset()
        t = LossTrainer(model=tiny_model(tokenizer=tok), train_dataset=ds,
                        args=_args(tmp_path/'part', max_steps=4, per_device_train_batch_size=4,
                                   restore_callback_states_from_checkpoint=restore),
                        data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
        t.train(resume_from_checkpoint=str(tmp_path/'part'/'checkpoint-2'))
        last = [h for h in t.state.log_history if 'loss' in h][-1]
        assert (last['num_tokens'], last['num_trained_tokens']) == (logs[-1]['num_tokens'], logs[-1]['num_trained_tokens'])

@pytest.mark.parametrize('loss_type', ['nll', 'dft'])
def test_loss_curve_matches_trl(tmp_path, loss_type):
    "First 10 steps: same init, same batches, no packing -> TRL 1.16's SFTTrainer losses within 1e-4 relative, for NLL and DFT"
    from trl import SFTConfig as TRLConfig, SFTTrainer as TRLTrainer
    ds, tok = _dataset(64)
    kw = dict(per_device_train_batch_size=4, max_steps=10, learning_rate=3e-3)
    args = _args(tmp_path/'ours', **kw)
    args.loss_type = loss_type  # read by SFTLossMixin (an SFTConfig field; plain TrainingArguments here)
    ours = LossTrainer(model=tiny_model(tokenizer=tok), args=args, train_dataset=ds,
                       data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    ours.train()
    targs = TRLConfig(**_args(tmp_path/'trl', **kw).to_dict() | dict(max_length=None, packing=False, dataset_num_proc=None, loss_type=loss_type))
    trl = TRLTrainer(model=tiny_model(tokenizer=tok), args=targs, train_dataset=ds, processing_class=tok)
    trl.train()
    get = lambda t, k: [h[k] for h in t.state.log_history if 'loss' in h]
    assert len(get(ours, 'loss')) == 10
    assert get(ours, 'loss') == pytest.approx(get(trl, 'loss'), rel=1e-4)
    if loss_type == 'nll': assert get(ours, 'loss')[-1] < get(ours, 'loss')[0]  # DFT's -p log p rises as p leaves ~0
    assert get(ours, 'mean_token_accuracy') == pytest.approx(get(trl, 'mean_token_accuracy'), rel=1e-4, abs=1e-6)
    assert get(ours, 'entropy') == pytest.approx(get(trl, 'entropy'), rel=1e-4)
    assert get(ours, 'num_tokens') == get(trl, 'num_tokens')

@pytest.mark.parametrize('kind,port', [('fsdp1', 29571), ('fsdp2', 29572)])
def test_fsdp_sharded_head(kind, port):
    """Two processes on CPU: FSDP2 keeps the chunked head, with the same loss and head gradient as the unsharded model; FSDP1,
    which gathers weights only inside forward (the chunked head would read flat shards), falls back to the model's logits"""
    import os, subprocess, sys
    r = subprocess.run([sys.executable, str(Path(__file__).parent/'fsdp_worker.py'), kind, str(port)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith('{')))
    assert out['loss'] == pytest.approx(out['ref'], rel=1e-6)
    if kind == 'fsdp1': assert 'FSDP1' in out['blocker']
    else: assert out['blocker'] is None and out['grad_ok']

def test_moe_aux_loss_matches_trl(tmp_path):
    "A tiny Mixtral with gradient accumulation: losses and the logged aux_loss equal TRL 1.16's (which adds coef * aux / GA steps)"
    from transformers import MixtralConfig, AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig, SFTTrainer as TRLTrainer
    ds, tok = _dataset(32)
    def moe():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(MixtralConfig(
            vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1, use_cache=False, pad_token_id=3, eos_token_id=2))
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5, learning_rate=3e-3)
    ours = LossTrainer(model=moe(), args=_args(tmp_path/'ours', **kw), train_dataset=ds,
                       data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    ours.train()
    targs = TRLConfig(**_args(tmp_path/'trl', **kw).to_dict() | dict(max_length=None, packing=False, dataset_num_proc=None))
    trl = TRLTrainer(model=moe(), args=targs, train_dataset=ds, processing_class=tok)
    trl.train()
    get = lambda t, k: [h[k] for h in t.state.log_history if 'loss' in h]
    assert ours.router_aux_loss_coef == 0.1 and len(get(ours, 'aux_loss')) == 5
    assert get(ours, 'aux_loss') == pytest.approx(get(trl, 'aux_loss'), rel=1e-4)
    assert get(ours, 'loss') == pytest.approx(get(trl, 'loss'), rel=1e-4)


def test_label_smoothing_matches_transformers_trainer(tmp_path):
    "label_smoothing_factor=0.1: the same 4 losses as a stock `Trainer` (its LabelSmoother on full logits), and not those without it"
    ds, tok = _dataset(32)
    kw = dict(per_device_train_batch_size=8, max_steps=4, learning_rate=3e-3, label_smoothing_factor=0.1)
    ours = LossTrainer(model=tiny_model(tokenizer=tok), args=_args(tmp_path/'ours', **kw), train_dataset=ds,
                       data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    ours.train()
    stock = Trainer(model=tiny_model(tokenizer=tok), args=_args(tmp_path/'stock', **kw), train_dataset=ds,
                    data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    stock.train()
    plain = LossTrainer(model=tiny_model(tokenizer=tok), args=_args(tmp_path/'plain', **(kw | dict(label_smoothing_factor=0.0))),
                        train_dataset=ds, data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    plain.train()
    get = lambda t: [h['loss'] for h in t.state.log_history if 'loss' in h]
    assert get(ours) == pytest.approx(get(stock), rel=1e-4)
    assert abs(get(ours)[-1] - get(plain)[-1]) > 1e-2  # it did change the loss (logits are near uniform at step 1)
