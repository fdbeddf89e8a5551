"""After training, as a user runs it: `sft-nb export` (GGUF) and `sft-nb merge` in a subprocess, and an
`SFTTrainer` run whose sample answers reach the log, TensorBoard and the model card (issue 23)."""
import os, subprocess, sys
from pathlib import Path
import pytest
from sft_nb.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1',
       'TOKENIZERS_PARALLELISM': 'false'}

def sft_nb(*args, code=0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, '-m', 'sft_nb.cli', *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

def test_export_gguf_command(tmp_path):
    "Both tiny families, Q8_0: a file beside the model, the check printed and in the card; bad input is exit 2"
    for arch in ('llama', 'qwen2'):
        model = save_tiny(tmp_path/arch, arch=arch)
        (model/'README.md').write_text("# tiny\n\n## Framework versions\n\n| | |\n")
        r = sft_nb('export', model, '--gguf', 'q8_0')
        assert (model/'model-q8_0.gguf').is_file()
        assert 'greedy answers agree on 100%' in r.stdout, r.stdout
        assert '| model-q8_0.gguf | Q8_0 |' in (model/'README.md').read_text()
    r = sft_nb('export', tmp_path/'missing', '--gguf', 'f16', code=2)
    assert 'is not a folder' in r.stderr and 'Traceback' not in r.stderr

def test_merge_command_records_its_check(tmp_path):
    "`sft-nb merge`: the merged model is compared with the adapter model; the numbers are printed and in the card"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = save_tiny(tmp_path/'base')
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules='all-linear'))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if 'lora_B' in name: p.normal_(0, 0.05)  # as after training: a fresh adapter merges to the base
    lora.save_pretrained(tmp_path/'adapter')
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path/'adapter')
    r = sft_nb('merge', tmp_path/'adapter', tmp_path/'merged')
    assert 'greedy answers agree on 100%' in r.stdout, r.stdout
    card = (tmp_path/'merged'/'README.md').read_text()
    assert '## Merge check' in card and '| 16-bit base (kept) |' in card, card

def test_merge_command_qlora_builds_both_merges(tmp_path):
    "`sft-nb merge --load_in_4bit`: a QLoRA adapter is merged onto the 16-bit and onto the dequantized 4-bit "
    "base, both measured against the 4-bit model it was trained on; the closer is kept, printed and in the card"
    import re
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    base = save_tiny(tmp_path/'base')
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',
                                          bnb_4bit_compute_dtype=torch.float32)
    base4 = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb)
    qlora = get_peft_model(base4, LoraConfig(r=4, target_modules='all-linear'))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if 'lora_B' in name: p.normal_(0, 0.05)  # as after training
    qlora.save_pretrained(tmp_path/'adapter')
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path/'adapter')
    r = sft_nb('merge', tmp_path/'adapter', tmp_path/'merged', '--load_in_4bit', '--dtype', 'float32')
    card = (tmp_path/'merged'/'README.md').read_text()
    rows = dict(re.findall(r'\| (16-bit base|dequantized 4-bit base)(?: \(kept\))? \| ([0-9.e+-]+) \|', card))
    assert sorted(rows) == ['16-bit base', 'dequantized 4-bit base'], card
    kept = min(rows, key=lambda k: float(rows[k]))
    assert f'| {kept} (kept) |' in card and card.count('(kept)') == 1, card
    assert f'merged onto the {kept}:' in r.stdout, r.stdout
    from sft_nb.answers import merge_candidates
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path/'merged', dtype=torch.float32)
    assert getattr(merged.config, 'quantization_config', None) is None  # a plain 16-bit model
    expected = merge_candidates(qlora, torch.float32)[kept].state_dict()  # the kept merge, rebuilt here
    saved = merged.state_dict()
    assert max((saved[k] - v).abs().max().item() for k, v in expected.items() if k in saved) < 1e-6

def merge_rows(folder:Path) -> list[str]:
    "The merges a merged model's card compares: '16-bit base', and 'dequantized 4-bit base' after QLoRA"
    import re
    card = (folder/'README.md').read_text()
    return sorted(re.findall(r'\| (16-bit base|dequantized 4-bit base)(?: \(kept\))? \| [0-9.e+-]+ \|', card))

