"Vision-language SFT against TRL 1.16 on tiny local VLMs of four families: batches, losses, saving"
import copy, os
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest, torch
import transformers
from PIL import Image
from datasets import Dataset
import trl
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling as TRLCollator
import sft_nb
from sft_nb.vision import (DataCollatorForVisionLanguageModeling, expand_images, image_placeholder, prepare_vision_dataset,
                           save_tiny_vlm, tiny_processor)

FAMILIES = ['qwen2_vl', 'llava', 'idefics3', 'gemma3']
COLOURS = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255), 'white': (255, 255, 255)}

def _rows(n=8, prompt_completion=False, text_only_rows=True):
    "Colour questions, images of two sizes, every fourth row without an image (`text_only_rows`)"
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        images = [] if i % 4 == 3 and text_only_rows else [Image.new('RGB', (20 + 4 * (i % 2), 20), COLOURS[name])]
        q, a = [{'role': 'user', 'content': 'Which colour?'}], [{'role': 'assistant', 'content': name}]
        rows.append({'images': images, **({'prompt': q, 'completion': a} if prompt_completion else {'messages': q + a})})
    return rows

def _processor(family, path=None):
    "Through AutoProcessor where it can load it (Qwen2-VL's needs torchvision; the tiny Gemma 3 tokenizer is told its tokens)"
    if path is None or family in ('qwen2_vl', 'gemma3'): return tiny_processor(family)
    return transformers.AutoProcessor.from_pretrained(path)

def _images(batch, k):
    "Idefics3 batches pixels (B, images per row, ...), zero-padding rows without an image; ours has one per image"
    x = batch[k]
    if k not in ('pixel_values', 'pixel_attention_mask') or x.dim() < 5 - (k == 'pixel_attention_mask'): return x
    real = batch['pixel_attention_mask'].flatten(0, 1).flatten(1).any(1)
    return x.flatten(0, 1)[real]

@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('fmt,assistant_only', [('messages', True), ('messages', False), ('prompt_completion', False)])
def test_batches_match_trl(family, fmt, assistant_only):
    "Same input_ids, attention_mask, pixel outputs and labels as TRL's collator (image tokens unlabelled: ours)"
    rows = _rows(4, fmt == 'prompt_completion')
    p = tiny_processor(family)
    args = sft_nb.SFTConfig(output_dir='unused', report_to=[], assistant_only_loss=assistant_only)
    ds = prepare_vision_dataset(Dataset.from_list(rows), p, args)
    ours = DataCollatorForVisionLanguageModeling(p)([ds[i] for i in range(len(ds))])
    theirs = TRLCollator(p, assistant_only_loss=assistant_only, completion_only_loss=fmt == 'prompt_completion')(copy.deepcopy(rows))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        if k == 'labels': continue
        assert torch.equal(_images(ours, k), _images(theirs, k)), k
    # TRL trains on image tokens outside assistant-only; sft_nb never does: the labels differ only there
    image_tokens = expand_images(p, image_placeholder(p)[0], [rows[0]['images'][0]])[0][0]['input_ids']
    differ = ours['labels'] != theirs['labels']
    assert (ours['labels'][differ] == -100).all() and torch.isin(ours['input_ids'][differ], image_tokens).all()
    assert differ.any() == (not assistant_only and fmt == 'messages')
    assert (ours['labels'] != -100).any()

TEXT_IMAGE = {'llava': '<image>', 'qwen2_vl': '<|vision_start|><|image_pad|><|vision_end|>'}

