"""Per-rank peak memory of the loss under FSDP2 and DeepSpeed ZeRO-3 (issue 22): sft_nb's chunked, label-only LM head
against TRL 1.16's SFTTrainer on the same work, and against the full-logits fallback (sft_nb with the model's own
`[batch, length, vocab]` logits, what TRL computes), two CPU processes through the real `accelerate launch`, on a
tiny Llama with a large vocabulary, where the logits dominate the step's memory.

Each run is `tests/distributed_script.py` (the script tests/test_distributed.py launches), with `--trl` for TRL's
trainer and `--full_logits` for the fallback; each rank records its peak resident memory (ru_maxrss) and its resident
memory before training. The metric is the larger rank's peak above its memory before training: what the training
step adds on top of the loaded model. Runs alternate sft_nb / TRL / fallback; the median of `--repeats` (>= 3) is
kept. The losses of the three must agree (the same work).

DeepSpeed comes from the environment or from SFT_NB_DEEPSPEED_PATH (a `pip install --target` folder); without it the
ZeRO-3 rows are left out.

python bench/bench_scale.py [--vocab 131072] [--repeats 3] [--steps 3]
"""
import argparse, os, statistics, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT/'tests'), str(ROOT/'bench')]
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from sft_nb.tiny import tiny_config, tiny_tokenizer  # noqa: E402
import test_distributed as td  # noqa: E402  (the launcher helpers the tests use)
from results_file import row, write  # noqa: E402


def save_base(path:Path, vocab:int):
    "The tiny Llama with `vocab` rows in its (tied) embeddings and LM head; the tiny tokenizer uses the first 384"
    tok = tiny_tokenizer()
    cfg = tiny_config(vocab_size=vocab)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)


KINDS = {'sft_nb': [], 'trl': ['--trl'], 'full': ['--full_logits']}


def peak_above_load(tmp:Path, name:str, config:Path, port:int, steps:int, kind:str) -> tuple[float, list]:
    "One launch: the larger rank's peak RSS above its RSS before training (MiB), and the losses"
    out = tmp/name
    rec = tmp/f'{name}.json'
    flags = ['--max_steps', str(steps), '--save_steps', '1000', '--record', str(rec)]
    td._run(out, *flags, *KINDS[kind], config=config, port=port)
    recs = [td._record(rec, r) for r in (0, 1)]
    assert kind != 'sft_nb' or all(r['head_blocker'] is None for r in recs), recs[0]['head_blocker']
    return max(r['peak_rss_mib'] - r['rss_before_train_mib'] for r in recs), list(td._losses(recs[0]).values())


def same(xs:list, ys:list) -> bool:
    "The same losses, to 1e-4"
    return len(xs) == len(ys) and all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(xs, ys))


def has_deepspeed() -> bool:
    import importlib.util
    if importlib.util.find_spec('deepspeed') is not None: return True
    return (Path(os.environ.get('SFT_NB_DEEPSPEED_PATH', '/nonexistent'))/'deepspeed').is_dir()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--vocab', type=int, default=131072)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--steps', type=int, default=3)
    a = p.parse_args()
    engines = {'fsdp2': ('fsdp2', td.FSDP2_CPU)}
    if has_deepspeed(): engines['zero3'] = ('zero3', td.DS_CPU)
    else: print('DeepSpeed not found (pip install deepspeed, or SFT_NB_DEEPSPEED_PATH): ZeRO-3 rows left out')
    rows, port = [], 29800
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for engine, (profile, changes) in engines.items():
            config = td._config(tmp, profile, changes)
            runs = {kind: [] for kind in KINDS}
            losses = {}
            for i in range(a.repeats):
                for kind in KINDS:  # interleaved
                    name = f'{engine}-{kind}-{i}'
                    save_base(tmp/name/'base', a.vocab)
                    port += 1
                    mib, losses[kind] = peak_above_load(tmp, name, config, port, a.steps, kind)
                    runs[kind].append(mib)
                    print(f'{engine} {kind} run {i}: peak {mib:.0f} MiB above load', flush=True)
            agree = same(losses['sft_nb'], losses['full']) and same(losses['sft_nb'], losses['trl'])
            med = {kind: statistics.median(v) for kind, v in runs.items()}
            print(f"{engine}: sft_nb {med['sft_nb']:.0f} MiB, TRL {med['trl']:.0f} MiB, full-logits fallback "
                  f"{med['full']:.0f} MiB per rank ({med['sft_nb'] / med['trl']:.2f}x TRL); same losses: {agree}")
            rows.append(row(f'{engine}, 2 CPU processes, tiny Llama with a {a.vocab}-token vocabulary, '
                            f'4 rows a rank, full fine-tuning, {a.steps} steps',
                            'peak MiB per rank above the loaded model (RSS)',
                            round(med['sft_nb'], 1), trl=round(med['trl'], 1), floor=round(med['full'], 1),
                            floor_name="full-logits fallback (sft_nb with the model's [B, T, V] logits)",
                            target='< 1x TRL and < 1x the full-logits fallback, same losses',
                            met=bool(med['sft_nb'] < min(med['trl'], med['full']) and agree),
                            same_losses=agree))
    out = write('scale', 'python bench/bench_scale.py', rows, threads=1)
    print(f"wrote bench/results/scale.json: {out['machine']}")


if __name__ == '__main__':
    main()
