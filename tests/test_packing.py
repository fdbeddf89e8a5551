"Packing and the collator against TRL 1.16 and against running each document alone, on more cases than the notebook shows."
import numpy as np
import pytest
import torch
from datasets import Dataset
from trl.data_utils import pack_dataset as trl_pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

from sft_nb.packing import DataCollatorForLanguageModeling, bfd_assign, pack_dataset
from sft_nb.tiny import tiny_dataset, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:packing_strategy=.wrapped.")

def random_docs(n, max_len, seed, long_frac=0.1):
    "Documents whose tokens encode (document, position), so every packed token can be traced back"
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_len + 1, n)
    lens[rng.random(n) < long_frac] *= 3                        # some longer than a row
    ids = [[d * 10_000 + p for p in range(l)] for d, l in enumerate(lens)]
    labels = [[-100 if p % 3 == 0 else t for p, t in enumerate(x)] for x in ids]
    return Dataset.from_dict({'input_ids': ids, 'labels': labels})

def check_rows(packed, seq_length):
    "Rows fit, `seq_lengths` add up, labels stay aligned, every document piece is a contiguous run of one document"
    for row in packed:
        ids, labels, sl = row['input_ids'], row['labels'], row['seq_lengths']
        assert len(ids) <= seq_length and sum(sl) == len(ids) == len(labels)
        for piece, lab in zip(np.split(np.array(ids), np.cumsum(sl)[:-1]), np.split(np.array(labels), np.cumsum(sl)[:-1])):
            assert len(set(piece // 10_000)) == 1 and (np.diff(piece) == 1).all()
            assert ((lab == -100) == (piece % 10_000 % 3 == 0)).all() and (lab[lab != -100] == piece[lab != -100]).all()

@pytest.mark.parametrize('strategy', ['bfd', 'bfd_split', 'wrapped'])
@pytest.mark.parametrize('seed', range(4))
def test_same_rows_as_trl_within_one_block(strategy, seed):
    "Below 1000 rows TRL packs one block, so the rows must be identical, order included"
    ds = random_docs(500, 40, seed)
    assert pack_dataset(ds, 32, strategy)[:] == trl_pack_dataset(ds, 32, strategy)[:]

@pytest.mark.parametrize('seed', range(3))
def test_whole_dataset_fills_rows_at_least_as_well_as_trl(seed):
    ds = random_docs(5000, 60, seed)
    for strategy in ('bfd', 'bfd_split'):
        ours, stats = pack_dataset(ds, 64, strategy, return_stats=True)
        trl = trl_pack_dataset(ds, 64, strategy)
        check_rows(ours, 64)
        assert len(ours) <= len(trl)
        trl_tokens = sum(map(len, trl['input_ids']))
        assert stats['tokens'] == trl_tokens and stats['efficiency'] >= trl_tokens / (64 * len(trl))
        assert stats['efficiency'] == pytest.approx(stats['tokens'] / (64 * len(ours)))

def test_bfd_is_best_fit_decreasing_at_scale():
    "A million documents: every row within capacity, every document placed once, and no row left that a later one could fill"
    lens = np.minimum(np.random.default_rng(0).geometric(1 / 40, 1_000_000), 512)
    order, row = bfd_assign(lens, 512)
    assert sorted(order.tolist()) == list(range(len(lens)))
    fill = np.bincount(row, weights=lens[order])
    assert fill.max() <= 512 and (512 - fill).min() >= 0
    assert fill.sum() / (512 * len(fill)) > 0.999

@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('kw', [dict(), dict(pad_to_multiple_of=8), dict(padding_free=True), dict(padding_free=True, pad_to_multiple_of=16)])
def test_collator_matches_trl_on_unpacked_rows(seed, kw):
    rng = np.random.default_rng(seed)
    rows = [{'input_ids': rng.integers(0, 50, n).tolist()} for n in rng.integers(1, 20, 6)]
    for r in rows: r['labels'] = [-100 if i < 2 else t for i, t in enumerate(r['input_ids'])]
    ours, trl = DataCollatorForLanguageModeling(99, return_position_ids=True, **kw)(rows), TRLCollator(99, return_position_ids=True, **kw)(rows)
    assert set(ours) == set(trl)
    for k in ours: assert (torch.as_tensor(ours[k]) == torch.as_tensor(trl[k])).all(), k

def tokenized_docs(n, seed=0):
    tok = tiny_tokenizer()
    docs = [tok(t)['input_ids'] for t in tiny_dataset('text', n=n, seed=seed)['text']]
    return tok, docs, Dataset.from_dict({'input_ids': docs, 'labels': docs})

def doc_spans(packed):
    return [(r, s - l, s) for r, sl in enumerate(packed['seq_lengths']) for s, l in zip(np.cumsum(sl), sl)]

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
@pytest.mark.parametrize('impl', ['sdpa', 'eager'])
@pytest.mark.parametrize('strategy', ['bfd', 'bfd_split'])
def test_packed_logits_equal_each_document_alone(arch, impl, strategy):
    check_packed_logits(arch, impl, strategy)

def test_flex_attention_packed_logits():
    "flex_attention builds its block mask from the same position_ids (one case: it compiles for every shape)"
    check_packed_logits('llama', 'flex_attention', 'bfd')

def check_packed_logits(arch, impl, strategy):
    tok, docs, ds = tokenized_docs(40)
    packed = pack_dataset(ds, {'bfd': 40, 'bfd_split': 7}[strategy], strategy)   # documents are 5-10 tokens: 7 splits some
    assert any(len(sl) > 1 for sl in packed['seq_lengths'])
    batch = DataCollatorForLanguageModeling(tok.pad_token_id, pad_to_multiple_of=16, block_diagonal=True)([packed[i] for i in range(len(packed))])
    model, ref = tiny_model(arch, tokenizer=tok).eval(), tiny_model(arch, tokenizer=tok).eval()   # same weights
    model.set_attn_implementation(impl)
    model.config.use_cache = True             # like most hub configs: the batch itself must switch the cache off
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != 'labels'}).logits
        for r, s, e in doc_spans(packed):      # each document alone, plain causal sdpa (flex would compile per length)
            alone = ref(input_ids=batch['input_ids'][r:r + 1, s:e]).logits[0]
            torch.testing.assert_close(logits[r, s:e], alone, atol=1e-5, rtol=1e-4)