@pytest.mark.parametrize('family', list(TEXT_IMAGE))
def test_text_with_images_matches_trl(family):
    "A `text` column holding the image token: TRL's input_ids and pixels; labels too, but for image tokens (never trained)"
    rows = [{'images': r['images'], 'text': f"{TEXT_IMAGE[family]}Which colour? {list(COLOURS)[i % 4]}"}
            for i, r in enumerate(_rows(4, text_only_rows=False))]
    p = tiny_processor(family)
    args = sft_nb.SFTConfig(output_dir='unused', report_to=[])
    ds = prepare_vision_dataset(Dataset.from_list(rows), p, args)
    ours = DataCollatorForVisionLanguageModeling(p)([ds[i] for i in range(len(ds))])
    theirs = TRLCollator(p)(copy.deepcopy(rows))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        if k != 'labels': assert torch.equal(ours[k], theirs[k]), k
    image = torch.isin(theirs['input_ids'], expand_images(p, image_placeholder(p)[0], [rows[0]['images'][0]])[0][0]['input_ids'])
    assert image.any() and (ours['labels'][image] == -100).all()
    assert torch.equal(ours['labels'][~image], theirs['labels'][~image])

def test_text_with_images_trains(tmp_path):
    "SFTTrainer on a `text` column with images: prepared as above, trained; assistant_only_loss refused (no turns)"
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    rows = [{'images': r['images'], 'text': f"<image>Which colour? {r['messages'][1]['content']}"} for r in _rows(4, text_only_rows=False)]
    args = sft_nb.SFTConfig(output_dir=str(tmp_path/'out'), report_to=[], max_steps=2, per_device_train_batch_size=2,
                            save_strategy='no', logging_steps=1)
    t = sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(rows))
    t.train()
    assert len(_losses(t)) == 2 and all(l == l for l in _losses(t))
    args.assistant_only_loss = True
    with pytest.raises(ValueError, match='assistant_only_loss=True needs conversations'):
        sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(rows))

def _trainers(tmp_path, family, rows, **kw):
    "(sft_nb, TRL) trainers of the same tiny VLM folder, data and settings"
    path = save_tiny_vlm(tmp_path/'m', family)
    out = {}
    for lib in (sft_nb, trl):
        args = lib.SFTConfig(output_dir=str(tmp_path/lib.__name__), report_to=[], per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy='no', seed=0, bf16=False, **kw)
        out[lib.__name__] = lib.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(rows),
                                           processing_class=_processor(family, path))
    return out['sft_nb'], out['trl']

def _losses(t): return [h['loss'] for h in t.state.log_history if 'loss' in h]

@pytest.mark.parametrize('family', FAMILIES)
def test_first_losses_match_trl(tmp_path, family):
    "Same init, same batches: the first 10 losses equal TRL's (assistant-only, so both label the same tokens)"
    # TRL 1.16 fails on Idefics3 batches that mix rows with and without images ('text_replacement_offsets')
    rows = _rows(20, text_only_rows=family != 'idefics3')
    ours, theirs = _trainers(tmp_path, family, rows, max_steps=10, assistant_only_loss=True)
    assert ours._is_vision_dataset and theirs._is_vision_dataset and ours._is_vlm
    for t in (ours, theirs): t.train()
    assert len(_losses(ours)) == 10
    assert _losses(ours) == pytest.approx(_losses(theirs), rel=1e-4)

def _run_quick_start(folder, name, monkeypatch) -> dict:
    "Run the Python of `folder/name/README.md`'s quick start as a user would, next to the folder, with a picture.jpg"
    import re
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", (folder/name/'README.md').read_text(), re.S).group(1)
    Image.new('RGB', (20, 20), COLOURS['red']).save(folder/'picture.jpg')
    monkeypatch.chdir(folder)
    scope = {}
    exec(code.replace('print(', 'answer = ('), scope)
    assert isinstance(scope['answer'], str) and type(scope['model']).__name__ in ('LlavaForConditionalGeneration', 'PeftModel')
    return scope

def test_vlm_card_quick_start_runs(tmp_path, monkeypatch):
    "A full VLM's card loads it as AutoModelForImageTextToText with its AutoProcessor, and asks about an image"
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    from sft_nb.card import write_model_card
    write_model_card(path, repo_id=str(path), pipeline_tag="image-text-to-text")
    scope = _run_quick_start(tmp_path, 'm', monkeypatch)
    assert scope['inputs']['pixel_values'].shape[0] == 1

