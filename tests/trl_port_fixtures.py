"""Offline stand-ins for the Hub repos TRL's SFT tests load (`trl-internal-testing/...`), built in a local folder.

TRL builds its tiny models from configs (scripts/generate_tiny_models/) at hidden size 8 and pushes them in bfloat16,
with each family's real tokenizer and chat template. Here the same config classes and sizes are built with a small
byte-level BPE tokenizer that holds each family's special tokens and carries the family's real chat template (the
copies TRL ships in `trl/chat_templates/`, so TRL recognises them exactly as it recognises the real models'). The
datasets are TRL's own generator data (scripts/generate_zen_dataset.py, generate_harmony_dataset.py,
generate_toolcall_dataset.py, generate_zen_image_dataset.py): same configs, columns, rows and 17/2 train/test split,
written as parquet with a README `configs:` block so that `load_dataset(path, config_name, split=..., streaming=...)`
goes through the real loading path. Nothing here touches the network.
"""
from __future__ import annotations
import json, re
from pathlib import Path

import torch
from torch import nn

ZEN_FIRST = ["Beautiful is better than", "Explicit is", "Simple is better", "Complex", "Flat is better than",
             "Sparse is better", "Readability", "Special cases aren't special", "Although practicality beats",
             "Errors should never", "Unless explicitly", "In the face of ambiguity, refuse",
             "There should be one-- and preferably",
             "Although that way may not be obvious at first unless you're", "Now is", "Although never is often",
             "If the implementation is hard to explain,", "If the implementation is easy",
             "Namespaces are one honking great"]
ZEN_REST = [" ugly.", " better than implicit.", " than complex.", " is better than complicated.", " nested.",
            " than dense.", " counts.", " enough to break the rules.", " purity.", " pass silently.", " silenced.",
            " the temptation to guess.", " only one --obvious way to do it.", " Dutch.", " better than never.",
            " better than *right* now.", " it's a bad idea.", " to explain, it may be a good idea.",
            " idea -- let's do more of those!"]
ZEN = ["Beautiful is better than ugly.", "Explicit is better than implicit.", "Simple is better than complex.",
       "Complex is better than complicated.", "Flat is better than nested.", "Sparse is better than dense.",
       "Readability counts.", "Special cases aren't special enough to break the rules.",
       "Although practicality beats purity.", "Errors should never pass silently.", "Unless explicitly silenced.",
       "In the face of ambiguity, refuse the temptation to guess.",
       "There should be one-- and preferably only one --obvious way to do it.",
       "Although that way may not be obvious at first unless you're Dutch.", "Now is better than never.",
       "Although never is often better than *right* now.", "If the implementation is hard to explain, it's a bad idea.",
       "If the implementation is easy to explain, it may be a good idea.",
       "Namespaces are one honking great idea -- let's do more of those!"]
ZEN_REJECTED = ["Beautiful is better than the moon.", "Explicit is worse than nothing.",
                "Simple is better than a long vacation.", "Complex is always the answer.",
                "Flat is better than chocolate.", "Sparse is better without any context.", "Readability is optional.",
                "Special cases aren't special enough to become unicorns.", "Although practicality beats reality.",
                "Errors should never pass their driving test.", "Unless explicitly forgotten.",
                "In the face of ambiguity, refuse the opportunity to laugh.",
                "There should be one-- and preferably two or more confusing methods.",
                "Although that way may not be obvious at first unless you're a time traveler.",
                "Now is never better.", "Although never is often not even a possibility.",
                "If the implementation is hard to explain, it's clearly the best choice.",
                "If the implementation is easy it's probably magic.",
                "Namespaces are one honking great watermelon -- let's plant some!"]
QUESTIONS = ["What is better than ugly?", "What is better than implicit?", "What is better than complex?",
             "What is better than complicated?", "What is better than nested?", "What is better than dense?",
             "What counts?", "Are special cases enough to break the rules?", "What beats purity?",
             "What should never pass silently?", "When can errors pass silently?",
             "What should you do in the face of ambiguity?", "How many ways should there be to do it?",
             "For whom may the way not be obvious at first?", "What is better than never?",
             "Is never better than *right* now?", "What does it mean if the implementation is hard to explain?",
             "What does it mean if the implementation is easy to explain?", "Any great ideas?"]