@pytest.mark.parametrize('bad', ['all_ones_mask', 'use_cache'])
def test_cross_document_attention_is_detected(bad):
    "What the tests above guard against: either change silently lets documents see each other"
    tok, docs, ds = tokenized_docs(30)
    packed = pack_dataset(ds, 48)
    batch = DataCollatorForLanguageModeling(tok.pad_token_id, block_diagonal=True)([packed[i] for i in range(len(packed))])
    batch = {**batch, 'attention_mask': torch.ones_like(batch['input_ids'])} if bad == 'all_ones_mask' else {**batch, 'use_cache': True}
    model = tiny_model(tokenizer=tok).eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != 'labels'}).logits
        diffs = [(logits[r, s:e] - model(input_ids=batch['input_ids'][r:r + 1, s:e]).logits[0]).abs().max() for r, s, e in doc_spans(packed)]
    assert max(diffs) > 1e-3

def test_packed_loss_and_gradients_equal_documents_alone():
    "Training on packed rows is training on the documents: same loss, same gradients"
    tok, docs, ds = tokenized_docs(24, seed=3)
    packed = pack_dataset(ds, 64)
    batch = DataCollatorForLanguageModeling(tok.pad_token_id, block_diagonal=True)([packed[i] for i in range(len(packed))])
    model = tiny_model(tokenizer=tok)
    model(**batch).loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n = sum(len(d) - 1 for d in docs)
    total = sum(model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) for d in docs) / n
    total.backward()
    for g, p in zip(packed_grads, model.parameters()): torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)

def test_trainer_trains_on_packed_batches(tmp_path):
    "transformers.Trainer accepts the batch as is (use_cache and the varlen ints included) and the loss goes down"
    from transformers import Trainer, TrainingArguments
    tok, docs, ds = tokenized_docs(256)
    packed = pack_dataset(ds, 128)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=30, learning_rate=3e-3,
                             logging_steps=5, report_to=[], remove_unused_columns=False, save_strategy='no', use_cpu=True)
    trainer = Trainer(model=tiny_model(tokenizer=tok), args=args, train_dataset=packed,
                      data_collator=DataCollatorForLanguageModeling(tok.pad_token_id, block_diagonal=True))
    trainer.train()
    losses = [h['loss'] for h in trainer.state.log_history if 'loss' in h]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.8

