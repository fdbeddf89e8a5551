"""Dataset preparation of tool-calling and reasoning conversations: sft_nb's `prepare_dataset` vs TRL 1.16's
`SFTTrainer._prepare_dataset`, assistant-only loss, in one run, interleaved, best of `--repeat`. Prints both times, the
speed-up, the tokenizer-alone floor (encoding the rendered conversations, nothing else) and whether the trained tokens
agree (for tool calls they don't: TRL trains on the tokens of its training variant of the template, sft_nb on those of
the template itself, which inference uses). Writes bench/results/turns.json.

- tool calls: Qwen 2.5's template (tools in the system prompt, `<tool_call>` turns, tool results); TRL swaps it for its
  `qwen2_5_training` variant, sft_nb keeps it (it renders prefix by prefix) and diffs prefixes.
- reasoning: Qwen 3's own template with `reasoning_content`; both train on TRL's `qwen3_training` variant.

Both kinds render through sft_nb's stencils (04a_stencil): Jinja once per conversation shape, reads of a text kept as
guards. sft_nb then encodes each distinct piece between added tokens once (04c_tokens, `encode_pieces`): the system
prompt with the tool schemas, the turn headers. Where pieces repeat it can take less time than the floor, which encodes
every text whole. Issue 20 asks for >= 4x TRL's speed on 20k conversations of each kind (`--full`).

    python bench/bench_turns.py [--n 2000 | --full] [--repeat 3]
"""
import argparse, json, os, platform, random, tempfile, time
from pathlib import Path
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import machine  # noqa: E402
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import datasets, torch
from datasets import Dataset

from sft_nb.chat import chat_template_file
from sft_nb.config import SFTConfig
from sft_nb.data import prepare_dataset
from sft_nb.tokens import fast_backend
from sft_nb.tiny import tiny_tokenizer, tiny_pairs

TOOLS = [{'type': 'function', 'function': {'name': n, 'description': d, 'parameters': {
    'type': 'object', 'properties': {'a': {'type': 'integer'}, 'b': {'type': 'integer'}}, 'required': ['a', 'b']}}}
    for n, d in (('add', 'Add two numbers'), ('sub', 'Subtract b from a'))]


def tool_conversations(n, seed=0):
    "1-3 rounds of: question, a tool call, its result, the answer"
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            name = rng.choice(['add', 'sub'])
            result = a + b if name == 'add' else a - b
            call = [{'type': 'function', 'function': {'name': name, 'arguments': {'a': a, 'b': b}}}]
            msgs += [{'role': 'user', 'content': f"What is {a} {'+' if name == 'add' else '-'} {b}?"},
                     {'role': 'assistant', 'content': '', 'tool_calls': call},
                     {'role': 'tool', 'name': name, 'content': str(result)},
                     {'role': 'assistant', 'content': f"It is {result}."}]
        rows.append({'messages': msgs, 'tools': TOOLS})
    return Dataset.from_list(rows)


def reasoning_conversations(n, seed=0):
    "1-4 turns, each answer with its reasoning"
    rng, pairs = random.Random(seed), iter(tiny_pairs(n * 4, seed))
    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            p, a = next(pairs)
            msgs += [{'role': 'user', 'content': p},
                     {'role': 'assistant', 'content': a, 'reasoning_content': f"The question is {p} So {a}."}]
        rows.append({'messages': msgs})
    return Dataset.from_list(rows)


def tokenizer(template, specials):
    t = tiny_tokenizer(template)
    t.add_special_tokens({'additional_special_tokens': specials})
    t.eos_token = '<|im_end|>'
    return t


def trl_prepare(ds, tok):
    from trl import SFTConfig as TRLConfig, SFTTrainer
    args = TRLConfig(output_dir=tempfile.mkdtemp(), report_to=[], assistant_only_loss=True, max_length=None,
                     use_cpu=True, bf16=False)
    trainer = SFTTrainer.__new__(SFTTrainer)  # only the dataset preparation is timed, not model loading
    trainer._tokenizer, trainer.completion_only_loss = tok, False
    from trl.trainer.sft_trainer import get_training_chat_template
    trainer.chat_template = get_training_chat_template(tok)
    return trainer._prepare_dataset(ds, tok, args, packing=False, formatting_func=None, dataset_name='train')


