"""The packing gate (sft_nb.gate) on tiny random models of every family issue 21 names, built from configs: its verdict
against a direct packed-against-alone comparison written here independently, attention models packing, each hybrid
refused with its reason, safe models made unsafe and caught, and SFTTrainer refusing before step 1."""
import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from sft_nb import SFTConfig, SFTTrainer
from sft_nb.gate import check_packing
from sft_nb.packing import DataCollatorForLanguageModeling
from sft_nb.tiny import tiny_dataset, tiny_tokenizer

TOK = tiny_tokenizer()
SIZES = dict(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=TOK.pad_token_id,
             eos_token_id=TOK.eos_token_id, bos_token_id=None, use_cache=False)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16)
DELTANET = dict(layer_types=['linear_attention', 'full_attention'], head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
NO_CONV_KERNEL = "can't keep packed sequences apart without `causal_conv1d`"

# family: (config, attention implementation, what the gate says on a CPU without the hybrid kernels)
FAMILIES = {
    'llama': (lambda: tf.LlamaConfig(num_hidden_layers=2, **SIZES), 'sdpa', None),
    'qwen2': (lambda: tf.Qwen2Config(num_hidden_layers=2, **SIZES), 'sdpa', None),
    # a window shorter than the documents, and both soft-caps, so that the packed mask must combine all three
    'gemma2': (lambda: tf.Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=4,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **SIZES),
               'eager', None),
    'gemma3': (lambda: tf.Gemma3TextConfig(num_hidden_layers=2, head_dim=16, sliding_window=4,
                                           layer_types=['sliding_attention', 'full_attention'], **SIZES),
               'sdpa', None),
    'bamba': (lambda: tf.BambaConfig(num_hidden_layers=2, attn_layer_indices=[1], **MAMBA2, **SIZES),
              'sdpa', NO_CONV_KERNEL),
    'falcon_h1': (lambda: tf.FalconH1Config(num_hidden_layers=2, head_dim=16, mamba_d_ssm=128, **MAMBA2, **SIZES),
                  'sdpa', NO_CONV_KERNEL),
    'nemotron_h': (lambda: tf.NemotronHConfig(num_hidden_layers=2, hybrid_override_pattern='M*', head_dim=16,
                                              mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
                                              chunk_size=16, **SIZES), 'sdpa', NO_CONV_KERNEL),
    'jamba': (lambda: tf.JambaConfig(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                                     expert_layer_period=2, num_experts=2, num_experts_per_tok=1, mamba_d_state=8, **SIZES),
              'sdpa', "JambaMambaMixer layers carry state"),
    'qwen3_next': (lambda: tf.Qwen3NextConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                              **DELTANET, **SIZES), 'sdpa', NO_CONV_KERNEL),
    'qwen3_5': (lambda: tf.Qwen3_5TextConfig(num_hidden_layers=2, **DELTANET, **SIZES), 'sdpa', NO_CONV_KERNEL),
    'lfm2': (lambda: tf.Lfm2Config(num_hidden_layers=2, layer_types=['conv', 'full_attention'], **SIZES),
             'sdpa', NO_CONV_KERNEL),
}
ATTENTION = [k for k, v in FAMILIES.items() if v[2] is None]
HYBRIDS = [k for k, v in FAMILIES.items() if v[2] is not None]


def build(family:str):
    "A tiny random model of `family`, float32, in train mode as `SFTTrainer` hands it over"
    config, attn, _ = FAMILIES[family]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(), dtype=torch.float32, attn_implementation=attn).train()


def collator(padding_free:bool):
    "The collator `SFTTrainer` builds for `packing=True` / `padding_free=True`"
    return DataCollatorForLanguageModeling(TOK.pad_token_id, padding_free, return_position_ids=True,
                                           block_diagonal=True)


def direct_verdict(model, collate, packed:bool) -> bool:
    "Independently of the gate: other documents, through `collate`, packed against alone, float32 tolerance"
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(5, len(TOK), (n,), generator=g).tolist() for n in (9, 13, 6)]
    rows = [{'input_ids': sum(docs, []), 'seq_lengths': [len(d) for d in docs]}] if packed else \
        [{'input_ids': d} for d in docs]
    batch = {k: v for k, v in collate(rows).items() if k != 'labels'}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(**batch).logits[0]
            alone = torch.cat([model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs])
    except ValueError:  # transformers refusing the packed batch
        return False
    finally:
        model.train(was_training)
    gap = (together[:alone.size(0)] - alone).abs().max() / alone.abs().max()
    return gap.item() < 1e-4


def gate_verdict(model, collate, packed:bool) -> tuple[bool, str]:
    try:
        check_packing(model, collate, TOK, packed=packed, rows=2)
        return True, ''
    except ValueError as e:
        return False, str(e)


@pytest.mark.parametrize('padding_free', [False, True], ids=['packing', 'padding_free'])
@pytest.mark.parametrize('family', FAMILIES)
def test_gate_agrees_with_direct_comparison(family, padding_free):
    model = build(family)
    collate, packed = collator(padding_free), not padding_free
    safe, message = gate_verdict(model, collate, packed)
    assert safe == direct_verdict(model, collate, packed)
    expected = FAMILIES[family][2]
    assert safe == (expected is None), message
    if expected is not None:
        assert message.startswith(f"Packing is not safe on {type(model).__name__}:")
        assert expected in message and "packing=False" in message
    assert model.training  # the gate gave the model back in train mode


