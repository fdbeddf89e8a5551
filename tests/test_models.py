"Model loading beyond the notebook page: TRL's chat-template cloning, device placement, remote code, a Hub server."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import sft_nb.models as models
from sft_nb.config import ModelConfig, SFTConfig
from sft_nb.models import load_model
from sft_nb.tokenizer import clone_chat_template, load_tokenizer
from sft_nb.tiny import save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope='module')
def tiny_path(tmp_path_factory): return save_tiny(tmp_path_factory.mktemp('m')/'tiny')


def test_clone_chat_template_matches_trl(tiny_path, tmp_path):
    "Same template, same new tokens, same eos as TRL's clone_chat_template; we don't add TRL's <extra_id_N> padding tokens"
    from trl import clone_chat_template as trl_clone
    base = save_tiny(tmp_path/'base', chat_template=None)
    src = tiny_tokenizer()
    src.add_special_tokens({'additional_special_tokens': ['<|tool_response|>', '<|think|>']})
    src.eos_token = '<|endoftext|>'
    src.save_pretrained(tmp_path/'src')

    trl_model, trl_tok, trl_added = trl_clone(load_model(base), AutoTokenizer.from_pretrained(base), str(tmp_path/'src'))
    ours_tok, ours_model = AutoTokenizer.from_pretrained(base), load_model(base)
    added = clone_chat_template(ours_tok, tmp_path/'src', ours_model)

    assert ours_tok.chat_template == trl_tok.chat_template
    assert ours_tok.eos_token == trl_tok.eos_token == '<|endoftext|>'
    assert ours_model.config.eos_token_id == trl_model.config.eos_token_id
    assert ours_tok.convert_ids_to_tokens(added) == ['<|tool_response|>', '<|think|>']
    assert trl_tok.convert_ids_to_tokens(trl_added)[:2] == ['<|tool_response|>', '<|think|>']
    msgs = [{'role': 'user', 'content': 'What is 2 + 3?'}, {'role': 'assistant', 'content': '5'}]
    assert ours_tok.apply_chat_template(msgs) == trl_tok.apply_chat_template(msgs)
    assert ours_model.get_input_embeddings().num_embeddings == len(ours_tok)
    # the original rows are untouched by the resize
    torch.testing.assert_close(ours_model.get_input_embeddings().weight[:len(tiny_tokenizer())],
                               load_model(base).get_input_embeddings().weight)


def test_quantized_models_go_where_training_runs(tiny_path, tmp_path, monkeypatch):
    """bitsandbytes places quantized weights while they load, on the GPU whenever there is one unless told otherwise:
    a `use_cpu` run must get them on the CPU, and each DDP rank on its own GPU; checkpoints saved quantized too"""
    pytest.importorskip('bitsandbytes')
    load_model(tiny_path, model_args=ModelConfig(load_in_4bit=True)).save_pretrained(tmp_path/'q4')
    cpu_run, seen = SFTConfig('out', use_cpu=True), []
    class Recorder:
        @staticmethod
        def from_pretrained(name, **kw):
            seen.append(kw.get('device_map'))
            return tiny_model()
    class Rank1:
        local_process_index = 1
    import accelerate
    monkeypatch.setattr(models, 'model_class', lambda config: Recorder)
    monkeypatch.setattr(models, 'check_dtype', lambda dtype, device: None)  # would ask the (absent) GPU about bfloat16
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(accelerate, 'PartialState', Rank1)
    q4 = ModelConfig(load_in_4bit=True, dtype='float32')
    load_model(tiny_path, model_args=q4)
    load_model(tiny_path, cpu_run, model_args=q4)
    load_model(tmp_path/'q4')
    load_model(tmp_path/'q4', cpu_run)
    load_model(tiny_path, cpu_run, model_args=q4, device_map='auto')  # the caller's map wins
    load_model(tiny_path, cpu_run)  # not quantized: the Trainer places it
    assert seen == [{'': 1}, {'': 'cpu'}, {'': 1}, {'': 'cpu'}, 'auto', None]


