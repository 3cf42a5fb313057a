"""A complete tiny Z-Image model on disk, in the diffusers layout and as the three ComfyUI single files.

Built with the reference classes (diffusers + transformers) and random weights, so parity tests run
the real loaders and the reference pipeline on the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tests.factories import TOKENIZER_FIXTURE
from tests.factories.dit import make_diffusers_dit, save_comfy_dit
from tests.factories.text_encoder import make_qwen3, save_comfy_text_encoder
from tests.factories.vae import make_diffusers_vae, save_bfl_vae
from zimage_core.config import DiTConfig, TextEncoderConfig, VAEConfig


@dataclass
class TinyModel:
    root: Path  # diffusers layout
    transformer: Path  # ComfyUI single files
    text_encoder: Path
    vae: Path
    tokenizer: Path
    dit_config: DiTConfig


# The fixture carries Qwen2.5's chat template (it adds a default system prompt); the Z-Image repos ship Qwen3's,
# whose user-turn rendering is this. diffusers' reference pipeline formats prompts through it.
QWEN3_USER_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def load_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_FIXTURE), local_files_only=True)
    tok.chat_template = QWEN3_USER_TEMPLATE
    return tok


def build_tiny_model(
    folder: Path,
    seed: int = 0,
    dit_cfg: DiTConfig | None = None,
    te_cfg: TextEncoderConfig | None = None,
    vae_cfg: VAEConfig | None = None,
) -> TinyModel:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    te_cfg = te_cfg or TextEncoderConfig.tiny()
    dit_cfg = dit_cfg or DiTConfig.tiny(t_mid_dim=1024, cap_feat_dim=te_cfg.hidden_size)
    vae_cfg = vae_cfg or VAEConfig.tiny()
    dit = make_diffusers_dit(dit_cfg, seed)
    te = make_qwen3(te_cfg, seed + 1)
    vae = make_diffusers_vae(vae_cfg, seed + 2)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=load_tokenizer(), transformer=dit)
    root = Path(folder) / "z-image-tiny"
    pipe.save_pretrained(root, safe_serialization=True)
    single = Path(folder) / "comfy"
    single.mkdir(parents=True, exist_ok=True)
    return TinyModel(
        root=root,
        transformer=save_comfy_dit(dit, single / "z_image_turbo_bf16.safetensors", cfg=dit_cfg),
        text_encoder=save_comfy_text_encoder(te, single / "qwen_3_4b.safetensors") or single / "qwen_3_4b.safetensors",
        vae=save_bfl_vae(vae, single / "ae.safetensors") or single / "ae.safetensors",
        tokenizer=root / "tokenizer",
        dit_config=dit_cfg,
    )


def reference_pipeline(model: TinyModel):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(model.root, dtype=torch.float32, local_files_only=True)