@pytest.mark.parametrize('family', ATTENTION)
def test_cache_switched_on_is_caught(family):
    "A forward that builds a cache anyway makes transformers ignore the packed position_ids"
    model = build(family)
    model.register_forward_pre_hook(lambda m, args, kw: (args, {**kw, 'use_cache': True}), with_kwargs=True)
    safe, message = gate_verdict(model, collator(False), True)
    assert not safe and not direct_verdict(model, collator(False), True)
    assert "logits on a packed row differ" in message


@pytest.mark.parametrize('padding_free', [False, True], ids=['packing', 'padding_free'])
@pytest.mark.parametrize('family', ATTENTION)
def test_all_ones_mask_is_caught(family, padding_free):
    "An attention_mask of ones in a packed batch lets every document attend to the ones before it"
    def collate(rows):
        batch = collator(padding_free)(rows)
        return {**batch, 'attention_mask': torch.ones_like(batch['input_ids'])}
    model = build(family)
    safe, message = gate_verdict(model, collate, not padding_free)
    assert not safe and not direct_verdict(model, collate, not padding_free)
    assert f"Packing is not safe on {type(model).__name__}" in message


def _args(tmp_path, **kw):
    return SFTConfig(str(tmp_path), use_cpu=True, report_to='none', max_length=64, max_steps=2,
                     per_device_train_batch_size=2, logging_steps=1, save_strategy='no', **kw)


def test_trainer_refuses_unsafe_model_before_step_one(tmp_path):
    model = build('jamba')
    with pytest.raises(ValueError, match="Packing is not safe on JambaForCausalLM: its logits on a packed row"):
        SFTTrainer(model, _args(tmp_path, packing=True), train_dataset=tiny_dataset(n=16), processing_class=TOK)
    before = [p.detach().clone() for p in model.parameters()]
    SFTTrainer(model, _args(tmp_path, packing=True, verify_packing=False), train_dataset=tiny_dataset(n=16),
               processing_class=TOK)  # the opt-out: built, not checked
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class OnesMaskCollator(DataCollatorForLanguageModeling):
    "A subclass that passes every static check (block_diagonal) and still adds an all-ones attention_mask"
    def torch_call(self, examples):
        batch = super().torch_call(examples)
        return {**batch, 'attention_mask': torch.ones_like(batch['input_ids'])}


@pytest.mark.parametrize('flag', ['padding_free', 'eval_packing'])
def test_trainer_gates_padding_free_and_eval_packing(tmp_path, flag):
    "A Mamba-2 hybrid without its kernels: refused for padding-free batches and for packed eval batches alike"
    with pytest.raises(ValueError, match=r"Packing is not safe on BambaForCausalLM: .*causal_conv1d.* BambaMixer"):
        SFTTrainer(build('bamba'), _args(tmp_path, **{flag: True}), train_dataset=tiny_dataset(n=16),
                   processing_class=TOK)


def test_trainer_refuses_a_collator_that_leaks(tmp_path):
    collate = OnesMaskCollator(TOK.pad_token_id, return_position_ids=True, block_diagonal=True)
    with pytest.raises(ValueError, match="Packing is not safe on LlamaForCausalLM"):
        SFTTrainer(build('llama'), _args(tmp_path, packing=True), data_collator=collate,
                   train_dataset=tiny_dataset(n=16), processing_class=TOK)


def test_trainer_trains_a_safe_model_packed(tmp_path, caplog):
    model = build('qwen2')
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level('WARNING', logger='sft_nb.trainer'):
        trainer = SFTTrainer(model, _args(tmp_path, packing=True), train_dataset=tiny_dataset(n=16),
                             processing_class=TOK)
    assert any("Packing gate: Qwen2ForCausalLM keeps packed documents apart" in r.message for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the gate changed nothing
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gate_runs_the_model_as_peft_wraps_it():
    "LoRA with dropout: the gate runs it in eval mode (no dropout), and every module trains again after"
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(build('llama'), LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], lora_dropout=0.5))
    model.train()
    assert check_packing(model, collator(False), TOK, rows=2)['safe']
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"Packing is not safe on LlamaForCausalLM \(in a PeftModel"):
        check_packing(model, OnesMaskCollator(TOK.pad_token_id, return_position_ids=True, block_diagonal=True), TOK)


def test_trainer_refuses_prefix_tuning_packed(tmp_path):
    """Prefix tuning feeds its prefix as a KV cache, and with a cache transformers stops reading packed documents out
    of position_ids: no static check knew, the gate does"""
    from peft import PrefixTuningConfig
    with pytest.raises(ValueError, match=r"Packing is not safe on LlamaForCausalLM \(in a PeftModelForCausalLM\)"):
        SFTTrainer(build('llama'), _args(tmp_path, packing=True), train_dataset=tiny_dataset(n=16),
                   processing_class=TOK, peft_config=PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4))