ANSWERS = ["Beautiful.", "Explicit.", "Simple.", "Complex.", "Flat.", "Sparse.", "Readability.",
           "No, special cases aren't special enough to break the rules.", "Practicality.", "Errors.",
           "When explicitly silenced.", "Refuse the temptation to guess.", "One, and preferably only one.", "Dutch.",
           "Now is better than never.", "Yes, often.", "It means it's a bad idea.", "It means it may be a good idea.",
           "Namespaces are one honking great idea."]
THINKING = ["Beauty improves clarity and appeal.", "Clarity avoids confusion.", "Simplicity is easier to manage.",
            "Complexity has structure; complication doesn't.", "Flat structures are easier to read.",
            "Spacing aids understanding.", "Readable code lasts longer.", "Consistency is more valuable.",
            "Real-world needs outweigh ideals.", "Silent errors cause hidden issues.", "Silence must be intentional.",
            "Guessing leads to wrong choices.", "One way reduces confusion.", "A playful nod to Python's creator.",
            "Action is better than endless delay.", "Rushed action can be worse.", "Good ideas should be clear.",
            "Clarity suggests soundness.", "Namespaces prevent conflicts."]


def _user(q): return [{"role": "user", "content": q}]
def _assistant(a): return [{"role": "assistant", "content": a}]


def zen_configs() -> dict[str, dict[str, list]]:
    "Columns of each `trl-internal-testing/zen` config this port uses, in TRL's row order"
    return {
        "standard_language_modeling": {"text": ZEN},
        "standard_prompt_completion": {"prompt": ZEN_FIRST, "completion": ZEN_REST},
        "standard_implicit_prompt_preference": {"chosen": ZEN, "rejected": ZEN_REJECTED},
        "conversational_language_modeling": {"messages": [_user(q) + _assistant(a) for q, a in zip(QUESTIONS, ANSWERS)]},
        "conversational_prompt_completion": {"prompt": [_user(q) for q in QUESTIONS],
                                             "completion": [_assistant(a) for a in ANSWERS]},
    }


def harmony_configs() -> dict[str, dict[str, list]]:
    "`trl-internal-testing/harmony`: assistant turns carry `thinking`; rows carry `chat_template_kwargs`"
    kwargs = [{"reasoning_effort": ["low", "medium", "high"][i % 3],
               "model_identity": "You are Tiny ChatGPT, a tiny language model."} for i in range(19)]
    turns = [{"role": "assistant", "thinking": t, "content": a} for t, a in zip(THINKING, ANSWERS)]
    return {
        "language_modeling": {"messages": [_user(q) + [t] for q, t in zip(QUESTIONS, turns)],
                              "chat_template_kwargs": kwargs},
        "prompt_completion": {"prompt": [_user(q) for q in QUESTIONS], "completion": [[t] for t in turns],
                              "chat_template_kwargs": kwargs},
    }


def _tool(name, doc, **params):
    props = {k: {"type": t, "description": d} for k, (t, d) in params.items()}
    return {"type": "function", "function": {"name": name, "description": doc,
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": list(params)},
                                             "return": {"type": "string"}}}