def test_collator_without_position_ids_matches_trl():
    "return_position_ids=False: unpacked rows get no position_ids, as in TRL; block-diagonal packed rows always need them"
    rows = [{'input_ids': [1, 2, 3]}, {'input_ids': [4, 5]}]
    ours, trl = DataCollatorForLanguageModeling(0, return_position_ids=False)(rows), TRLCollator(0, return_position_ids=False)(rows)
    assert set(ours) == set(trl) == {'input_ids', 'attention_mask', 'labels'}
    for k in ours: assert ours[k].tolist() == trl[k].tolist(), k
    packed = DataCollatorForLanguageModeling(0, block_diagonal=True)([{'input_ids': [1, 2, 3], 'seq_lengths': [2, 1]}])
    assert packed['position_ids'].tolist() == [[0, 1, 0]] and 'attention_mask' not in packed

@pytest.mark.parametrize('impl', ['sdpa', 'eager'])
def test_sft_trainer_packed_loss_equals_documents_alone(tmp_path, impl):
    """End to end through SFTTrainer (data prep, packing, collator, Trainer's input preparation, the chunked loss): the loss of a
    packed batch is the token-weighted loss of its documents run one by one, so nothing on the way lets documents see each other"""
    import torch.nn.functional as F
    from sft_nb import SFTConfig, SFTTrainer
    from sft_nb.tiny import save_tiny
    args = SFTConfig(output_dir=str(tmp_path/'o'), packing=True, max_length=96, per_device_train_batch_size=3, assistant_only_loss=True,
                     model_init_kwargs={'attn_implementation': impl}, report_to='none', use_cpu=True, save_strategy='no')
    t = SFTTrainer(model=str(save_tiny(tmp_path/'m')), args=args, train_dataset=tiny_dataset(n=48))
    assert t.model.config._attn_implementation == impl
    b = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    with torch.no_grad():
        packed = t.compute_loss(t.model, b)
        total, n = 0., 0
        for r in range(b['input_ids'].shape[0]):
            starts = (b['position_ids'][r] == 0).nonzero().flatten().tolist() + [b['input_ids'].shape[1]]
            assert len(starts) > 2                                    # several documents in this row
            for s, e in zip(starts, starts[1:]):
                labels = b['labels'][r, s + 1:e]
                if (labels != -100).any():
                    logits = t.model(input_ids=b['input_ids'][r:r + 1, s:e]).logits[0, :-1]
                    total += F.cross_entropy(logits, labels, ignore_index=-100, reduction='sum')
                    n += int((labels != -100).sum())
    torch.testing.assert_close(packed, total / n, rtol=1e-5, atol=1e-6)


def _random_rows(rng, kind):
    "Rows as a user may hand them to the collator: with labels, TRL's mask columns, or packed `seq_lengths`"
    rows = []
    for n in rng.integers(1, 12, 5):
        r = {'input_ids': rng.integers(0, 50, n).tolist()}
        if kind == 'labels': r['labels'] = [-100 if rng.random() < .3 else t for t in r['input_ids']]
        if kind == 'masks': r['completion_mask' if rng.random() < .5 else 'assistant_masks'] = rng.integers(0, 2, n).tolist()
        if kind == 'packed':
            cuts = sorted(set(rng.integers(1, n, 2).tolist())) if n > 2 else []
            r['seq_lengths'] = np.diff([0, *cuts, n]).tolist()
        rows.append(r)
    return rows

@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('kind', ['plain', 'labels', 'masks', 'packed'])
@pytest.mark.parametrize('padding_free', [False, True])
@pytest.mark.parametrize('return_position_ids', [False, True])
@pytest.mark.parametrize('pad_to_multiple_of', [None, 8])
def test_collator_built_the_trl_way_matches_trl(seed, kind, padding_free, return_position_ids, pad_to_multiple_of):
    "TRL's constructor arguments, positional as TRL orders them: the same keys and values as TRL's collator"
    rows = _random_rows(np.random.default_rng(seed), kind)
    args = (7, padding_free, return_position_ids, pad_to_multiple_of)
    ours, trl = DataCollatorForLanguageModeling(*args)(rows), TRLCollator(*args)(rows)
    assert set(ours) == set(trl)
    for k in trl: assert torch.as_tensor(ours[k]).tolist() == torch.as_tensor(trl[k]).tolist(), k

def test_position_ids_helper_matches_trl():
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 9, rng.integers(1, 5)).tolist() for _ in range(6)]
    ours = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(lengths)
    trl = TRLCollator.get_position_ids_from_packed_seq_lengths(lengths)
    assert [t.tolist() for t in ours] == [t.tolist() for t in trl]
