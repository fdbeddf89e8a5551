"""Two CPU processes (gloo) run `sft_loss` on a tiny Llama sharded by FSDP1 or FSDP2 and print, from rank 0, a JSON line:
which path the loss took, the loss, the reference loss of the unsharded model, and whether the LM head's gradient matches.

    python tests/fsdp_worker.py fsdp1|fsdp2 PORT
"""
import json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, kind, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), HF_HUB_OFFLINE='1')
    dist.init_process_group('gloo', rank=rank, world_size=2)
    torch.set_num_threads(1)
    from sft_nb.tiny import tiny_model, tiny_tokenizer
    from sft_nb.loss import sft_loss, fused_head_blocker
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(tokenizer=tok, tie_word_embeddings=False)
    ref = tiny_model(tokenizer=tok, tie_word_embeddings=False)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    if kind == 'fsdp1':
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        model = FSDP(model, use_orig_params=True, device_id=torch.device('cpu'), auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers: fully_shard(layer)
        fully_shard(model)
    blocker = fused_head_blocker(model)
    loss, _ = sft_loss(model, batch)
    loss.backward()
    ref_loss, _ = sft_loss(ref, batch)
    ref_loss.backward()
    grad_ok = None
    if kind == 'fsdp2':
        g = model.lm_head.weight.grad
        grad_ok = bool(torch.allclose(g.full_tensor(), ref.lm_head.weight.grad, atol=1e-6))
    if rank == 0: print(json.dumps({'blocker': blocker, 'loss': loss.item(), 'ref': ref_loss.item(), 'grad_ok': grad_ok}), flush=True)
    # both ranks done with every collective before the group goes: one CI run saw rank 1 abort in teardown
    # ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()

if __name__ == '__main__': mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
