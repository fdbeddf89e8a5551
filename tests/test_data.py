"""sft_nb's data rooms against TRL 1.16 on every format, prefix-diff assistant masks against TRL's marked training
templates, and both renderers against transformers on every template TRL ships: the checks too heavy for a page."""
import tempfile
from pathlib import Path

import pytest
from datasets import Dataset

import trl
from trl import SFTConfig as TRLConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from sft_nb.config import SFTConfig
from sft_nb.data import prepare_dataset, DataFormatError
from sft_nb.chat import ChatRenderer, chat_template_file, stock_templates, training_template
from sft_nb.stencil import StencilRenderer
from sft_nb.tiny import tiny_tokenizer, tiny_dataset, tiny_conversations, CHATML_GENERATION_TEMPLATE

TEMPLATES = Path(trl.__file__).parent/'chat_templates'

def trl_prepare(ds, tok, packing=False, **kw):
    "TRL's own `_prepare_dataset`, with the attributes its `__init__` would set"
    args = TRLConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, **kw)
    first = ds[0]
    t = SFTTrainer.__new__(SFTTrainer)
    t._tokenizer = tok
    has_completion = 'prompt' in first and 'completion' in first
    t.completion_only_loss = has_completion if args.completion_only_loss is None else args.completion_only_loss
    swap = args.assistant_only_loss and not has_generation_markers(tok.chat_template)
    t.chat_template = get_training_chat_template(tok) if swap else None
    return t._prepare_dataset(ds, tok, args, packing=packing, formatting_func=None, dataset_name='train')

def ours(ds, tok, **kw): return prepare_dataset(ds, tok, SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], **kw))

def same(a, b):
    assert a['input_ids'][:] == b['input_ids'][:]
    assert a['labels'][:] == b['labels'][:]

def same_but_blanks(a, b, tok):
    "`same`, but for labels TRL's training templates add: tokens that decode to whitespace, trained by `b` only"
    assert a['input_ids'][:] == b['input_ids'][:]
    for x, ya, yb in zip(a['input_ids'][:], a['labels'][:], b['labels'][:]):
        assert any(l != -100 for l in ya)
        for t, la, lb in zip(x, ya, yb):
            if la != lb: assert la == -100 and tok.decode([t]).strip() == '', tok.decode([t])

@pytest.mark.parametrize('kind', ['conversational', 'prompt_completion', 'conversational_prompt_completion', 'text'])
@pytest.mark.parametrize('kw', [{}, {'max_length': 20}, {'max_length': 20, 'truncation_mode': 'keep_end'},
                                {'completion_only_loss': False}])
def test_formats_match_trl(kind, kw):
    tok, ds = tiny_tokenizer(), tiny_dataset(kind, n=48)
    same(ours(ds, tok, **kw), trl_prepare(ds, tok, **kw))

@pytest.mark.parametrize('kind', ['conversational', 'conversational_prompt_completion'])
def test_assistant_only_loss_matches_trl_with_markers(kind):
    tok = tiny_tokenizer(CHATML_GENERATION_TEMPLATE)
    ds = tiny_dataset(kind, n=48)
    same(ours(ds, tok, assistant_only_loss=True, max_length=40),
         trl_prepare(ds, tok, assistant_only_loss=True, max_length=40))

def forks_counted(monkeypatch) -> list:
    "The pids `os.fork` returned in this process from now on (0s are children, which exit at once)"
    import os
    pids, fork = [], os.fork
    def counted():
        pid = fork()
        if pid: pids.append(pid)
        return pid
    monkeypatch.setattr(os, 'fork', counted)
    return pids

def test_num_proc_same_result(monkeypatch):
    import sft_nb.data
    monkeypatch.setattr(sft_nb.data, 'FORK_MIN_BYTES', 0)  # a tiny dataset, forked anyway
    tok, ds = tiny_tokenizer(), Dataset.from_list(tiny_conversations(40))
    forks = forks_counted(monkeypatch)
    same(ours(ds, tok, assistant_only_loss=True, dataset_num_proc=2), ours(ds, tok, assistant_only_loss=True))
    assert len(forks) == 1