def test_merge_reads_how_the_adapter_was_trained(tmp_path, capsys):
    "`sft-nb train` after QLoRA leaves base_quantization.json beside the adapter, so `sft-nb merge` without "
    "`--load_in_4bit` takes the QLoRA path (both merges in the card); after LoRA there is no record and the plain "
    "path; `--no-load_in_4bit` over a QLoRA record merges the plain way, with a warning; `generate` loads "
    "the base as recorded"
    pytest.importorskip('bitsandbytes')
    import json
    from sft_nb.tiny import save_tiny_dataset
    base = save_tiny(tmp_path/'base')
    save_tiny_dataset(tmp_path/'data', n=16)
    run = ['--model_name_or_path', base, '--dataset_name', tmp_path/'data', '--use_peft', 'true', '--lora_r', '4',
           '--lora_target_modules', 'all-linear', '--max_steps', '2', '--learning_rate', '1e-2', '--dtype', 'float32',
           '--per_device_train_batch_size', '4', '--report_to', 'none', '--save_strategy', 'no', '--use_cpu', 'true',
           '--gradient_checkpointing', 'false']
    sft_nb('train', *run, '--output_dir', tmp_path/'qlora', '--load_in_4bit', 'true')
    sft_nb('train', *run, '--output_dir', tmp_path/'lora')
    record = json.loads((tmp_path/'qlora'/'base_quantization.json').read_text())
    assert (record['quant_method'], record['load_in_4bit'], record['bnb_4bit_quant_type']) == ('bitsandbytes', True, 'nf4')
    assert not (tmp_path/'lora'/'base_quantization.json').exists()
    r = sft_nb('merge', tmp_path/'qlora', tmp_path/'merged_qlora', '--dtype', 'float32')
    assert 'records a 4-bit base (QLoRA): loading it so' in r.stdout and 'sft-nb: warning' not in r.stderr, (r.stdout, r.stderr)
    assert merge_rows(tmp_path/'merged_qlora') == ['16-bit base', 'dequantized 4-bit base']
    r = sft_nb('merge', tmp_path/'lora', tmp_path/'merged_lora', '--dtype', 'float32')
    assert 'records a 4-bit base' not in r.stdout and 'sft-nb: warning' not in r.stderr
    assert merge_rows(tmp_path/'merged_lora') == ['16-bit base']
    r = sft_nb('merge', tmp_path/'qlora', tmp_path/'merged_plain', '--no-load_in_4bit', '--dtype', 'float32')
    assert 'sft-nb: warning: --load_in_4bit False contradicts the adapter\'s base_quantization.json' in r.stderr, r.stderr
    assert merge_rows(tmp_path/'merged_plain') == ['16-bit base']
    # `generate` (and `chat`) read the record too: the answer is the 4-bit model's, the one that was trained
    import bitsandbytes as bnb
    from sft_nb.config import ModelConfig
    from sft_nb.trained import generate_command, load_for_generation, reply
    ask = 'What is 2 + 2?'
    answer = generate_command([str(tmp_path/'qlora'), '--prompt', ask, '--max_new_tokens', '6', '--dtype', 'float32'])
    assert 'records a 4-bit base (QLoRA): loading it so' in capsys.readouterr().err
    model4, tok = load_for_generation(tmp_path/'qlora', model_args=ModelConfig(dtype='float32', load_in_4bit=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model4.modules())
    assert answer == reply(model4, tok, [{'role': 'user', 'content': ask}], max_new_tokens=6)
    generate_command([str(tmp_path/'lora'), '--prompt', ask, '--max_new_tokens', '6', '--dtype', 'float32'])
    assert 'records a 4-bit base' not in capsys.readouterr().err

def test_sample_answers_in_log_tensorboard_and_card(tmp_path, caplog):
    "SFTTrainer with `eval_answer_count`: answers before training and at each evaluation, in the log, in "
    "TensorBoard's text panel, in `log_history` as scores, and in the saved model's card; they change with training"
    import logging
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from sft_nb import SFTConfig, SFTTrainer
    from sft_nb.answers import EvalAnswersCallback
    from sft_nb.tiny import tiny_dataset
    model = save_tiny(tmp_path/'model')
    args = SFTConfig(tmp_path/'out', max_steps=8, learning_rate=3e-3, per_device_train_batch_size=8,
                     eval_strategy='steps', eval_steps=4, logging_steps=4, report_to='tensorboard',
                     save_strategy='no', use_cpu=True, eval_answer_count=3, eval_answer_max_new_tokens=8,
                     eval_answer_metrics=['contains'])
    with caplog.at_level(logging.INFO, logger='sft_nb.answers'):
        trainer = SFTTrainer(str(model), args, train_dataset=tiny_dataset('conversational', 64),
                             eval_dataset=tiny_dataset('conversational', 8, seed=7))
        trainer.train()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, EvalAnswersCallback))
    assert [h['when'] for h in cb.history] == ['before training', 'step 4', 'step 8']
    assert cb.history[0]['answers'] != cb.history[-1]['answers']
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Sample answers')]
    assert len(logged) == 3 and '| prompt | reference | answer |' in logged[0], logged
    assert [r['step'] for r in trainer.state.log_history if 'eval_answer_contains' in r] == [0, 4, 8]
    events = EventAccumulator(str(next((tmp_path/'out'/'runs').iterdir())), size_guidance={'tensors': 0})
    events.Reload()
    tag = 'eval/answers/text_summary'  # transformers' TensorBoard callback files `eval_*` under `eval/`
    assert tag in events.Tags()['tensors'], events.Tags()
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
    assert len(texts) == 3 and cb.prompts[1][-1]['content'] in texts[-1], texts
    trainer.save_model()
    card = (tmp_path/'out'/'README.md').read_text()
    assert '## Sample answers' in card and '| prompt | reference | before training | after training |' in card