def test_lora_trains_language_model_saves_processor_and_merges(tmp_path, monkeypatch):
    "LoRA on the language model only; the adapter folder has the processor; adapter and merged reload give the same logits"
    from peft import LoraConfig, PeftModel
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    args = sft_nb.SFTConfig(output_dir=str(tmp_path/'out'), report_to=[], max_steps=4, per_device_train_batch_size=2,
                            learning_rate=1e-2, save_strategy='no', assistant_only_loss=True)
    t = sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(_rows(8)),
                          peft_config=LoraConfig(r=4, target_modules='all-linear'))
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all('language_model' in n for n in trainable)
    vision = {n: p.detach().clone() for n, p in t.model.named_parameters() if 'vision_tower' in n or 'projector' in n}
    t.train()
    assert all(torch.equal(p, vision[n]) for n, p in t.model.named_parameters() if n in vision)
    t.save_model(str(tmp_path/'adapter'))
    files = {f.name for f in (tmp_path/'adapter').iterdir()}
    assert {'adapter_model.safetensors', 'processor_config.json', 'chat_template.jinja'} <= files, files
    assert type(transformers.AutoProcessor.from_pretrained(tmp_path/'adapter')).__name__ == 'LlavaProcessor'
    assert 'pipeline_tag: image-text-to-text' in (tmp_path/'adapter'/'README.md').read_text()
    assert 'answer' in _run_quick_start(tmp_path, 'adapter', monkeypatch)
    batch = DataCollatorForVisionLanguageModeling(t.processing_class)(list(t.train_dataset.select(range(4))))
    batch.pop('labels')
    t.model.eval()
    with torch.no_grad(): trained = t.model(**batch).logits
    base = transformers.AutoModelForImageTextToText.from_pretrained(path)
    reloaded = PeftModel.from_pretrained(base, tmp_path/'adapter').eval()
    merged_dir = tmp_path/'merged'
    sft_nb.adapters.merge_adapters(reloaded, merged_dir, tokenizer=t.processing_class)
    merged = transformers.AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    assert type(merged).__name__ == 'LlavaForConditionalGeneration'
    assert transformers.AutoProcessor.from_pretrained(merged_dir).chat_template == t.processing_class.chat_template
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-4, atol=1e-4)

def test_truncation_keeps_images_whole_where_trl_cannot(tmp_path):
    "A max_length inside an image: TRL's collator (or its model) raises, ours drops the image whole and trains"
    rows = [{'images': [Image.new('RGB', (20, 20), COLOURS['red'])] * 2,
             'messages': [{'role': 'user', 'content': 'Colours?'}, {'role': 'assistant', 'content': 'red red'}]}]
    p = tiny_processor('llava')
    model = transformers.AutoModelForImageTextToText.from_pretrained(save_tiny_vlm(tmp_path/'m', 'llava'))
    with pytest.raises(ValueError, match='image. token count|Image features and image tokens do not match'):
        model(**TRLCollator(p, max_length=25)(copy.deepcopy(rows)))
    args = sft_nb.SFTConfig(output_dir='unused', report_to=[])
    collate = DataCollatorForVisionLanguageModeling(p, max_length=25)
    ours = collate(list(prepare_vision_dataset(Dataset.from_list(rows), p, args)))
    assert ours['input_ids'].shape[1] <= 25 and collate.images_dropped == 1
    assert torch.isfinite(model(**ours).loss)

def test_bad_input_fails_before_the_model_loads(tmp_path):
    "Errors that name the row and field, raised before loading (the model folder does not even exist)"
    p = tiny_processor('llava')
    missing = [{'images': [str(tmp_path/'nope.png')], 'messages': _rows(1)[0]['messages']}]
    args = sft_nb.SFTConfig(output_dir=str(tmp_path/'o'), report_to=[])
    with pytest.raises(ValueError, match=r"Row 0, field `images\[0\]`.*nope.png"):
        sft_nb.SFTTrainer(str(tmp_path/'absent'), args=args, train_dataset=Dataset.from_list(missing), processing_class=p)
    packed = sft_nb.SFTConfig(output_dir=str(tmp_path/'o'), report_to=[], packing=True)
    with pytest.raises(ValueError, match='packing=True'):
        sft_nb.SFTTrainer(str(tmp_path/'absent'), args=packed, train_dataset=Dataset.from_list(_rows(2)), processing_class=p)

