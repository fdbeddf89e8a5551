"Which turns train, end to end through SFTTrainer: per-message weights reach the loss, packed or not (issue 20)"
import logging, math
import pytest, torch
from datasets import Dataset
from sft_nb.config import SFTConfig
from sft_nb.tiny import CHATML_TEMPLATE, tiny_model, tiny_tokenizer
from sft_nb.trainer import SFTTrainer

CHAT = [{'role': 'user', 'content': 'What is 1 + 2?'}, {'role': 'assistant', 'content': '3'},
        {'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': '4'}]


def _trainer(tmp_path, rows, **kw):
    torch.manual_seed(0)
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], assistant_only_loss=True, max_length=64,
                     per_device_train_batch_size=4, use_cpu=True, max_steps=2, logging_steps=1,
                     save_strategy='no', **kw)
    return SFTTrainer(tiny_model(), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tiny_tokenizer(CHATML_TEMPLATE))


def _first_batch_loss(trainer):
    "The loss `compute_loss` gives the first training batch, without a step"
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad(): return trainer.compute_loss(trainer.model, batch).item(), batch


@pytest.mark.parametrize('packing', [False, True])
def test_weights_scale_the_trained_loss(tmp_path, packing):
    "A weight of 2 on every trained message doubles the loss of the same batch; 1 leaves it bit for bit"
    weighted = lambda w: [{'messages': [CHAT[0], {**CHAT[1], 'weight': w}, CHAT[2], {**CHAT[3], 'weight': w}]}] * 8
    plain, batch = _first_batch_loss(_trainer(tmp_path/'a', [{'messages': CHAT}] * 8, packing=packing))
    assert 'loss_weights' not in batch
    one, batch = _first_batch_loss(_trainer(tmp_path/'b', weighted(1.0), packing=packing))
    assert 'loss_weights' in batch and one == plain
    two, _ = _first_batch_loss(_trainer(tmp_path/'c', weighted(2.0), packing=packing))
    assert math.isclose(two, 2 * plain, rel_tol=1e-6)


def test_flags_and_last_turn_train(tmp_path):
    "Context-only turns, a trained user turn and `train_on_turns='last'` train and change the weights"
    rows = [{'messages': [CHAT[0], {**CHAT[1], 'train': False}, {**CHAT[2], 'train': True, 'weight': 0.5},
                          CHAT[3]]}] * 8
    trainer = _trainer(tmp_path, rows, train_on_turns='last')
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_trainer_warns_on_inference_mismatch(tmp_path, caplog):
    "Qwen 3's stock template trains on TRL's variant, whose history differs from inference: said once, then trained"
    from sft_nb.chat import chat_template_file
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], assistant_only_loss=True, max_length=64,
                     use_cpu=True, max_steps=1, save_strategy='no')
    with caplog.at_level(logging.WARNING, logger='sft_nb.audit'):
        SFTTrainer(tiny_model(), args=args, train_dataset=Dataset.from_list([{'messages': CHAT}] * 4),
                   processing_class=tiny_tokenizer(chat_template_file('qwen3')))
    said = [r.getMessage() for r in caplog.records if r.name == 'sft_nb.audit']
    assert len(said) == 1 and "in 4 of 8 trained turns of the first 4 conversations" in said[0]
    assert "the tokens before the turn differ" in said[0]


# Tool calls and reasoning through stencils (issue 20's fast path): every template TRL ships and the fixtures
from pathlib import Path
from sft_nb.chat import ChatRenderer
from sft_nb.stencil import StencilRenderer

TRL_TEMPLATES = Path(__file__).parents[1]/'sft_nb'/'chat_templates'
FIXTURES = Path(__file__).parents[1]/'nbs'/'fixtures'/'chat_templates'
AWKWARD = ['  padded  ', 'a</think>b', '<think>r</think>ans', '{{ x }}', 'line\nbreak\n', '\nlead', 'ünïcode ✓',
           '<tool_response>\n4\n</tool_response>', '"quote"', '4']
ADD = {'type': 'function', 'function': {'name': 'add', 'description': 'Add two numbers', 'parameters': {
    'type': 'object', 'properties': {'a': {'type': 'integer'}, 'b': {'type': 'integer'}}, 'required': ['a', 'b']}}}
# tools that differ from row to row, as in real tool-calling data: one stencil serves them all where it can
MUL = {'type': 'function', 'function': {'name': 'mul', 'description': 'Multiply "x" by \u00e9 \n',
                                        'parameters': {'type': 'object', 'properties': {'x': {'type': 'number'}}}}}
TOOLSETS = (None, [ADD], [MUL], [ADD, MUL], [MUL, ADD])