@pytest.mark.parametrize('kind', ['conversational', 'text'])
def test_num_proc_forks_only_where_it_pays(monkeypatch, caplog, kind):
    """A forked process must get `FORK_MIN_BYTES` of rows: fewer bytes get fewer processes (one: no fork, this
    process encoding on every core), and the log says so; the rows are the same either way. And at most one a core"""
    import logging, sft_nb.data
    monkeypatch.setattr(sft_nb.data, '_cores', lambda: 8)
    tok, ds = tiny_tokenizer(), tiny_dataset(kind, n=60)
    want = ours(ds, tok)
    forks = forks_counted(monkeypatch)
    for per_process, n_forks in ((ds.data.nbytes // 2 + 1, 0), (ds.data.nbytes // 2, 1), (ds.data.nbytes // 4, 3)):
        monkeypatch.setattr(sft_nb.data, 'FORK_MIN_BYTES', per_process)
        forks.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger='sft_nb.data'):
            same(ours(ds, tok, dataset_num_proc=4), want)
        assert len(forks) == n_forks
        assert ('dataset_num_proc=4: ' in caplog.text) == (n_forks < 3)
    monkeypatch.setattr(sft_nb.data, '_cores', lambda: 2)
    forks.clear()
    same(ours(ds, tok, dataset_num_proc=4), want)
    assert len(forks) == 1

def test_local_json_file(tmp_path):
    from sft_nb.tiny import save_tiny_dataset
    from datasets import load_dataset
    save_tiny_dataset(tmp_path, 'conversational', n=12)
    ds = load_dataset('json', data_files=str(tmp_path/'train.jsonl'), split='train')
    tok = tiny_tokenizer()
    same(ours(ds, tok, assistant_only_loss=True), trl_prepare(ds, tok, assistant_only_loss=True))

# Stock templates without markers, through the tiny BPE with each template's control tokens added
STOCK = {
    'llama3': (['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'], '<|begin_of_text|>', '<|eot_id|>'),
    'qwen2_5': ([], None, '<|im_end|>'),
    'gemma': (['<start_of_turn>', '<end_of_turn>'], '<bos>', '<eos>'),
}

def template_tokenizer(template, specials, bos, eos):
    t = tiny_tokenizer(template)
    t.add_special_tokens({'additional_special_tokens': specials + [x for x in (bos, eos) if x]})
    if bos: t.bos_token = bos
    if eos: t.eos_token = eos
    return t

def chats(n=24, system=False):
    return Dataset.from_list(tiny_conversations(n, max_turns=4, system=system))

@pytest.mark.parametrize('name', list(STOCK))
def test_stock_template_matches_trl_training_template(name):
    "Our diff on the stock template trains the same tokens as TRL's swapped-in `{% generation %}` training template"
    tok = template_tokenizer((TEMPLATES/f'{name}.jinja').read_text(), *STOCK[name])
    assert not has_generation_markers(tok.chat_template) and get_training_chat_template(tok) is not None
    ds = chats()
    a = ours(ds, tok, assistant_only_loss=True, max_length=None)
    b = trl_prepare(ds, tok, assistant_only_loss=True, max_length=None)
    # TRL's qwen2_5_training.jinja also trains the newline after the assistant header and after <|im_end|>, which the
    # model never generates; everything else, the end-of-turn token included, is trained by both
    same_but_blanks(a, b, tok)

def test_qwen3_nesting_error_and_training_template():
    qwen3 = (TEMPLATES/'qwen3.jinja').read_text()
    multi = Dataset.from_list([r for r in tiny_conversations(40, max_turns=3, system=False) if len(r['messages']) > 2])
    # stock Qwen 3 doesn't nest: like TRL, sft_nb renders with TRL's qwen3_training template and trains what TRL does
    tok = template_tokenizer(qwen3, ['<think>', '</think>'], None, '<|im_end|>')
    for kind in ('conversational', 'conversational_prompt_completion'):
        ds = multi if kind == 'conversational' else tiny_dataset(kind, n=24)
        same(ours(ds, tok, assistant_only_loss=True), trl_prepare(ds, tok, assistant_only_loss=True))
    assert tok.chat_template == qwen3  # TRL leaves the tokenizer's template alone too
    # an unrecognised template that doesn't nest: one row per assistant turn, each as inference renders it (issue 20)
    odd = template_tokenizer(qwen3 + '{# a copy #}', ['<think>', '</think>'], None, '<|im_end|>')
    split = ours(multi, odd, assistant_only_loss=True, max_length=None)
    upto = [r['messages'][:j+1] for r in multi for j, m in enumerate(r['messages']) if m['role'] == 'assistant']
    assert split['input_ids'][:] == [odd.apply_chat_template(m, return_dict=True)['input_ids'] for m in upto]
    # with the training template set by hand: markers and prefix diff agree (prepare_dataset checks it), and TRL agrees
    tok.chat_template = (TEMPLATES/'qwen3_training.jinja').read_text()
    same(ours(multi, tok, assistant_only_loss=True), trl_prepare(multi, tok, assistant_only_loss=True))

def test_vendored_templates_are_trls():
    "sft_nb ships every pair TRL 1.16 swaps (stock template and its training variant), byte for byte"
    paired = sorted(p.name.removesuffix('_training.jinja') for p in TEMPLATES.glob('*_training.jinja'))
    assert sorted(stock_templates().values()) == paired and len(paired) == 31
    for n in paired + [f'{n}_training' for n in paired]:
        assert chat_template_file(n) == (TEMPLATES/f'{n}.jinja').read_text(encoding='utf-8'), n

# The stock templates whose prefixes don't nest (sft_nb's diff can't use them), through the tiny BPE: sft_nb swaps these
# for TRL's training variant; TRL swaps all 31 (none has markers)
SWAPPED = ['deepseek_r1_distill', 'deepseekv3', 'diffusion_gemma', 'glm4moe', 'gptoss', 'nemotron_3_5_lightning',
           'nemotron_3_nano', 'nemotron_3_super', 'nemotron_3_ultra', 'phi3', 'phi3_5', 'qwen3', 'qwen3_5_nothink',
           'qwen3_5_think', 'qwen3_6']

def stock_tokenizer(name):
    "The tiny BPE with a stock template and the control tokens it writes as special tokens"
    import re
    tpl = chat_template_file(name)
    return template_tokenizer(tpl, sorted(set(re.findall(r"<\|[a-zA-Z_]+\|>|<[a-z_]+>", tpl))), None, None)

def test_swap_only_where_diff_fails():
    for name in stock_templates().values():
        tok = stock_tokenizer(name)
        assert get_training_chat_template(tok) == chat_template_file(f'{name}_training'), name
        assert training_template(tok) == (chat_template_file(f'{name}_training') if name in SWAPPED else None), name

@pytest.mark.parametrize('name', SWAPPED)
def test_swapped_templates_train_what_trl_trains(name):
    "Multi-turn conversations through a swapped stock template: input_ids and labels equal TRL's"
    multi = Dataset.from_list([r for r in tiny_conversations(24, max_turns=3, system=False) if len(r['messages']) > 2])
    tok = stock_tokenizer(name)
    same(ours(multi, tok, assistant_only_loss=True), trl_prepare(multi, tok, assistant_only_loss=True))

TRAINING_TEMPLATES = sorted(p.name for p in TEMPLATES.glob('*_training.jinja') if has_generation_markers(p.read_text()))

@pytest.mark.parametrize('name', TRAINING_TEMPLATES)
def test_sentinel_spans_equal_transformers_tracker(name):
    "Every marked training template TRL ships: both renderers give transformers' text and generation spans"
    from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices
    template = (TEMPLATES/name).read_text()
    tok = tiny_tokenizer(template)
    tools = [{'type': 'function', 'function': {'name': 'add', 'description': 'Add two numbers',
              'parameters': {'type': 'object', 'properties': {'a': {'type': 'number'}, 'b': {'type': 'number'}}}}}]
    n_spans = 0
    for row in tiny_conversations(12, max_turns=3, system=True):
        # content parts, as VLM templates want them
        parts = [{**m, 'content': [{'type': 'text', 'text': m['content']}]} for m in row['messages']]
        for t, msgs in [(None, row['messages']), (tools, row['messages']), (None, parts)]:
            compiled = _compile_jinja_template(tok.get_chat_template(None, t))
            try: want = _render_with_assistant_indices(compiled, msgs, t, None, False, **tok.special_tokens_map)
            # a template that rejects this conversation (e.g. needs images) rejects it both ways
            except Exception: continue
            for render in (ChatRenderer(tok), StencilRenderer(tok)):
                assert render(msgs, t, markers=True) == want
            n_spans += len(want[1])
    assert n_spans > 0, name

AWKWARD = ['  padded  ', 'a</think>b', '<think>r</think>ans', '{{ x }}', 'line\nbreak\n', '\tx', 'ünïcode ✓', '[INST] x',
           '"quote"', "it's", '4']

def awkward_conversations(n=40, seed=0):
    import random
    rng, out = random.Random(seed), [r['messages'] for r in tiny_conversations(24, max_turns=3, system=True)]
    for _ in range(n):
        msgs = [{'role': 'system', 'content': rng.choice(AWKWARD)}] if rng.random() < .3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{'role': 'user', 'content': rng.choice(AWKWARD)},
                     {'role': 'assistant', 'content': rng.choice(AWKWARD + [''])}]
        out.append(msgs)
    return out

