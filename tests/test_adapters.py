"""LoRA / DoRA / QLoRA beyond the notebook page: QLoRA gradients against an fp32 reference, 8-bit, saving, merging, TRL parity.

The QLoRA tests run on the CPU everywhere and again on CUDA where there is a GPU (the `cuda` cases, skipped without one).
Each pins its device with a `device_map`: left alone, bitsandbytes would put every quantized model on the GPU."""
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

bnb = pytest.importorskip('bitsandbytes')

from sft_nb.adapters import (apply_peft, count_parameters, get_peft_config, is_peft_model, load_adapter, merge_adapters,
                             trainable_report)
from sft_nb.config import ModelConfig
from sft_nb.models import load_model
from sft_nb.tokenizer import load_tokenizer, prepare_tokenizer
from sft_nb.tiny import save_tiny

X = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
DEVICES = ['cpu', pytest.param('cuda', marks=cuda)]

def _on(device): return {'device_map': {'': 0 if device == 'cuda' else 'cpu'}}

def _q4(path, device='cpu', **kw):
    "A 4-bit model on `device`, computing in float32 unless told"
    return load_model(path, model_args=ModelConfig(load_in_4bit=True, **{'dtype': 'float32', **kw}), **_on(device))


@pytest.fixture(scope='module')
def tiny_path(tmp_path_factory): return save_tiny(tmp_path_factory.mktemp('a')/'tiny')


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Linear4bit layers built as on a CPU with AVX512-BF16, where bitsandbytes turns on `support_avx512bf16_for_cpu` (and with it
    the in-place repacking at the first eval forward). The repacking is plain torch code, so this reproduces the bug on any CPU."""
    monkeypatch.setattr(bnb.nn.modules, 'has_avx512bf16', lambda: True)


def _lora(**kw): return LoraConfig(r=4, lora_alpha=8, target_modules='all-linear', init_lora_weights=False, lora_dropout=0.0, **kw)


def _dequantized_twin(qmodel, path):
    "An fp32 model whose linear layers hold exactly the dequantized 4-bit weights of `qmodel`"
    ref = load_model(path, dtype='float32')
    mods = dict(ref.named_modules())
    for name, m in qmodel.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mods[name].weight.data.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float())
    return ref


def _grads(model):
    model.zero_grad()
    x = X.to(model.device)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _eval_pass(model):
    "What evaluation and generation do: eval mode, no gradients, a forward over the batch and one over a single token"
    model.eval()
    with torch.no_grad():
        model(input_ids=X.to(model.device))
        model(input_ids=X[:1, :1].to(model.device))  # one token: bitsandbytes' inference kernel (gemv on CUDA)
    model.train()


def _qlora_pair(path, quant_type, nested, device='cpu', **lora_kw):
    q = _q4(path, device, bnb_4bit_quant_type=quant_type, use_bnb_nested_quant=nested)
    ref = _dequantized_twin(q, path).to(device)
    torch.manual_seed(0)
    q = apply_peft(q, _lora(**lora_kw))
    ref = apply_peft(ref, _lora(**lora_kw))
    set_peft_model_state_dict(ref, get_peft_model_state_dict(q))
    return q, ref


def _assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('quant_type,nested', [('nf4', True), ('nf4', False), ('fp4', True)])
def test_qlora_grads_match_dequantized_fp32_before_and_after_eval(avx512bf16_cpu, tiny_path, quant_type, nested, device):
    q, ref = _qlora_pair(tiny_path, quant_type, nested, device)
    want = _grads(ref)
    _assert_grads_close(_grads(q), want)
    _eval_pass(q)
    _assert_grads_close(_grads(q), want)


@pytest.mark.parametrize('device', DEVICES)
def test_qdora_grads_match_dequantized_fp32(avx512bf16_cpu, tiny_path, device):
    q, ref = _qlora_pair(tiny_path, 'nf4', True, device, use_dora=True)
    want = _grads(ref)
    _assert_grads_close(_grads(q), want)
    _eval_pass(q)
    _assert_grads_close(_grads(q), want)


def test_without_the_layout_fix_grads_go_wrong_after_eval(avx512bf16_cpu, tiny_path, monkeypatch):
    "The reason for keep_bnb_layout: without it, the same comparison fails after an eval pass"
    import sft_nb.adapters, sft_nb.models
    for mod in (sft_nb.models, sft_nb.adapters): monkeypatch.setattr(mod, 'keep_bnb_layout', lambda model: 0)
    q, ref = _qlora_pair(tiny_path, 'nf4', True)
    assert all(m.support_avx512bf16_for_cpu for m in q.modules() if isinstance(m, bnb.nn.Linear4bit))
    want = _grads(ref)
    _eval_pass(q)
    got = _grads(q)
    worst = max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)
    assert worst > 0.05, worst  # not rounding: the weights the backward pass reads are no longer the model's


@pytest.mark.parametrize('device', DEVICES)
def test_4bit_save_after_eval_reloads_same_model(avx512bf16_cpu, tiny_path, tmp_path, device):
    q = _q4(tiny_path, device)
    _eval_pass(q)
    q.eval()
    with torch.no_grad(): before = q(input_ids=X.to(device)).logits
    q.save_pretrained(tmp_path/'q4')
    again = load_model(tmp_path/'q4', **_on(device)).eval()
    assert again.is_loaded_in_4bit and again.model.layers[0].self_attn.q_proj.weight.device.type == device
    with torch.no_grad(): torch.testing.assert_close(again(input_ids=X.to(device)).logits, before)


@pytest.mark.parametrize('device', DEVICES)
def test_4bit_parameter_count_matches_peft(tiny_path, device):
    q = apply_peft(_q4(tiny_path, device), _lora())
    full = apply_peft(load_model(tiny_path), _lora())
    assert count_parameters(q) == tuple(q.get_nb_trainable_parameters()) == count_parameters(full)
    assert trainable_report(q) == trainable_report(full)


@pytest.mark.parametrize('device', DEVICES)
def test_8bit_lora_trains(tiny_path, device):
    m = load_model(tiny_path, model_args=ModelConfig(load_in_8bit=True), **_on(device))
    q_proj = m.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == 'Linear8bitLt' and q_proj.weight.device.type == device
    torch.manual_seed(0)
    m = apply_peft(m, LoraConfig(r=4, target_modules='all-linear'))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses, x = [], X.to(device)
    for _ in range(8):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_get_peft_config_matches_trl_but_defaults_to_all_linear():
    from trl.trainer.utils import get_peft_config as trl_get_peft_config
    args = ModelConfig(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.1, use_rslora=True, use_dora=True,
                       lora_target_modules=['q_proj'], lora_modules_to_save=['lm_head'])
    ours, trl = get_peft_config(args).to_dict(), trl_get_peft_config(args).to_dict()
    assert ours == trl
    assert get_peft_config(ModelConfig(use_peft=True)).target_modules == 'all-linear'
    assert trl_get_peft_config(ModelConfig(use_peft=True)).target_modules is None


def _train_step(model, ids, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize('tied', [True, False])
def test_added_tokens_train_save_reload_and_merge(tiny_path, tmp_path, tied):
    "Rows of added tokens train with LoRA, are saved with the adapter, reload, and survive merging"
    path = save_tiny(tmp_path/'base', tie_word_embeddings=tied)
    tok, model = load_tokenizer(path), load_model(path)
    tok.add_special_tokens({'additional_special_tokens': ['<|tool|>']})
    prepare_tokenizer(tok, model)
    new_id = tok.convert_tokens_to_ids('<|tool|>')
    model = apply_peft(model, _lora())
    if not tied: assert 'lm_head' in model.peft_config['default'].modules_to_save
    ids = torch.tensor([[5, new_id, 7, new_id, 9]])
    emb_before = model.get_input_embeddings()(torch.tensor([new_id, 5])).detach().clone()
    _train_step(model, ids)
    emb_after = model.get_input_embeddings()(torch.tensor([new_id, 5])).detach()
    assert not torch.allclose(emb_after[0], emb_before[0])  # the new row trained
    torch.testing.assert_close(emb_after[1], emb_before[1])  # old rows did not
    model.eval()
    with torch.no_grad(): want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path/'ad')
    tok.save_pretrained(tmp_path/'ad')
    loaded = load_adapter(tmp_path/'ad').eval()
    with torch.no_grad(): torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    merged = merge_adapters(tmp_path/'ad', tmp_path/'merged', tokenizer=tok)
    assert not is_peft_model(merged)
    again = load_model(tmp_path/'merged')
    with torch.no_grad(): torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_qlora_merge_after_training_matches_adapter_on_full_precision_base(avx512bf16_cpu, tiny_path, tmp_path, device):
    "Merging reloads the base unquantized (on the CPU, whatever device trained): merged and unmerged agree to 1e-5"
    q = apply_peft(_q4(tiny_path, device, dtype='auto'), _lora(use_dora=True))
    _train_step(q, X.to(device), lr=0.05)
    _eval_pass(q)
    q.save_pretrained(tmp_path/'qad')
    merged = merge_adapters(q, tmp_path/'merged')
    on_full = load_adapter(tmp_path/'qad', is_trainable=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path/'merged')(input_ids=X).logits, on_full(input_ids=X).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=X).logits, on_full(input_ids=X).logits, rtol=1e-5, atol=1e-5)


@cuda
def test_qlora_on_cuda_bf16_grads_match_dequantized_reference(tiny_path):
    "bfloat16 compute on CUDA, as QLoRA is usually run: the same comparison within bfloat16 rounding, before and after eval"
    q = _q4(tiny_path, 'cuda', dtype='bfloat16')
    assert q.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    ref = _dequantized_twin(q, tiny_path).to('cuda', torch.bfloat16)
    torch.manual_seed(0)
    q = apply_peft(q, _lora())
    ref = apply_peft(ref, _lora())
    set_peft_model_state_dict(ref, get_peft_model_state_dict(q))
    want = _grads(ref)
    _assert_grads_close(_grads(q), want, rtol=0.1, atol=1e-3)
    _eval_pass(q)
    _assert_grads_close(_grads(q), want, rtol=0.1, atol=1e-3)


PROMPT_LEARNING = ['prompt_tuning', 'prompt_encoder', 'prefix_tuning', 'prompt_encoder_model']

def _prompt_learning(kind, path):
    "TRL's prompt-learning cases: (model, peft_config) as its tests pass them"
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
    cfg = {'prompt_tuning': lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
           'prompt_encoder': lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=16),
           'prefix_tuning': lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
           'prompt_encoder_model': lambda: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8)}[kind]()
    if kind != 'prompt_encoder_model': return str(path), cfg
    torch.manual_seed(0)
    return get_peft_model(load_model(path, dtype='float32'), cfg), None

def _prompt_run(lib, kind, path, out, **kw):
    "Train 5 steps on one batch of 8 rows: (losses, names of the parameters that changed, targets per row and first token)"
    from sft_nb.tiny import tiny_dataset
    model, cfg = _prompt_learning(kind, path)
    args = lib.SFTConfig(output_dir=str(out), max_steps=5, per_device_train_batch_size=8, learning_rate=3e-2, logging_steps=1,
                         report_to='none', save_strategy='no', use_cpu=True, seed=0, **kw)
    t = lib.SFTTrainer(model=model, args=args, train_dataset=tiny_dataset('text', n=8), peft_config=cfg)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(before[n], p)}
    labels = [r['labels'] for r in t.train_dataset]
    first = sum(l[0] != -100 for l in labels)
    return [h['loss'] for h in t.state.log_history if 'loss' in h], changed, (sum(sum(x != -100 for x in l[1:]) for l in labels), first)

@pytest.mark.parametrize('kind', PROMPT_LEARNING)
def test_prompt_learning_trains_as_under_trl(tiny_path, tmp_path, kind):
    """Prompt tuning, p-tuning (as a config and as a PeftModel passed in) and prefix tuning train through SFTTrainer: the loss goes
    down, only the prompt encoder changes, and the losses are TRL's on the same script (TRL's tests turn checkpointing off).
    Virtual tokens make the first token of a row a target too (peft's own loss counts it); TRL trains it but divides by the count
    without it, which overstates its loss by that ratio, and scales its gradients by it (Adam, nearly scale-free, follows the same path)"""
    import trl
    import sft_nb
    ours, changed, (n, first) = _prompt_run(sft_nb, kind, tiny_path, tmp_path/'a', gradient_checkpointing=False)
    ref, ref_changed, _ = _prompt_run(trl, kind, tiny_path, tmp_path/'b', gradient_checkpointing=False)
    assert ours[-1] < ours[0] and changed == ref_changed and all(n.startswith('prompt_encoder.') for n in changed), (ours, changed)
    overstated = (n + first) / n if kind != 'prefix_tuning' else 1
    assert [l * overstated for l in ours] == pytest.approx(ref, rel=2e-3)

def test_prompt_learning_loss_is_peft_native_loss(tiny_path, tmp_path):
    "The trainer's loss on a batch is the one peft's model computes itself from the labels (first token included)"
    import sft_nb
    model, _ = _prompt_learning('prompt_encoder_model', tiny_path)
    t = sft_nb.SFTTrainer(model=model, train_dataset=__import__('sft_nb.tiny').tiny.tiny_dataset('text', n=8),
                          args=sft_nb.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to='none', use_cpu=True))
    b = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    with torch.no_grad():
        native = t.model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels']).loss
        torch.testing.assert_close(t.compute_loss(t.model, b, num_items_in_batch=(b['shift_labels'] != -100).sum()), native)

def test_prompt_learning_refuses_packing(tiny_path, tmp_path):
    "peft drops position_ids under prompt tuning, so packed documents would see each other"
    import sft_nb
    from sft_nb.tiny import tiny_dataset
    model, cfg = _prompt_learning('prompt_tuning', tiny_path)
    with pytest.raises(ValueError, match='packing=False'):
        sft_nb.SFTTrainer(model=model, train_dataset=tiny_dataset('text', n=8), peft_config=cfg,
                          args=sft_nb.SFTConfig(output_dir=str(tmp_path), packing=True, report_to='none', use_cpu=True))

def test_prefix_tuning_trains_with_default_checkpointing(tiny_path, tmp_path):
    "TRL fails here (the checkpointed layers drop the prefix cache: a shape error); sft_nb turns checkpointing off and trains"
    import trl
    import sft_nb
    with pytest.raises(RuntimeError, match='must match the size'): _prompt_run(trl, 'prefix_tuning', tiny_path, tmp_path/'b')
    losses, changed, _ = _prompt_run(sft_nb, 'prefix_tuning', tiny_path, tmp_path/'a')
    assert losses[-1] < losses[0] and changed and all(n.startswith('prompt_encoder.') for n in changed)