def tool_and_reasoning_conversations(n=30, seed=0):
    "Conversations with tool calls, tool results and reasoning, texts drawn from `AWKWARD`"
    import random
    rng, out = random.Random(seed), []
    for _ in range(n):
        msgs = [{'role': 'system', 'content': rng.choice(AWKWARD)}] if rng.random() < .3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({'role': 'user', 'content': rng.choice(AWKWARD)})
            if rng.random() < .5:
                args = {'a': rng.randint(0, 9), 'b': rng.choice([1, 'ü', 2.5])}
                call = [{'type': 'function', 'function': {'name': 'add', 'arguments': args}}]
                msgs += [{'role': 'assistant', 'content': '', 'tool_calls': call},
                         {'role': 'tool', 'name': 'add', 'content': rng.choice(AWKWARD)}]
            answer = {'role': 'assistant', 'content': rng.choice(AWKWARD)}
            if rng.random() < .5: answer['reasoning_content'] = rng.choice(AWKWARD)
            msgs.append(answer)
        out.append(msgs)
    return out


TEMPLATE_FILES = sorted(TRL_TEMPLATES.glob('*.jinja')) + sorted(FIXTURES.glob('*.jinja'))


def _id(p): return f"{'fixture' if p.parent == FIXTURES else 'trl'}/{p.name}"


@pytest.mark.parametrize('path', TEMPLATE_FILES, ids=_id)
def test_tool_and_reasoning_stencils_equal_jinja(path):
    "Tool calls, tool results and reasoning: stencilled renders equal row-by-row Jinja renders, text and spans"
    tok = tiny_tokenizer(path.read_text())
    tok.bos_token = '<|endoftext|>'
    fast, plain = StencilRenderer(tok), ChatRenderer(tok)
    n = 0
    for msgs in tool_and_reasoning_conversations() * 2:  # the second time round, shapes have their stencils
        for tools in TOOLSETS:
            for agp, sub in ((False, msgs), (True, msgs[:-1])):
                try: want = plain(sub, tools, add_generation_prompt=agp, markers=True)
                except Exception: continue  # a conversation the template rejects
                assert fast(sub, tools, add_generation_prompt=agp, markers=True) == want, (sub, tools, agp)
                n += 1
    assert n > 0
    used = sum(s is not None for v in fast.stencils.values() for _, s in v)
    if path.parent == FIXTURES and path.stem in ('qwen2_5', 'qwen3', 'llama3_1', 'gpt_oss'): assert used > 0
    # Qwen's templates only `tojson` each tool: tools are slots, the stencils keyed by how many there are
    slotted = [k for k, v in fast.stencils.items() if isinstance(k[4], tuple) and any(s for _, s in v)]
    if path.parent == FIXTURES and path.stem in ('qwen2_5', 'qwen3'):
        assert {k[4] for k in slotted} >= {('slots', 1), ('slots', 2)}


@pytest.mark.parametrize('path', TEMPLATE_FILES, ids=_id)
def test_turn_stencils_equal_diffing(path):
    "Assistant turns from one fill of a shape's turn stencil: the text and spans of diffing Jinja's prefixes"
    from sft_nb.chat import assistant_turns
    tok = tiny_tokenizer(path.read_text())
    tok.bos_token = '<|endoftext|>'
    fast, plain = StencilRenderer(tok), ChatRenderer(tok)
    def turns(render, msgs, tools):
        try: return assistant_turns(render, msgs, tools=tools)
        except Exception as e: return type(e)  # a template that rejects the row, or that doesn't nest
    for msgs in tool_and_reasoning_conversations() * 2:  # the second time round, shapes have turn stencils
        for tools in TOOLSETS:
            assert turns(fast, msgs, tools) == turns(plain, msgs, tools), (msgs, tools)
    served = [r for k, v in fast.stencils.items() if k[1][0] == 'turns' for _, r in v if r is not None]
    if path.parent == FIXTURES and path.stem in ('qwen2_5', 'llama3_1'): assert served


PIECE_TEMPLATES = [p for p in TEMPLATE_FILES if p.parent == FIXTURES and p.stem in ('qwen2_5', 'qwen3')]


@pytest.mark.parametrize('path', PIECE_TEMPLATES, ids=_id)
def test_pieces_prepare_what_whole_texts_do(path, monkeypatch):
    "Texts encoded piece by piece between added tokens give the rows (ids, labels) of texts encoded whole"
    import sft_nb.tokens as tokens
    tok = tiny_tokenizer(path.read_text())
    tok.add_special_tokens({'additional_special_tokens': ['<tool_call>', '</tool_call>', '<think>', '</think>']})
    convs = tool_and_reasoning_conversations(60)
    batch = {'messages': convs, 'tools': [TOOLSETS[k % len(TOOLSETS)] for k in range(len(convs))]}
    def prepared():
        t = tokens.Tokenize(tok, 'conversational', assistant_only_loss=True, arrow=False, drop_untrained=False)
        return t, t(batch, list(range(len(convs))))
    t, pieces = prepared()
    texts = [t.render(c, tools)[0] for c, tools in zip(convs, batch['tools'])]
    # the tools' system prompts and the headers repeat: these texts are joined from pieces
    assert t.pieces is not None and all(isinstance(e, tokens.PieceEncoding) for e in t.encode(texts, False))
    monkeypatch.setattr(tokens, 'piece_pattern', lambda backend: None)
    t_whole, whole = prepared()
    assert t_whole.pieces is None
    assert pieces == whole and len(whole['input_ids']) >= len(convs)
    assert sum(x != -100 for row in whole['labels'] for x in row) > 0
