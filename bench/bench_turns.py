"""Dataset preparation of tool-calling and reasoning conversations: sft_nb's `prepare_dataset` vs TRL 1.16's
`SFTTrainer._prepare_dataset`, assistant-only loss, in one run. Prints both times and the speed ratio for each kind,
and whether the trained tokens agree (for tool calls they don't: TRL trains on the tokens of its training variant
of the template, sft_nb on those of the template itself, which inference uses).

- tool calls: Qwen 2.5's template (tools in the system prompt, `<tool_call>` turns, tool results); TRL swaps it for its
  `qwen2_5_training` variant, sft_nb keeps it (it renders prefix by prefix) and diffs prefixes.
- reasoning: Qwen 3's own template with `reasoning_content`; both train on TRL's `qwen3_training` variant.

Both kinds render row by row in sft_nb today (the stencil renderer skips rows with tool schemas, tool calls or
reasoning fields), so this measures what a fast path for them would have to beat (issue 20 asks for >= 4x).

    python bench/bench_turns.py [--n 20000] [--repeat 1]
"""
import argparse, os, random, tempfile, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import datasets, torch
from datasets import Dataset

from sft_nb.chat import chat_template_file
from sft_nb.config import SFTConfig
from sft_nb.data import prepare_dataset
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


def compare(name, ds, tok, repeat):
    t_ours = t_trl = float('inf')
    for _ in range(repeat):
        ours, t = timed(ours_prepare, ds, tok)
        t_ours = min(t_ours, t)
        trl, t = timed(trl_prepare, ds, tok)
        t_trl = min(t_trl, t)
    masks = trl['assistant_masks'] if 'assistant_masks' in trl.column_names else None
    theirs = trained(trl) if masks is None else [[x for x, m in zip(ids, mask) if m]
                                                 for ids, mask in zip(trl['input_ids'], masks)]
    same = trained(ours) == theirs
    print(f"{name}: {len(ds)} conversations   TRL 1.16: {t_trl:.2f} s   sft_nb: {t_ours:.2f} s   "
          f"speed-up: {t_trl / t_ours:.1f}x   same trained tokens: {same}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=20000)
    ap.add_argument('--repeat', type=int, default=1, help="interleaved runs of each; the best time counts")
    a = ap.parse_args()
    torch.set_num_threads(1)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    # TRL's copy (with a final newline): TRL 1.16 recognises templates byte for byte, and refuses the model's own
    qwen2_5 = chat_template_file('qwen2_5')
    compare('tool calls (Qwen 2.5)', tool_conversations(a.n), tokenizer(qwen2_5, ['<tool_call>', '</tool_call>']),
            a.repeat)
    compare('reasoning (Qwen 3)', reasoning_conversations(a.n),
            tokenizer(chat_template_file('qwen3'), ['<think>', '</think>']), a.repeat)
