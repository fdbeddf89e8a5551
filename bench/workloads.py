"""Workloads that look like users' work, built locally and deterministically (nothing is downloaded).

- `corpus()`: prose and code paragraphs read from this machine (docstrings and docs in site-packages, package
  metadata, /usr/share/doc), in sorted path order, cached in ~/.cache/sft_nb_bench/.
- `bench_tokenizer(vocab)`: a byte-level BPE tokenizer trained on that corpus with the `tokenizers` library at a
  real vocabulary size (32k, 151k), Qwen2's pre-tokenizer regex, NFC and Qwen's special tokens (<|im_start|>,
  <|im_end|>, <|endoftext|>, <tool_call>, <think>, ...), saved as a transformers fast-tokenizer folder with a real
  chat template: Qwen2.5's (tools) or Qwen3's (reasoning), the exact files TRL 1.16 ships, so TRL swaps in its own
  training template as it does for real Qwen tokenizers. Trained once, then loaded from the cache.
- Datasets: `multi_turn`, `tool_calling`, `reasoning`, `prompt_completion` (conversational) and `plain_text`, each
  with a realistic length distribution: the rendered length is log-normal with median ~216 tokens and ~5% past
  1024 (sigma 0.95), cut into turns.

    python bench/workloads.py   # builds the caches and prints each workload's token lengths
"""
import hashlib, json, math, os, random, re, sys
from pathlib import Path

CACHE = Path(os.environ.get('SFT_NB_BENCH_CACHE', Path.home() / '.cache' / 'sft_nb_bench'))
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
            '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
            '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>']
# added as normal (not special) tokens in Qwen's tokenizers: they stay in decoded text
ADDED = ['<tool_call>', '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>',
         '<|repo_name|>', '<|file_sep|>', '<tool_response>', '</tool_response>', '<think>', '</think>']
CHARS_PER_TOKEN = 4.1  # calibrated on the 32k tokenizer, over this corpus (see __main__)
MEDIAN_TOKENS, SIGMA = 216, 0.95

def _site_packages():
    import datasets
    return Path(datasets.__file__).parent.parent

_DOC_RE = re.compile(r'"""(.{40,4000}?)"""', re.S)

def _paragraphs(text):
    for p in re.split(r'\n\s*\n', text):
        p = '\n'.join(l.strip() for l in p.strip().splitlines())
        if 60 <= len(p) <= 3000 and sum(c.isalpha() for c in p) > 0.6 * len(p): yield p

def _code_chunks(text, rng):
    lines = text.splitlines()
    for i in range(0, len(lines) - 8, 60):
        chunk = '\n'.join(lines[i:i + rng.randint(6, 40)]).strip()
        if 80 <= len(chunk) <= 3000: yield chunk

def _build_corpus(max_chars=24_000_000):
    "Prose (docstrings, package docs, licenses) and code, read in sorted path order"
    rng = random.Random(0)
    sp = _site_packages()
    prose, code, n = [], [], 0
    pys = sorted(p for p in sp.rglob('*.py') if 'test' not in p.name)
    docs = sorted(p for pat in ('*.md', '*.rst', 'METADATA', '*.txt') for p in sp.rglob(pat))
    docs += sorted(p for p in Path('/usr/share/doc').rglob('*') if p.is_file() and p.suffix in ('', '.md', '.txt'))
    for path in docs + pys:
        try: text = path.read_text(encoding='utf-8')
        except (UnicodeDecodeError, OSError): continue
        if path.suffix == '.py':
            for m in _DOC_RE.finditer(text): prose += _paragraphs(m.group(1))
            if rng.random() < 0.15: code += _code_chunks(text, rng)
        else: prose += _paragraphs(text)
        n += len(text)
        if sum(map(len, prose)) > max_chars * 0.8: break
    seen = set()
    prose = [p for p in prose if not (p in seen or seen.add(p))]
    return {'prose': prose, 'code': code[:20000]}

def _code_files(max_chars):
    "Whole source files, in sorted order: a real vocabulary is mostly code and rare words, more than prose holds"
    out, n = [], 0
    for path in sorted(_site_packages().rglob('*.py')):
        try: text = path.read_text(encoding='utf-8')
        except (UnicodeDecodeError, OSError): continue
        out.append(text)
        n += len(text)
        if n > max_chars: break
    return out

def corpus() -> dict:
    "{'prose': [...], 'code': [...]}: paragraphs of this machine's text, cached"
    path = CACHE / 'corpus.json'
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix('.tmp')
        tmp.write_text(json.dumps(_build_corpus()))
        tmp.rename(path)
    return json.loads(path.read_text())

def _trl_template(name):
    import trl
    return (Path(trl.__file__).parent / 'chat_templates' / f'{name}.jinja').read_text()

def _train_tokenizer(vocab:int, out:Path):
    from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(SPECIALS) - len(ADDED), min_frequency=2 if vocab < 100_000 else 1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    c = corpus()
    tok.train_from_iterator(c['prose'] + c['code'] + _code_files(vocab * 400), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                   additional_special_tokens=SPECIALS[1:], clean_up_tokenization_spaces=False,
                                   model_max_length=131072)
    fast.add_special_tokens({'additional_special_tokens': SPECIALS[1:]})
    fast.add_tokens(ADDED)
    fast.save_pretrained(out)

