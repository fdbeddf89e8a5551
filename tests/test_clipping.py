"""Gradient clipping in one pass (sft_nb.optim.clip_grad_norm, SFTTrainer._clip_grad_norm): training gives the same
weights and logged `grad_norm`s as `Trainer`'s own clipping, when clipping happens and when it does not, with gradient
accumulation; folded into the fused AdamW step only where it may be, and `Trainer`'s multiplication otherwise."""
import pytest, torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from sft_nb import SFTConfig, SFTTrainer
from sft_nb.optim import fused_adam
from sft_nb.tiny import save_tiny, tiny_dataset


class TrainerClipping(SFTTrainer):
    "The reference: `Trainer`'s own clipping (`accelerator.clip_grad_norm_`, a second pass over every gradient)"
    def _clip_grad_norm(self, model): return Trainer._clip_grad_norm(self, model)


class SeesGradScale(TrainerCallback):
    "Records, at each optimizer step, whether it divides the gradients by a `grad_scale` (clipping folded in)"
    def __init__(self): self.folded = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, 'optimizer', optimizer)
        def seen(opt, args, kwargs): self.folded.append(getattr(opt, 'grad_scale', None) is not None)
        inner.register_step_pre_hook(seen)


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    save_tiny(d, arch='qwen2')
    return d


def _train(cls, path, out, **kw):
    "Train 4 steps; the weights, logged grad norms, and per step whether clipping was folded into the step"
    d = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, logging_steps=1, report_to='none',
             save_strategy='no', use_cpu=True, max_length=128, seed=0, gradient_checkpointing=False, learning_rate=1e-3)
    seen = SeesGradScale()
    t = cls(model=str(path), args=SFTConfig(**{**d, **kw}), train_dataset=tiny_dataset(n=64), callbacks=[seen])
    t.train()
    norms = [h['grad_norm'] for h in t.state.log_history if 'grad_norm' in h]
    return t, {k: v.detach().clone() for k, v in t.model.state_dict().items()}, norms, seen.folded


@pytest.mark.parametrize('max_grad_norm,accumulation,clips',
                         [(1.0, 1, True), (1e4, 1, False), (1.0, 2, True), (1e4, 2, False)])
def test_same_training_as_trainer_clipping(model_path, tmp_path, max_grad_norm, accumulation, clips):
    "Fused AdamW (the default): folded above max_grad_norm, untouched below; weights and grad_norm as Trainer's"
    kw = dict(max_grad_norm=max_grad_norm, gradient_accumulation_steps=accumulation)
    t, ours, our_norms, folded = _train(SFTTrainer, model_path, tmp_path/'ours', **kw)
    assert fused_adam(t.optimizer) is not None
    _, ref, ref_norms, ref_folded = _train(TrainerClipping, model_path, tmp_path/'ref', **kw)
    assert len(our_norms) == 4 and all((n > max_grad_norm) == clips for n in ref_norms), ref_norms
    assert folded == [clips] * 4 and ref_folded == [False] * 4
    assert our_norms[0] == ref_norms[0]  # same gradients, same norm
    assert our_norms == pytest.approx(ref_norms, rel=1e-5)
    if clips:  # dividing by 1/coef in the fused step, not multiplying by coef: float32 rounding apart
        torch.testing.assert_close(ours, ref)
    else:  # no clipping: not one operation differs
        assert all(torch.equal(ours[k], ref[k]) for k in ref)
    start = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    assert any(not torch.equal(ours[k], v) for k, v in start.items())  # it trained


@pytest.mark.parametrize('optim', ['sgd', 'adamw_torch'])
def test_other_optimizers_clip_as_trainer(model_path, tmp_path, optim):
    "Not torch's fused Adam: no folding; clipping multiplies as Trainer does, so weights are bit for bit Trainer's"
    kw = dict(max_grad_norm=1.0, optim=optim)
    t, ours, our_norms, folded = _train(SFTTrainer, model_path, tmp_path/'ours', **kw)
    assert fused_adam(t.optimizer) is None
    _, ref, ref_norms, _ = _train(TrainerClipping, model_path, tmp_path/'ref', **kw)
    assert all(n > 1.0 for n in ref_norms), ref_norms
    assert folded == [False] * 4
    assert our_norms == ref_norms
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_callback_reading_gradients_gets_them_clipped(model_path, tmp_path):
    "A callback with on_pre_optimizer_step sees clipped gradients, as under Trainer: then clipping is not folded"
    class GradNorms(TrainerCallback):
        def __init__(self): self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.norms.append(torch.nn.utils.get_total_norm(grads).item())
    reader = GradNorms()
    _, _, norms, folded = _train(SFTTrainer, model_path, tmp_path/'cb', max_grad_norm=1.0)
    assert all(n > 1.0 for n in norms) and folded == [True] * 4
    args = SFTConfig(output_dir=str(tmp_path/'cb2'), max_steps=2, per_device_train_batch_size=4, report_to='none',
                     save_strategy='no', use_cpu=True, max_length=128, seed=0, max_grad_norm=1.0, learning_rate=1e-3)
    t = SFTTrainer(model=str(model_path), args=args, train_dataset=tiny_dataset(n=64), callbacks=[reader])
    t.train()
    assert reader.norms == pytest.approx([1.0, 1.0], rel=1e-4)