STENCILLED = {'llama3.jinja', 'llama3_1.jinja', 'llama3_2.jinja', 'qwen2_5.jinja', 'phi3.jinja', 'gemma3.jinja',
              'qwen3_instruct_2507.jinja', 'lfm2.jinja'}

@pytest.mark.parametrize('name', sorted(p.name for p in TEMPLATES.glob('*.jinja')))
def test_stencils_equal_row_by_row_rendering(name):
    "Every template TRL ships, on conversations with awkward texts: stencils give transformers' text and spans"
    from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices
    tok = tiny_tokenizer((TEMPLATES/name).read_text())
    tok.bos_token = '<|endoftext|>'  # Llama 3's template writes one
    render, ref = StencilRenderer(tok), _compile_jinja_template(tok.chat_template)
    n = 0
    for msgs in awkward_conversations() * 2:  # the second time round, every shape has its stencil (or is known not to)
        for agp, sub in ((False, msgs), (True, msgs[:-1])):
            try: want = _render_with_assistant_indices(ref, sub, None, None, agp, **tok.special_tokens_map)
            except Exception: continue  # a conversation the template rejects (e.g. a system turn for Gemma)
            assert render(sub, add_generation_prompt=agp, markers=True) == want, (sub, agp)
            n += 1
    assert n > 0
    used = sum(s is not None for v in render.stencils.values() for _, s in v)
    if name in STENCILLED | {'qwen3.jinja'}: assert used > 0, name  # Qwen 3's search for </think> is a guard

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
ODD_TEXTS = [' a leading space', 'trailing space ', 'naïve café — 東京 😀', 'e\u0301 not in NFC', '\n\nnewlines first',
             '{"a": 1}\n{"b": 2}', 'x😀😀y', '  two spaces', 'tab\tin', '😀']