def ours_prepare(ds, tok):
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], assistant_only_loss=True, max_length=None)
    return prepare_dataset(ds, tok, args)


def trained(ds):
    return [[x for x, y in zip(ids, labels) if y != -100] for ids, labels in zip(ds['input_ids'], ds['labels'])]


def timed(f, *a):
    t = time.perf_counter()
    out = f(*a)
    return out, time.perf_counter() - t


def floor_texts(ds, tok):
    "The conversations as sft_nb renders them (with TRL's training template where it swaps), for the floor"
    from sft_nb.chat import training_template
    template = training_template(tok)
    return [tok.apply_chat_template(r['messages'], tools=r.get('tools'), tokenize=False, chat_template=template)
            for r in ds]


def encode(texts, backend):
    return backend.encode_batch(texts, add_special_tokens=False)


def compare(name, ds, tok, repeat):
    "Best-of-`repeat` times of sft_nb, TRL and the tokenizer alone, interleaved"
    texts, backend = floor_texts(ds, tok), fast_backend(tok)
    best = {'sft_nb': float('inf'), 'trl': float('inf'), 'floor': float('inf')}
    for _ in range(repeat):
        ours, t = timed(ours_prepare, ds, tok)
        best['sft_nb'] = min(best['sft_nb'], t)
        trl, t = timed(trl_prepare, ds, tok)
        best['trl'] = min(best['trl'], t)
        best['floor'] = min(best['floor'], timed(encode, texts, backend)[1])
    masks = trl['assistant_masks'] if 'assistant_masks' in trl.column_names else None
    theirs = trained(trl) if masks is None else [[x for x, m in zip(ids, mask) if m]
                                                 for ids, mask in zip(trl['input_ids'], masks)]
    same = trained(ours) == theirs
    speedup = best['trl'] / best['sft_nb']
    print(f"{name}: {len(ds)} conversations   TRL 1.16: {best['trl']:.2f} s   sft_nb: {best['sft_nb']:.2f} s   "
          f"speed-up: {speedup:.1f}x   tokenizer alone: {best['floor']:.2f} s "
          f"(sft_nb {best['sft_nb'] / best['floor']:.2f}x it)   same trained tokens: {same}")
    return {'workload': f"{name}: {len(ds)} conversations, assistant masks", 'metric': 'prep seconds',
            'sft_nb': round(best['sft_nb'], 3), 'trl': round(best['trl'], 3), 'floor': round(best['floor'], 3),
            'floor_name': 'tokenizer alone', 'ratio_vs_trl': round(best['sft_nb'] / best['trl'], 3),
            'ratio_vs_floor': round(best['sft_nb'] / best['floor'], 3),
            'target': ">= 4x faster than TRL (sft_nb <= 0.25x TRL's time)", 'met': speedup >= 4}



if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=2000, help="conversations of each kind")
    ap.add_argument('--full', action='store_true', help="issue 20's size: 20,000 of each kind")
    ap.add_argument('--repeat', type=int, default=3, help="interleaved runs of each; the best time counts")
    a = ap.parse_args()
    n = 20000 if a.full else a.n
    torch.set_num_threads(1)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    # TRL's copy (with a final newline): TRL 1.16 recognises templates byte for byte, and refuses the model's own
    qwen2_5 = chat_template_file('qwen2_5')
    rows = [compare('tool calls (Qwen 2.5)', tool_conversations(n),
                    tokenizer(qwen2_5, ['<tool_call>', '</tool_call>']), a.repeat),
            compare('reasoning (Qwen 3)', reasoning_conversations(n),
                    tokenizer(chat_template_file('qwen3'), ['<think>', '</think>']), a.repeat)]
    out = Path(__file__).parent/'results'/'turns.json'
    out.parent.mkdir(exist_ok=True)
    command = 'python bench/bench_turns.py' + (' --full' if a.full else f' --n {n}') + f' --repeat {a.repeat}'
    where = machine(extra=f"load {os.getloadavg()[0]:.1f}")
    out.write_text(json.dumps({'bench': 'turns', 'machine': where, 'command': command, 'rows': rows}, indent=1))
    print(f"wrote {out}")