_TOOLS = {
    "start_timer": _tool("start_timer", "Starts a timer for the specified duration in seconds.",
                         duration=("integer", "Duration in seconds to set the timer for.")),
    "get_current_time": _tool("get_current_time", "Returns the current time in the specified location.",
                              location=("string", "The location for which to get the current time.")),
    "get_air_quality_index": _tool("get_air_quality_index", "Returns the air quality index for the location.",
                                   location=("string", "The location for which to get the air quality index.")),
    "play_music": _tool("play_music", "Plays music by the specified title and artist.",
                        title=("string", "The title of the music to play."),
                        artist=("string", "The artist of the music to play.")),
    "get_weather_forecast": _tool("get_weather_forecast", "Returns the weather forecast for the city and date.",
                                  city=("string", "The city."), date=("string", "The date.")),
    "control_light": _tool("control_light", "Controls the light in the specified room.",
                           room=("string", "The room."), state=("string", "The desired state of the light.")),
    "create_reminder": _tool("create_reminder", "Creates a reminder for the specified time and note.",
                             time=("string", "The time for the reminder."), note=("string", "The note.")),
    "get_wind_conditions": _tool("get_wind_conditions", "Returns the wind conditions for the specified city.",
                                 city=("string", "The city."), unit=("string", "The unit of the wind speed.")),
}
_CALLS = [  # (user, tool, arguments, tool answer, final answer, tools offered)
    ("Set a timer for 10 minutes.", "start_timer", {"duration": 600}, "600", "Timer set for 10 minutes.",
     ["start_timer", "create_reminder"]),
    ("What time is it in Tokyo?", "get_current_time", {"location": "Tokyo"}, "06:22:48",
     "The current time in Tokyo is 06:22 AM.", ["get_current_time"]),
    ("Is the air clean today in Lisbon?", "get_air_quality_index", {"location": "Lisbon, Portugal"}, "53",
     "The air quality is moderate.", ["get_air_quality_index", "get_weather_forecast", "get_wind_conditions"]),
    ("Play some music.", "play_music", {"title": "Take Five", "artist": "Dave Brubeck"}, "{'status': 'Playing'}",
     "Enjoy the jazz tunes!", ["play_music", "control_light"]),
    ("What's the weather like tomorrow in Berlin?", "get_weather_forecast", {"city": "Berlin", "date": "2025-06-16"},
     "{'temperature': 22, 'condition': 'partly cloudy'}",
     "Tomorrow in Berlin will be partly cloudy with a high of 22°C.", ["get_weather_forecast", "get_wind_conditions"]),
    ("Turn on the living room lights.", "control_light", {"room": "living room", "state": "on"}, "{'state': 'on'}",
     "The living room lights are now on.", ["control_light"]),
    ("Remind me to call mom at 7 PM.", "create_reminder", {"time": "19:00", "note": "Call mom"}, "Reminder set",
     "Okay, I'll remind you to call mom at 7 PM.", ["start_timer", "create_reminder"]),
    ("How strong is the wind in Chicago right now?", "get_wind_conditions", {"city": "Chicago", "unit": "mph"},
     "(14, 'NW')", "The wind in Chicago is blowing at 14 mph from the northwest.",
     ["get_weather_forecast", "get_wind_conditions"]),
]


def toolcall_configs() -> dict[str, dict[str, list]]:
    """`trl-internal-testing/toolcall`: tool-calling chats; `tools` is a JSON string per row (the Hub stores the
    mixed-schema tool list as JSON, which is why TRL's test parses it with `json.loads`)"""
    messages = [[{"role": "user", "content": u},
                 {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
                 {"role": "tool", "name": name, "content": out},
                 {"role": "assistant", "content": final}] for u, name, args, out, final, _ in _CALLS]
    tools = [json.dumps([_TOOLS[t] for t in offered]) for *_, offered in _CALLS]
    return {"language_modeling": {"messages": messages, "tools": tools}}


def zen_image_configs() -> dict[str, dict[str, list]]:
    "`trl-internal-testing/zen-image`: the zen chats, each with a small random RGB image"
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))
              for h, w in rng.integers(32, 64, size=(19, 2))]
    return {"conversational_language_modeling": {
        "messages": [_user(q) + _assistant(a) for q, a in zip(QUESTIONS, ANSWERS)], "image": images}}


def write_dataset_repo(path:Path, configs:dict[str, dict[str, list]], test_size:int=2) -> Path:
    "Write each config's train/test splits (the last `test_size` rows are the test split, as TRL's) + README configs"
    from datasets import Dataset, Image as ImageFeature
    lines = ["---", "configs:"]
    for name, cols in configs.items():
        ds = Dataset.from_dict(cols, on_mixed_types="use_json")  # as TRL's generators: rows keep their own keys
        if "image" in cols: ds = ds.cast_column("image", ImageFeature())
        n = len(ds)
        (path/name).mkdir(parents=True, exist_ok=True)
        ds.select(range(n - test_size)).to_parquet(str(path/name/"train.parquet"))
        ds.select(range(n - test_size, n)).to_parquet(str(path/name/"test.parquet"))
        lines += [f"- config_name: {name}", "  data_files:",
                  f"  - split: train\n    path: {name}/train.parquet", f"  - split: test\n    path: {name}/test.parquet"]
    (path/"README.md").write_text("\n".join(lines + ["---", ""]))
    return path


# ---------------------------------------------------------------------------------------------------- tokenizers
def trl_chat_template(name:str) -> str:
    "A family chat template as TRL ships it (trl/chat_templates/<name>.jinja): the real models' templates"
    import trl
    return (Path(trl.__file__).parent/"chat_templates"/f"{name}.jinja").read_text()


def _template_specials(template:str|None) -> list[str]:
    if not template: return []
    return sorted(set(re.findall(r"<\|[A-Za-z_]+\|>|\[gMASK\]|<sop>|</?think>|</?tool_call>|</?tool_response>", template)))