def odd_conversations(n):
    "Conversations whose assistant turns start or end on spaces and newlines, with accents, CJK and emoji"
    import random
    rng = random.Random(0)
    out = []
    for k in range(n):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs += [{'role': 'user', 'content': rng.choice(ODD_TEXTS)},
                     {'role': 'assistant', 'content': rng.choice(ODD_TEXTS) + rng.choice(['', ' ', '\n', ' ok'])}]
        out.append({'messages': msgs})
    return Dataset.from_list(out)

@pytest.mark.parametrize('template', ['markers', 'diff'])
@pytest.mark.parametrize('kind', ['gpt2', 'qwen', 'trims'])
def test_counted_assistant_spans_match_offsets(template, kind, monkeypatch):
    """Assistant spans counted from the ids (sft_nb.offsets) train what the tokenizer's offsets train: sft_nb's own
    read off offsets, and TRL's with markers (TRL can't take the prefix diff on this template)"""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors
    import sft_nb.tokens
    from sft_nb.offsets import ByteOffsets, byte_offsets
    from sft_nb.tiny import CHATML_TEMPLATE
    tok = tiny_tokenizer(CHATML_GENERATION_TEMPLATE if template == 'markers' else CHATML_TEMPLATE)
    backend = tok.backend_tokenizer
    if kind == 'qwen':
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior='isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == 'trims': backend.post_processor = processors.ByteLevel(trim_offsets=True)
    offsets = byte_offsets(backend)
    assert offsets is not None and offsets.trims == (kind == 'trims')
    ds = odd_conversations(64)
    counted, ranges = [], ByteOffsets.ranges
    def counting(self, *a, **kw):
        out = ranges(self, *a, **kw)
        counted.extend(r is not None for r in out)
        return out
    monkeypatch.setattr(ByteOffsets, 'ranges', counting)
    got = ours(ds, tok, assistant_only_loss=True)
    assert sum(counted) > len(ds) // 2  # most counted: those not in NFC, or on a trimmed space, read off offsets
    assert all(counted) == (kind == 'gpt2')
    monkeypatch.setattr(sft_nb.tokens, 'byte_offsets', lambda backend: None)
    same(got, ours(ds, tok, assistant_only_loss=True))
    # TRL too, the trimming tokenizer included: a turn that starts on a space it maps to no token still trains
    # the tokens overlapping it (reading `char_to_token` at the turn's first character lost the row)
    assert len(got) == len(ds)
    if template == 'markers': same(got, trl_prepare(ds, tok, assistant_only_loss=True))