def test_qlora_on_cpu_keeps_the_vision_side_in_full_precision(tmp_path):
    "bitsandbytes 4-bit on CPU: the language model quantized and adapted, vision tower and projector plain and frozen"
    from peft import LoraConfig
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    q4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.float32)
    args = sft_nb.SFTConfig(output_dir=str(tmp_path/'out'), report_to=[], max_steps=3, per_device_train_batch_size=2,
                            learning_rate=1e-2, save_strategy='no', logging_steps=1, use_cpu=True)
    t = sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(_rows(6)), quantization_config=q4,
                          peft_config=LoraConfig(r=4, target_modules='all-linear'))
    kind = lambda end: next(type(m).__name__ for n, m in t.model.named_modules() if n.endswith(end))
    assert kind('vision_tower.encoder.layers.0.mlp.fc1') == kind('multi_modal_projector.linear_1') == 'Linear'
    assert kind('language_model.layers.0.self_attn.q_proj.base_layer') == 'Linear4bit'
    assert not [n for n, p in t.model.named_parameters() if p.requires_grad and 'language_model' not in n]
    t.train()
    losses = _losses(t)
    assert len(losses) == 3 and all(l == l for l in losses)

def _colour_rows(n, seed):
    "Pictures filled with a shade of one colour; the answer is its name (the text alone can't tell)"
    import random
    rng, rows = random.Random(seed), []
    for _ in range(n):
        name = rng.choice(list(COLOURS))
        shade = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in COLOURS[name])
        image = Image.new('RGB', (rng.randint(16, 28), rng.randint(16, 28)), shade)
        rows.append({'image': image, 'messages': [{'role': 'user', 'content': 'Which colour is this picture?'},
                                                  {'role': 'assistant', 'content': name}]})
    return rows

def _accuracy(model, processor, rows):
    "Share of pictures whose colour name's first token the model ranks highest among the four names' first tokens"
    from sft_nb.vision import multimodal_messages
    firsts = [processor.tokenizer(name, add_special_tokens=False)['input_ids'][0] for name in COLOURS]
    assert len(set(firsts)) == len(COLOURS)
    model.eval()
    hits = 0
    for r in rows:
        text = processor.apply_chat_template(multimodal_messages(r['messages'][:1], 1), tokenize=False,
                                             add_generation_prompt=True)
        enc = processor(text=[text], images=[[r['image']]], return_tensors='pt', add_special_tokens=False)
        with torch.no_grad(): logits = model(**enc).logits[0, -1, firsts]
        hits += list(COLOURS)[logits.argmax().item()] == r['messages'][1]['content']
    return hits / len(rows)

def test_learns_to_name_the_colour(tmp_path):
    "A task only the picture can answer: held-out accuracy rises from chance to near certain"
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    args = sft_nb.SFTConfig(output_dir=str(tmp_path/'out'), report_to=[], num_train_epochs=3, per_device_train_batch_size=8,
                            learning_rate=5e-3, save_strategy='no', assistant_only_loss=True, eval_strategy='no', seed=0)
    t = sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(_colour_rows(96, 0)),
                          eval_dataset=Dataset.from_list(_colour_rows(16, 1)))
    held_out = _colour_rows(24, 2)
    before = _accuracy(t.model, t.processing_class, held_out)
    loss_before = t.evaluate()['eval_loss']
    t.train()
    after = _accuracy(t.model, t.processing_class, held_out)
    assert t.evaluate()['eval_loss'] < loss_before
    assert before <= 0.5 and after >= 0.9, (before, after)