def family_tokenizer(chat_template:str|None, eos:str, pad:str|None=None, bos:str|None=None,
                     vocab_size:int=400):
    """A real `PreTrainedTokenizerFast` (byte-level BPE trained on the test sentences) whose special tokens are the
    family's: `eos`, `pad`, `bos` and every special token the chat template writes"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = list(dict.fromkeys([t for t in (eos, pad, bos) if t] + _template_specials(chat_template)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ZEN + QUESTIONS + ANSWERS + THINKING + ZEN_REJECTED + ["system user assistant tool"]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
                                   model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in (eos, pad, bos)]})
    if chat_template is not None: fast.chat_template = chat_template
    return fast


# ---------------------------------------------------------------------------------------------------- models
def init_weights_tiny_model(model):
    "TRL's init for its tiny models (scripts/generate_tiny_models/_common.py): no NaNs from uninitialised weights"
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module.bias is not None: nn.init.zeros_(module.bias)
            nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Embedding): nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None: nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            if module.bias is not None: nn.init.zeros_(module.bias)


_SMALL = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)

# TRL id -> (config class, config kwargs beyond _SMALL, chat template, eos, pad, bos, dtype TRL pushes)
# The config kwargs are those of TRL's generation scripts, without the real vocabulary sizes and token ids (which
# follow the local tokenizer).
MODEL_SPECS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2Config", {}, "qwen2_5", "<|im_end|>", "<|endoftext|>", None, "bfloat16"),
    "tiny-Qwen3ForCausalLM": ("Qwen3Config", {}, "qwen3", "<|im_end|>", "<|endoftext|>", None, "bfloat16"),
    "tiny-Cohere2ForCausalLM": ("Cohere2Config", dict(
        logit_scale=1.0, rope_theta=50000, cache_implementation="hybrid", layer_switch=4,
        order_of_interleaved_layers="local_attn_first", position_embedding_type="rope_gptj", rotary_pct=1.0,
        use_embedding_sharing=True, use_gated_activation=True, use_parallel_block=True,
        use_parallel_embedding=False, use_qk_norm=False),
        "cohere2", "<|END_OF_TURN_TOKEN|>", "<PAD>", "<BOS_TOKEN>", "bfloat16"),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeConfig", dict(
        moe_intermediate_size=32, head_dim=2, n_routed_experts=4, num_experts_per_tok=2, attention_bias=True,
        rope_theta=1000000, routed_scaling_factor=2.5, use_qk_norm=True, num_nextn_predict_layers=1),
        "glm4moe", "<|endoftext|>", "<|endoftext|>", None, "bfloat16"),
    "tiny-GptOssForCausalLM": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2),
                               "gptoss", "<|return|>", "<|endoftext|>", None, "bfloat16"),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(
        num_experts=4, num_experts_per_tok=2, rope_theta=1000000.0, norm_topk_prob=True, head_dim=128,
        max_window_layers=48), "qwen3", "<|im_end|>", "<|endoftext|>", None, "bfloat16"),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHConfig", dict(
        hidden_size=16, layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8, mamba_head_dim=4,
        mamba_n_groups=1, ssm_state_size=16, mamba_d_conv=4, mamba_expand=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
        use_mamba_kernels=False, num_hidden_layers=None),
        "nemotron_3_nano", "<|im_end|>", "<pad>", None, "bfloat16"),
    "tiny-Olmo3ForCausalLM": ("Olmo3Config", dict(
        rms_norm_eps=1e-06, rope_theta=500000, rope_scaling={
            "attention_factor": 1.2079441541679836, "beta_fast": 32.0, "beta_slow": 1.0, "factor": 8.0,
            "original_max_position_embeddings": 8192, "rope_type": "yarn"}, use_cache=False),
        "chatml", "<|endoftext|>", "<|pad|>", None, "bfloat16"),
    "tiny-Lfm2ForCausalLM": ("Lfm2Config", dict(
        full_attn_idxs=[1], block_multiple_of=8, norm_eps=1e-05, rope_theta=1000000.0, conv_bias=False,
        conv_L_cache=3, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0, use_cache=False),
        "lfm2", "<|im_end|>", "<|pad|>", "<|startoftext|>", "bfloat16"),
    "tiny-Lfm2ForCausalLM-2.5": ("Lfm2Config", dict(
        layer_types=["conv", "full_attention"], norm_eps=1e-05,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, conv_bias=False, conv_L_cache=3,
        block_auto_adjust_ff_dim=False, block_multiple_of=256, block_ffn_dim_multiplier=1.0, use_cache=False),
        "lfm2_2_5", "<|im_end|>", "<|pad|>", "<|startoftext|>", "bfloat16"),
    "tiny-GPTNeoXForCausalLM": ("GPTNeoXConfig", {}, None, "<|endoftext|>", None, "<|endoftext|>", "float16"),
    "tiny-RemoteForCausalLM": ("LlamaConfig", {}, "llama3_2", "<|eot_id|>", None, "<|begin_of_text|>", "bfloat16"),
}

# Olmo 3 and ChatML-style families TRL ships no template for: the Qwen-style ChatML one, without generation markers
_CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
           "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

_REMOTE_CONFIG = '''from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote"
'''
_REMOTE_MODELING = '''from transformers import LlamaForCausalLM, LlamaModel

from .configuration_remote import RemoteConfig


class RemoteModel(LlamaModel):
    config_class = RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def _config(spec_cls:str, kwargs:dict, tok):
    import transformers
    cls = getattr(transformers, spec_cls)
    kw = {**_SMALL, **kwargs}
    if kw.get("num_hidden_layers") is None: kw.pop("num_hidden_layers")  # Nemotron-H: one layer per block type
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id)
    return cls(**kw, **ids)


def build_model(path:Path, name:str, dtype:str|None=None) -> Path:
    "Write TRL's `trl-internal-testing/<name>` equivalent to `path` (in `dtype`, default the dtype TRL pushes)"
    from transformers import AutoModelForCausalLM, GenerationConfig
    cfg_cls, kwargs, template, eos, pad, bos, trl_dtype = MODEL_SPECS[name]
    chat_template = None if template is None else _CHATML if template == "chatml" else trl_chat_template(template)
    tok = family_tokenizer(chat_template, eos=eos, pad=pad, bos=bos)
    config = _config(cfg_cls, kwargs, tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights_tiny_model(model)
    model = model.to(getattr(torch, dtype or trl_dtype))
    if name == "tiny-NemotronHForCausalLM-nano":  # as TRL's script: Mamba's A_log and D stay float32
        for i, kind in enumerate(config.layers_block_type):
            if kind == "mamba":
                model.model.layers[i].mixer.A_log.data = model.model.layers[i].mixer.A_log.data.float()
                model.model.layers[i].mixer.D.data = model.model.layers[i].mixer.D.data.float()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if name == "tiny-RemoteForCausalLM": _make_remote(path)
    return path


def _make_remote(path:Path):
    "Turn a saved Llama into TRL's `RemoteForCausalLM`: custom code next to the weights, found through `auto_map`"
    (path/"configuration_remote.py").write_text(_REMOTE_CONFIG)
    (path/"modeling_remote.py").write_text(_REMOTE_MODELING)
    cfg = json.loads((path/"config.json").read_text())
    cfg.update(model_type="remote", architectures=["RemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                         "AutoModel": "modeling_remote.RemoteModel",
                         "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (path/"config.json").write_text(json.dumps(cfg, indent=2))


class LocalHub:
    """The `trl-internal-testing` repos TRL's tests use, built on first request under `root`:
    `hub.model("tiny-Qwen2ForCausalLM-2.5")` (add `-fp32` for a float32 copy), `hub.dataset("zen")`"""
    DATASETS = {"zen": zen_configs, "harmony": harmony_configs, "toolcall": toolcall_configs,
                "zen-image": zen_image_configs}

    def __init__(self, root):
        self.root = Path(root)

    def model(self, name:str) -> str:
        base, dtype = (name[:-5], "float32") if name.endswith("-fp32") else (name, None)
        path = self.root/"models"/name
        if not (path/"config.json").exists(): build_model(path, base, dtype)
        return str(path)

    def dataset(self, name:str) -> str:
        path = self.root/"datasets"/name
        if not (path/"README.md").exists(): write_dataset_repo(path, self.DATASETS[name]())
        return str(path)

    def template(self) -> str:
        "TRL's tests/data/template.jinja (a Qwen3 template): TRL's copy of it, written to a file"
        path = self.root/"data"/"template.jinja"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(trl_chat_template("qwen3"))
        return str(path)


__all__ = ["LocalHub", "MODEL_SPECS", "build_model", "family_tokenizer", "zen_configs", "write_dataset_repo"]