REMOTE_CONFIG = "from transformers import LlamaConfig\nclass TinyXConfig(LlamaConfig): model_type = 'tinyx'\n"
REMOTE_MODEL = ("from transformers import LlamaForCausalLM\nfrom .configuration_tinyx import TinyXConfig\n"
                "class TinyXForCausalLM(LlamaForCausalLM): config_class = TinyXConfig\n")

def test_trust_remote_code(tmp_path):
    "A folder whose model is its own code (`auto_map`) loads only with trust_remote_code, given in SFTConfig as in TRL"
    path = save_tiny(tmp_path/f'remote_{os.getpid()}')
    cfg = json.loads((path/'config.json').read_text())
    cfg.update(model_type='tinyx', architectures=['TinyXForCausalLM'],
               auto_map={'AutoConfig': 'configuration_tinyx.TinyXConfig', 'AutoModelForCausalLM': 'modeling_tinyx.TinyXForCausalLM'})
    (path/'config.json').write_text(json.dumps(cfg))
    (path/'configuration_tinyx.py').write_text(REMOTE_CONFIG)
    (path/'modeling_tinyx.py').write_text(REMOTE_MODEL)
    with pytest.raises(ValueError, match='trust_remote_code=True'): load_model(path)
    args = SFTConfig('out', trust_remote_code=True)
    model = load_model(path, args)
    assert type(model).__name__ == 'TinyXForCausalLM' and model.config.use_cache is False
    x = torch.tensor([[5, 17, 42, 9]])
    torch.testing.assert_close(model(input_ids=x).logits, load_model(save_tiny(tmp_path/'plain'))(input_ids=x).logits)
    assert load_tokenizer(path, args).pad_token == '<|pad|>'


HUB_CHILD = """
import sys, torch
from pathlib import Path
from huggingface_hub import HfApi
from sft_nb.config import ModelConfig
from sft_nb.models import load_model
from sft_nb.tokenizer import load_tokenizer
from sft_nb.tiny import save_tiny
tmp, api = Path(sys.argv[1]), HfApi(token='hf_test')
api.create_repo('me/tiny')
api.upload_folder(repo_id='me/tiny', folder_path=str(save_tiny(tmp/'main', seed=1)))
api.create_branch('me/tiny', branch='dev')
api.upload_folder(repo_id='me/tiny', folder_path=str(save_tiny(tmp/'dev', seed=2)), revision='dev')
x = torch.tensor([[5, 17, 42, 9, 3, 77]])
for rev in ('main', 'dev'):
    hub = load_model('me/tiny', model_args=ModelConfig(model_revision=rev))
    assert hub.config.use_cache is False
    torch.testing.assert_close(hub(input_ids=x).logits, load_model(tmp/rev)(input_ids=x).logits, rtol=0, atol=0)
assert not torch.equal(load_model('me/tiny')(input_ids=x).logits, load_model(tmp/'dev')(input_ids=x).logits)
assert load_tokenizer('me/tiny', model_args=ModelConfig(model_revision='dev')).pad_token == '<|pad|>'
try: load_model('me/tiny', model_args=ModelConfig(model_revision='nope'))
except OSError as e: assert 'Check the id and revision' in str(e), e
else: raise SystemExit('a missing revision loaded')
print('OK')
"""

def test_load_from_hub_id_and_revision(tmp_path):
    "A Hub id through the real download path, from a local Hub server: `model_revision` picks the branch"
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import HubServer
    root = Path(__file__).resolve().parents[1]
    with HubServer() as hub:
        env = {**os.environ, 'HF_ENDPOINT': hub.url, 'HF_HUB_OFFLINE': '0', 'TRANSFORMERS_OFFLINE': '0', 'HF_HUB_DISABLE_XET': '1',
               'HF_HOME': str(tmp_path/'hf_home'), 'HF_HUB_DISABLE_PROGRESS_BARS': '1',
               'PYTHONPATH': f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        r = subprocess.run([sys.executable, '-c', HUB_CHILD, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and 'OK' in r.stdout, r.stderr[-4000:]
        assert '/api/models/me/tiny/revision/dev' in {p for _, p, _ in hub.state.requests}  # the client asked the server for the branch