def test_tokenize_fingerprint_is_the_same_in_every_process():
    """A dataset with cache files is fingerprinted by hashing the `Tokenize`: processes of one node (torchrun) must
    get the same hash whatever their hash seed, or each computes its own map (the byte offsets' character set did)"""
    import subprocess, sys
    code = ("from datasets.fingerprint import Hasher; from sft_nb.tokens import Tokenize; "
            "from sft_nb.tiny import tiny_tokenizer, CHATML_GENERATION_TEMPLATE; "
            "t = Tokenize(tiny_tokenizer(CHATML_GENERATION_TEMPLATE), 'conversational', assistant_only_loss=True); "
            "assert t.offsets is not None; print(Hasher.hash(t))")
    env = lambda seed: {**__import__('os').environ, 'PYTHONHASHSEED': str(seed), 'HF_HUB_OFFLINE': '1'}
    out = [subprocess.run([sys.executable, '-c', code], env=env(s), capture_output=True, text=True) for s in (1, 2)]
    assert all(r.returncode == 0 for r in out), out[0].stderr[-2000:]
    assert out[0].stdout.split()[-1] == out[1].stdout.split()[-1]

TOOLS = {'get_weather': {'city': 'string', 'unit': 'string'}, 'search': {'query': 'string', 'top_k': 'integer'},
         'read_file': {'path': 'string', 'start_line': 'integer', 'end_line': 'integer'}}

def tool_conversations(n=24, seed=0):
    "Rows offering some of three tools whose arguments differ, each calling one or two of them"
    import random
    rng, rows = random.Random(seed), []
    def schema(name):
        props = {k: {'type': t} for k, t in TOOLS[name].items()}
        return {'type': 'function', 'function': {'name': name, 'description': f"{name} tool",
                                                 'parameters': {'type': 'object', 'properties': props}}}
    def arguments(name):
        # the first parameters, as calls leave out optional ones: a key order Arrow's structs keep (`sft_nb.nulls`)
        params = list(TOOLS[name].items())[:rng.randint(1, len(TOOLS[name]))]
        return {k: rng.randint(1, 99) if t == 'integer' else rng.choice(['a b', 'x']) for k, t in params}
    for _ in range(n):
        offered = rng.sample(sorted(TOOLS), rng.randint(1, 3))
        calls = [rng.choice(offered) for _ in range(rng.randint(1, 2))]
        msgs = [{'role': 'user', 'content': rng.choice(['do it', 'look it up'])},
                {'role': 'assistant', 'content': '', 'tool_calls': [
                    {'type': 'function', 'function': {'name': c, 'arguments': arguments(c)}} for c in calls]}]
        msgs += [{'role': 'tool', 'content': 'done'} for _ in calls] + [{'role': 'assistant', 'content': 'Done.'}]
        rows.append({'messages': msgs, 'tools': [schema(t) for t in offered]})
    return rows

@pytest.mark.parametrize('name', ['qwen2_5', 'qwen3', 'qwen3_instruct_2507', 'glm4moe', 'gptoss'])
def test_tool_calls_train_as_written(name):
    """Tool calls stored as Arrow structs (every other tool's arguments and parameters filled in as None) train as
    the rows were written: what TRL trains on the same rows kept verbatim in `datasets.Json` columns. TRL on the
    structs trains on the nulls"""
    from datasets import Features, Json
    rows = tool_conversations()
    stored, verbatim = Dataset.from_list(rows), Dataset.from_list(rows, features=Features({k: Json() for k in rows[0]}))
    tok = template_tokenizer(chat_template_file(name), *STOCK[name]) if name in STOCK else stock_tokenizer(name)
    ours_stored = ours(stored, tok, assistant_only_loss=True, max_length=None)
    same_but_blanks(ours_stored, trl_prepare(verbatim, tok, assistant_only_loss=True, max_length=None), tok)
    same(ours_stored, ours(verbatim, tok, assistant_only_loss=True, max_length=None))
    padded = trl_prepare(stored, tok, assistant_only_loss=True, max_length=None)
    assert padded['input_ids'][:] != ours_stored['input_ids'][:]
    assert all('null' not in tok.decode(ids) for ids in ours_stored['input_ids'][:])