def bench_tokenizer(vocab:int=32_000, template:str='qwen2_5'):
    "A fast tokenizer (byte-level BPE at `vocab`) with TRL's copy of the real Qwen `template`, from the cache"
    from transformers import AutoTokenizer
    base = CACHE / f'bpe_{vocab}'
    if not (base / 'tokenizer.json').exists():
        tmp = CACHE / f'bpe_{vocab}.tmp'
        _train_tokenizer(vocab, tmp)
        tmp.rename(base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = _trl_template(template)
    return tok

# ---------------------------------------------------------------- conversations
def _budget(rng, median=MEDIAN_TOKENS):
    "Characters of a row: log-normal tokens (median ~216, ~5% past 1024)"
    return int(math.exp(rng.gauss(math.log(median), SIGMA)) * CHARS_PER_TOKEN)

def _text(rng, pool, chars):
    "Whole paragraphs from `pool` until about `chars` characters (at least one, cut to fit)"
    out, n = [], 0
    while n < chars:
        p = pool[rng.randrange(len(pool))]
        out.append(p if n + len(p) <= chars * 1.3 else p[:max(40, int(chars - n))])
        n += len(out[-1]) + 2
    return '\n\n'.join(out)

_ASKS = ["Can you explain this?", "What does this mean in practice?", "Summarize the following.",
         "How would I use this?", "Rewrite this more clearly.", "Why is that?", "Give me an example.",
         "What are the caveats?", "Continue.", "Is this right?"]
SYSTEMS = ["You are a helpful assistant.", "You are a senior Python engineer. Answer precisely and show code.",
           "You are a concise technical writer. Keep answers short.",
           "You are a support agent for a software company. Be polite and accurate."]

def _user(rng, c, chars):
    head = rng.choice(_ASKS)
    if rng.random() < 0.3: return head
    return f"{head}\n\n{_text(rng, c['prose'] if rng.random() < 0.8 else c['code'], chars)}"

def _answer(rng, c, chars):
    if rng.random() < 0.25:
        return _text(rng, c['prose'], chars * 0.5) + "\n\n```python\n" + _text(rng, c['code'], chars * 0.5) + "\n```"
    return _text(rng, c['prose'], chars)

def _turns(rng):
    return min(1 + int(rng.expovariate(0.6)), 8)

def multi_turn(n:int, seed:int=0) -> list[dict]:
    "Chats of 1-8 turns (median 2), a system prompt in a third; most of the budget goes to answers"
    rng, c, rows = random.Random(seed), corpus(), []
    for i in range(n):
        budget, k = _budget(rng, median=165), _turns(rng)  # ~216 tokens once rendered
        msgs = [{'role': 'system', 'content': rng.choice(SYSTEMS)}] if rng.random() < 0.33 else []
        for _ in range(k):
            msgs.append({'role': 'user', 'content': _user(rng, c, 0.25 * budget / k)})
            msgs.append({'role': 'assistant', 'content': _answer(rng, c, 0.75 * budget / k)})
        rows.append({'messages': msgs})
    return rows

_TOOLS = [
    ('get_weather', 'Get the current weather in a city.', {'city': 'string', 'unit': ['celsius', 'fahrenheit']}),
    ('search_docs', 'Search the documentation for a query.', {'query': 'string', 'top_k': 'integer'}),
    ('run_python', 'Run a Python snippet in a sandbox and return its output.', {'code': 'string'}),
    ('read_file', 'Read a file from the project.', {'path': 'string', 'start_line': 'integer'}),
    ('create_ticket', 'Open a support ticket.', {'title': 'string', 'body': 'string', 'priority': ['low', 'high']}),
    ('convert_currency', 'Convert an amount between currencies.',
     {'amount': 'number', 'from': 'string', 'to': 'string'}),
]

def _schema(name, desc, params):
    props = {k: ({'type': 'string', 'enum': v} if isinstance(v, list) else {'type': v}) for k, v in params.items()}
    return {'type': 'function', 'function': {'name': name, 'description': desc, 'parameters': {
        'type': 'object', 'properties': props, 'required': list(params)[:1]}}}

def _arguments(rng, c, params):
    out = {}
    for k, v in params.items():
        if isinstance(v, list): out[k] = rng.choice(v)
        elif v == 'integer': out[k] = rng.randint(1, 200)
        elif v == 'number': out[k] = round(rng.uniform(1, 1000), 2)
        elif k in ('code', 'body'): out[k] = _text(rng, c['code'], rng.randint(80, 600))
        else: out[k] = rng.choice(c['prose'])[:rng.randint(8, 60)].strip()
    return out

def tool_calling(n:int, seed:int=0) -> list[dict]:
    "Qwen2.5-style tool use: tools given, assistant calls (1-2 per turn), tool results, a final answer"
    rng, c, rows = random.Random(seed), corpus(), []
    for i in range(n):
        budget = _budget(rng, median=150)  # plus the tools' system prompt: ~450 tokens
        tools = rng.sample(_TOOLS, rng.randint(1, 4))
        msgs = [{'role': 'system', 'content': rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
        for _ in range(1 if rng.random() < 0.7 else 2):
            msgs.append({'role': 'user', 'content': _user(rng, c, 0.15 * budget)})
            calls = [rng.choice(tools) for _ in range(1 if rng.random() < 0.8 else 2)]
            msgs.append({'role': 'assistant', 'content': '', 'tool_calls': [
                {'type': 'function', 'function': {'name': t[0], 'arguments': _arguments(rng, c, t[2])}}
                for t in calls]})
            for t in calls:
                result = {'result': _text(rng, c['prose'], 0.25 * budget / len(calls)), 'ok': True}
                msgs.append({'role': 'tool', 'content': json.dumps(result)})
            msgs.append({'role': 'assistant', 'content': _answer(rng, c, 0.4 * budget)})
        rows.append({'messages': msgs, 'tools': [_schema(*t) for t in tools]})
    return rows

def reasoning(n:int, seed:int=0) -> list[dict]:
    "Qwen3-style reasoning: `reasoning_content` then the answer; 70% single-turn, reasoning ~60% of tokens"
    rng, c, rows = random.Random(seed), corpus(), []
    for i in range(n):
        budget = _budget(rng, median=215)
        k = 1 if rng.random() < 0.7 else rng.randint(2, 3)
        msgs = [{'role': 'system', 'content': rng.choice(SYSTEMS)}] if rng.random() < 0.2 else []
        for _ in range(k):
            msgs.append({'role': 'user', 'content': _user(rng, c, 0.15 * budget / k)})
            msgs.append({'role': 'assistant', 'reasoning_content': _text(rng, c['prose'], 0.5 * budget / k),
                         'content': _answer(rng, c, 0.35 * budget / k)})
        rows.append({'messages': msgs})
    return rows

def prompt_completion(n:int, seed:int=0) -> list[dict]:
    "Conversational prompt-completion: a prompt (system?, user) and one assistant completion"
    rng, c, rows = random.Random(seed), corpus(), []
    for i in range(n):
        budget = _budget(rng, median=190)
        prompt = [{'role': 'system', 'content': rng.choice(SYSTEMS)}] if rng.random() < 0.33 else []
        prompt.append({'role': 'user', 'content': _user(rng, c, 0.3 * budget)})
        rows.append({'prompt': prompt, 'completion': [{'role': 'assistant', 'content': _answer(rng, c, 0.7 * budget)}]})
    return rows

def plain_text(n:int, seed:int=0) -> list[dict]:
    "Language-modelling documents: prose (a fifth code) of log-normal length"
    rng, c = random.Random(seed), corpus()
    return [{'text': _text(rng, c['code'] if rng.random() < 0.2 else c['prose'], _budget(rng, median=205))} for _ in range(n)]

# name -> (generator, chat template, TRL supports assistant-only masks / completion masks on it)
WORKLOADS = {
    'multi_turn': (multi_turn, 'qwen2_5'),
    'tool_calling': (tool_calling, 'qwen2_5'),
    'reasoning': (reasoning, 'qwen3'),
    'prompt_completion': (prompt_completion, 'qwen2_5'),
    'plain_text': (plain_text, 'qwen2_5'),
}

def workload(name:str, n:int, vocab:int=32_000, seed:int=0):
    "(rows, tokenizer) of workload `name`: `n` rows, a tokenizer of `vocab` with the workload's chat template"
    gen, template = WORKLOADS[name]
    return gen(n, seed), bench_tokenizer(vocab, template)

if __name__ == '__main__':
    import time, numpy as np
    t0 = time.time()
    c = corpus()
    print(f"corpus: {len(c['prose'])} prose paragraphs ({sum(map(len, c['prose'])) / 1e6:.1f} M chars), "
          f"{len(c['code'])} code chunks, {time.time() - t0:.1f} s")
    for vocab in (32_000, 151_000):
        t0 = time.time()
        tok = bench_tokenizer(vocab)
        print(f"tokenizer {vocab}: {len(tok)} tokens, {time.time() - t0:.1f} s")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for name, (gen, template) in WORKLOADS.items():
        t0 = time.time()
        rows = gen(n)
        t_gen = time.time() - t0
        tok = bench_tokenizer(32_000, template)
        if 'text' in rows[0]: texts = [r['text'] for r in rows]
        elif 'prompt' in rows[0]: texts = [tok.apply_chat_template(r['prompt'] + r['completion'], tokenize=False) for r in rows]
        else: texts = [tok.apply_chat_template(r['messages'], tools=r.get('tools'), tokenize=False) for r in rows]
        lens = np.array([len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)])
        print(f"{name:18} {n} rows in {t_gen:.2f} s: tokens median {np.median(lens):.0f}, mean {lens.mean():.0f}, "
              f"p95 {np.percentile(lens, 95):.0f}, >1024 {np.mean(lens > 1024):.1%}, "
              f"chars/token {sum(map(len, texts)) / lens.sum():.2f}")
