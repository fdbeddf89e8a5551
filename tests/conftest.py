"Test-wide settings: nothing may reach the Hub, and notebooks see the same environment as pytest."
import os

for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE'): os.environ[var] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('WANDB_DISABLED', 'true')

if os.environ.get('SFT_NB_REQUIRE_CUDA') == '1':  # set by tools/gpu_check.sh: a GPU check that skips its CUDA tests must not pass
    import torch
    if not torch.cuda.is_available(): raise RuntimeError("SFT_NB_REQUIRE_CUDA=1 but torch sees no CUDA device: the CUDA tests would be skipped.")