def test_streaming_images_and_text_only_data_on_a_vlm(tmp_path):
    "An IterableDataset of images trains (tokenized as it streams); a VLM trains on text-only data through the text path"
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    runs = {'stream': Dataset.from_list(_rows(8)).to_iterable_dataset(),
            'text': Dataset.from_list([{'messages': r['messages']} for r in _rows(8)])}
    for name, ds in runs.items():
        args = sft_nb.SFTConfig(output_dir=str(tmp_path/name), report_to=[], max_steps=2, per_device_train_batch_size=4,
                                save_strategy='no', logging_steps=1, learning_rate=1e-3)
        t = sft_nb.SFTTrainer(str(path), args=args, train_dataset=ds)
        assert t._is_vision_dataset == (name == 'stream')
        before = t.model.model.language_model.layers[0].mlp.up_proj.weight.detach().clone()
        t.train()
        assert len(_losses(t)) == 2 and not torch.equal(before, t.model.model.language_model.layers[0].mlp.up_proj.weight)

def test_skip_prepare_dataset_tokenizes_raw_rows_per_batch(tmp_path):
    "TRL's VLM recipes set skip_prepare_dataset=True: raw rows reach the collator, which tokenizes them; same losses"
    path = save_tiny_vlm(tmp_path/'m', 'llava')
    losses = {}
    for skip in (False, True):
        args = sft_nb.SFTConfig(output_dir=str(tmp_path/str(skip)), report_to=[], max_steps=3, per_device_train_batch_size=4,
                                save_strategy='no', logging_steps=1, learning_rate=1e-3, assistant_only_loss=True,
                                dataset_kwargs={'skip_prepare_dataset': skip})
        t = sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(_rows(12)))
        t.train()
        losses[skip] = _losses(t)
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5)

# Ports of TRL's VLM cases of tests/test_sft_trainer.py (test_train_vlm, test_train_vlm_multi_image,
# test_train_vlm_text_only_data, test_vision_dataset_with_text_model_raises), on local tiny VLMs instead of
# trl-internal-testing's Hub models and the zen-image datasets. Where TRL lists the parameters that must change,
# here both libraries train the same model on the same rows, and the parameters each changes must be the same.

def _updated(lib, family, path, rows, tmp_path, **kw):
    "Names of the parameters one library's trainer changed, training on `rows` (batch 1, TRL's test settings)"
    args = lib.SFTConfig(output_dir=str(tmp_path/lib.__name__), report_to=[], per_device_train_batch_size=1,
                         max_length=None, learning_rate=0.1, save_strategy='no', seed=0, bf16=False, **kw)
    t = lib.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=_processor(family, path))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.train()
    assert t.state.log_history[-1]['train_loss'] is not None
    return {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}, set(before)

def _multi_image_rows(n=3):
    "TRL's zen-multi-image: prompt-completion conversations with two images each"
    return [{'images': [Image.new('RGB', (20, 20), COLOURS['red']), Image.new('RGB', (24, 20), COLOURS['blue'])],
             'prompt': [{'role': 'user', 'content': 'Which colours?'}],
             'completion': [{'role': 'assistant', 'content': 'red blue'}]} for _ in range(n)]

@pytest.mark.parametrize('family,case', [(f, 'messages') for f in FAMILIES] + [('qwen2_vl', 'multi_image')])
def test_trl_train_vlm(tmp_path, family, case):
    "TRL's test_train_vlm / _multi_image: training changes the same parameters as TRL's (all but what gets no gradient)"
    rows = _multi_image_rows() if case == 'multi_image' else _rows(3, text_only_rows=False)
    path = save_tiny_vlm(tmp_path/'m', family)
    ours, names = _updated(sft_nb, family, path, rows, tmp_path, max_steps=3)
    theirs, _ = _updated(trl, family, path, rows, tmp_path, max_steps=3)
    assert ours == theirs
    assert len(ours) > len(names) / 2  # most of the model, the vision side included

def test_trl_train_vlm_text_only_data(tmp_path):
    "TRL's test_train_vlm_text_only_data (the standard formats of #5334 too): a VLM trains on text, vision untouched"
    path = save_tiny_vlm(tmp_path/'m', 'qwen2_vl')
    formats = {'conversational_language_modeling': lambda r: {'messages': r['messages']},
               'standard_language_modeling': lambda r: {'text': f"Which colour? {r['messages'][1]['content']}"},
               'standard_prompt_completion': lambda r: {'prompt': 'Which colour?', 'completion': r['messages'][1]['content']}}
    for name, to_row in formats.items():
        rows = [to_row(r) for r in _rows(4)]
        changed, names = _updated(sft_nb, 'qwen2_vl', path, rows, tmp_path/name, max_steps=2)
        visual = {n for n in names if n.startswith('model.visual')}
        assert visual and not changed & visual, name
        assert {n for n in names - visual if 'language_model' in n} <= changed, name