def test_trainer_merged_save_is_checked(tmp_path):
    "`save_merged_model=True`: SFTTrainer's merged/ folder comes from the checked merge, its numbers in that card"
    from peft import LoraConfig
    from sft_nb import SFTConfig, SFTTrainer
    from sft_nb.tiny import tiny_dataset
    model = save_tiny(tmp_path/'model')
    args = SFTConfig(tmp_path/'out', max_steps=2, learning_rate=1e-2, per_device_train_batch_size=8,
                     report_to='none', save_strategy='no', use_cpu=True, save_merged_model=True)
    trainer = SFTTrainer(str(model), args, train_dataset=tiny_dataset('conversational', 16),
                         eval_dataset=tiny_dataset('conversational', 4, seed=7),
                         peft_config=LoraConfig(r=4, target_modules='all-linear'))
    trainer.train()
    trainer.save_model()
    card = (tmp_path/'out'/'merged'/'README.md').read_text()
    assert '## Merge check' in card and 'on 4 held-out prompts' in card and '| 100% |' in card, card
    assert '## Merge check' not in (tmp_path/'out'/'README.md').read_text()  # the adapter's card has no merge

def test_sample_answers_under_ddp(tmp_path):
    "Two processes over gloo through the real launcher, `eval_answer_*` set: every round's answers are the "
    "single process's, logged once (by the main process), scores logged once a round, one card section"
    import json
    import yaml
    from sft_nb.cli import accelerate_config_path
    cfg = yaml.safe_load(accelerate_config_path('multi_gpu').read_text())
    # the multi_gpu profile starts 2 processes with torchrun; on CPU (use_cpu in SFTConfig) accelerate makes them
    # MULTI_CPU over gloo and wraps the model in DDP (a MULTI_CPU profile would start one process without mpirun)
    cfg.update(num_processes=2, mixed_precision='no')
    (tmp_path/'ddp.yaml').write_text(yaml.safe_dump(cfg))
    script = str(ROOT/'tests'/'answers_ddp_script.py')
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(tmp_path/'ddp.yaml'),
              '--main_process_port', '29671']
    for name, cmd in [('ddp', [*launch, script]), ('plain', [sys.executable, script, '--per_device', '8'])]:
        save_tiny(tmp_path/name/'base')
        r = subprocess.run([*cmd, str(tmp_path/name)], capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rec = lambda name, rank: json.loads((tmp_path/name/f'record.rank{rank}.json').read_text())
    plain, main, other = rec('plain', 0), rec('ddp', 0), rec('ddp', 1)
    assert (plain['world'], main['world'], other['world']) == (1, 2, 2)
    rounds = lambda r: [(h['when'], h['answers']) for h in r['history']]
    assert [w for w, _ in rounds(plain)] == ['before training', 'step 2', 'step 4']
    assert rounds(main) == rounds(plain) == rounds(other)  # two ranks of 4 rows = one process of 8 rows
    assert len(main['logged']) == 3 and other['logged'] == [], (main['logged'], other['logged'])
    steps = [h['step'] for h in main['log_history'] if 'eval_answer_contains' in h]
    assert steps == [0, 2, 4], main['log_history']
    card = (tmp_path/'ddp'/'run'/'README.md').read_text()
    assert card.count('## Sample answers') == 1 and plain['history'][-1]['answers'][0] in card, card

LLAMA_CPP = ("needs llama-cpp-python (llama.cpp's own runtime), which compiles llama.cpp from source on "
             "install and is therefore not in the dev extra: CMAKE_ARGS='-DGGML_NATIVE=OFF' "
             "pip install llama-cpp-python")

def _llama_cpp_greedy(llm, ids:list[int], max_new_tokens:int, eos:int) -> list[int]:
    "llama.cpp's greedy continuation of `ids` (temperature 0, no repetition penalty), stopping after the end"
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token == eos or len(out) == max_new_tokens: break
    return out

@pytest.mark.slow
@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_gguf_answers_in_llama_cpp(tmp_path, arch):
    "llama.cpp itself loads the exported F16 GGUF, splits the chat prompts into the same ids, and answers "
    "greedily as transformers does"
    llama_cpp = pytest.importorskip('llama_cpp', reason=LLAMA_CPP)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sft_nb.gguf import GGUF_PROMPTS, _greedy, _prompt_texts, save_gguf
    folder = save_tiny(tmp_path/arch, arch=arch)
    r = save_gguf(folder, dtype='f16')
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=r['path'], n_ctx=256, n_threads=1, seed=0, verbose=False)
    for text in _prompt_texts(tok, GGUF_PROMPTS):
        ids = tok(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        expected = _greedy(model, torch.tensor([ids]), tok, 8)
        assert _llama_cpp_greedy(llm, ids, 8, tok.eos_token_id) == expected, text