def test_trl_vision_dataset_with_text_model_raises(tmp_path):
    "TRL's test_vision_dataset_with_text_model_raises: the same message, before the model loads"
    from sft_nb.tiny import save_tiny
    path = save_tiny(tmp_path/'text')
    args = sft_nb.SFTConfig(output_dir=str(tmp_path/'out'), report_to=[])
    with pytest.raises(ValueError, match='vision-related.*vision-language model'):
        sft_nb.SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(_rows(2)))

AWKWARD = ['  padded  ', 'a</think>b', '{{ x }}', 'line\nbreak\n', '\tx', 'ünïcode ✓', '[INST] x', '"quote"', '4', ' ']
# VLM templates whose conversations of parts render from stencils (llava_next's only since `parts_shape`)
STENCILLED_VLM = {'qwen2_5_vl.jinja', 'qwen3_vl.jinja', 'llava_next.jinja', 'idefics3.jinja', 'smolvlm.jinja',
                  'gemma3.jinja'}
TRL_TEMPLATES = sorted((Path(trl.__file__).parent/'chat_templates').glob('*.jinja'))

def _parts_conversations(n=40, seed=0):
    "Conversations of parts as an Arrow dataset gives them back (every part has `text`, None for an image), awkward texts"
    import random
    rng, out = random.Random(seed), []
    for _ in range(n):
        msgs = []
        for turn in range(rng.randint(1, 3)):
            user = [{'type': 'image', 'text': None}] * rng.randint(0, 2) * (turn == 0)
            user += [{'type': 'text', 'text': rng.choice(AWKWARD + ['Which colour?'])}]
            reply = rng.choice(AWKWARD + ['Red.', ''])
            msgs += [{'role': 'user', 'content': rng.sample(user, len(user))},
                     {'role': 'assistant', 'content': reply if rng.random() < .3 else [{'type': 'text', 'text': reply}]}]
        out.append(msgs)
    return out

def _turns_or_error(render, msgs):
    "`assistant_turns`, or the message of its error for a template that doesn't render prefix by prefix"
    from sft_nb.chat import NotNested, assistant_turns
    try: return assistant_turns(render, msgs)
    except NotNested as e: return str(e)

@pytest.mark.parametrize('path', TRL_TEMPLATES, ids=lambda p: p.name)
def test_parts_stencils_equal_jinja(path):
    """Contents of parts (images, awkward texts) through every template TRL ships and the tiny VLM template: the stencil
    path (`parts_shape`) gives transformers' own text and generation spans, and turn spans equal diffing's"""
    from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices
    from sft_nb.chat import ChatRenderer
    from sft_nb.stencil import StencilRenderer
    from sft_nb.tiny import tiny_tokenizer
    tok = tiny_tokenizer(path.read_text())
    tok.bos_token = '<|endoftext|>'  # Llama 3's template writes one
    render, plain, ref = StencilRenderer(tok), ChatRenderer(tok), _compile_jinja_template(tok.chat_template)
    n = 0
    for msgs in _parts_conversations() * 2:  # the second time round, shapes have their stencils
        try: want = _render_with_assistant_indices(ref, msgs, None, None, False, **tok.special_tokens_map)
        except Exception: continue  # a template that rejects parts or images rejects them both ways
        assert render(msgs, markers=True) == want
        assert _turns_or_error(render, msgs) == _turns_or_error(plain, msgs)
        n += 1
    assert n > 0 or 'image' not in path.read_text(), path.name
    if path.name.replace('_training', '') in STENCILLED_VLM:  # the stencil path taken, not all row by row
        assert any(s is not None for v in render.stencils.values() for _, s in v), path.name
