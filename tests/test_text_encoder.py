"""The Qwen3 text encoder: template, parity with the diffusers path, loading, lookup, cache."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.factories import TOKENIZER_FIXTURE  # noqa: E402
from tests.factories.pipeline import QWEN3_USER_TEMPLATE  # noqa: E402
from tests.factories.text_encoder import (  # noqa: E402
    fp8_scaled_state,
    make_qwen3,
    save_comfy_text_encoder,
    save_diffusers_root,
    save_hf_text_encoder,
    save_tokenizer,
)
from zimage_core.config import TextEncoderConfig  # noqa: E402
from zimage_core.errors import CheckpointError, ZImageError  # noqa: E402
from zimage_core.text_encoder import (  # noqa: E402
    ZIMAGE_TEMPLATE,
    TextEncoder,
    format_prompt,
    infer_text_encoder_config,
)
from zimage_core.tokenizer import find_tokenizer  # noqa: E402
from zimage_core.weights import WeightSource, save_safetensors  # noqa: E402

FIXTURE = TOKENIZER_FIXTURE
CAT_IDS = [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
PROMPTS = ["a cat", "a red fox jumping over a frozen lake at dawn, cinematic light, 35mm photo", ""]
LONG = "a very detailed photograph of a cat, " * 70  # well over 512 tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURE), local_files_only=True)


@pytest.fixture(scope="module")
def cfg():
    return TextEncoderConfig.tiny()


@pytest.fixture(scope="module")
def qwen(cfg):
    return make_qwen3(cfg, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, qwen):
    root = tmp_path_factory.mktemp("te")
    save_diffusers_root(qwen, root / "diffusers")
    save_comfy_text_encoder(qwen, root / "comfy" / "qwen_3_4b.safetensors")
    save_tokenizer(root / "comfy" / "tokenizer")
    return root


@pytest.fixture(scope="module")
def te_hf(files):
    return TextEncoder.load(files / "diffusers")


@pytest.fixture(scope="module")
def te_comfy(files):
    return TextEncoder.load(files / "comfy" / "qwen_3_4b.safetensors")


def reference(model, tok, prompts, max_length=512):
    """diffusers ZImagePipeline._encode_prompt, spelled out with transformers on the full model."""
    texts = [ZIMAGE_TEMPLATE.format(prompt=p) for p in prompts]
    inputs = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.bool()
    with torch.no_grad():
        hs = model(input_ids=inputs.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hs[i][mask[i]] for i in range(len(prompts))]


# ---- template ----------------------------------------------------------------------------------
def test_template_string():
    assert format_prompt("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("{x} {prompt}") == "<|im_start|>user\n{x} {prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_template_token_ids(tok):
    assert tok(format_prompt("a cat")).input_ids == CAT_IDS
    assert len(tok(format_prompt("")).input_ids) == 8
    # The vendored fixture carries Qwen2.5's chat template (it adds a default system prompt); render the user turn
    # with Qwen3's template, which the Z-Image repositories ship.
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
        chat_template=QWEN3_USER_TEMPLATE,
    )
    assert chat == format_prompt("a cat")
    assert tok(chat).input_ids == CAT_IDS


# ---- parity with the diffusers path -----------------------------------------------------------
@pytest.mark.parametrize("layout", ["hf", "comfy"])
def test_parity_short_batch_and_empty(layout, te_hf, te_comfy, qwen, tok):
    te = te_hf if layout == "hf" else te_comfy
    te.clear_cache()
    ref = reference(qwen, tok, PROMPTS)
    got = te.encode(PROMPTS)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert got[0].shape == (len(CAT_IDS), 32) and got[2].shape == (8, 32)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        assert rel_err(g, r) <= 1e-5
    one = te.encode(["a cat"])  # a single prompt on its own (cache cleared first)
    te.clear_cache()
    assert rel_err(te.encode("a cat")[0], ref[0]) <= 1e-5
    assert rel_err(one[0], ref[0]) <= 1e-5


@pytest.mark.parametrize("layout", ["hf", "comfy"])
def test_parity_long_prompt_truncated(layout, te_hf, te_comfy, qwen, tok, caplog):
    te = te_hf if layout == "hf" else te_comfy
    te.clear_cache()
    n_full = len(tok(format_prompt(LONG)).input_ids)
    assert n_full > 512
    ref = reference(qwen, tok, [LONG, "a cat"])
    with caplog.at_level(logging.WARNING, logger="zimage_core.text_encoder"):
        res = te.encode_detailed([LONG, "a cat"])
    assert res.embeddings[0].shape == (512, 32) and ref[0].shape == (512, 32)
    for g, r in zip(res.embeddings, ref):
        assert rel_err(g, r) <= 1e-5
    assert res.n_cut == [n_full - 512, 0] and res.n_tokens == [512, len(CAT_IDS)] and res.truncated
    assert te.last_result is res
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"the last {n_full - 512} tokens were cut" in m for m in msgs), msgs
    # no limit: the whole prompt is encoded, equal to the reference without truncation
    full = te.encode_detailed([LONG], max_length=None)
    assert full.embeddings[0].shape == (n_full, 32) and full.n_cut == [0]
    assert rel_err(full.embeddings[0], reference(qwen, tok, [LONG], max_length=n_full)[0]) <= 1e-5
    assert rel_err(full.embeddings[0][:512], ref[0]) <= 1e-5


def test_position_limit_error(files, tok):
    te = TextEncoder.load(files / "diffusers", tokenizer=tok)
    te.config = te.config.replace(max_position_embeddings=64)
    with pytest.raises(ZImageError, match="at most 64 positions"):
        te.encode([LONG], max_length=None)
    with pytest.raises(ZImageError, match="max_length"):
        te.encode(["a"], max_length=0)


# ---- loading ----------------------------------------------------------------------------------
def test_config_inference(cfg):
    shapes = {
        "embed_tokens.weight": (151936, 2560),
        "layers.0.self_attn.q_norm.weight": (128,),
        "layers.0.self_attn.q_proj.weight": (4096, 2560),
        "layers.0.self_attn.k_proj.weight": (1024, 2560),
        "layers.0.mlp.gate_proj.weight": (9728, 2560),
        "layers.35.input_layernorm.weight": (2560,),
    }
    assert infer_text_encoder_config(shapes) == TextEncoderConfig.qwen3_4b()
    hf = {"rope_theta": 5e5, "rms_norm_eps": 1e-5, "num_hidden_layers": 36, "max_position_embeddings": 1024}
    got = infer_text_encoder_config(shapes, hf)
    assert (got.rope_theta, got.rms_norm_eps, got.max_position_embeddings) == (5e5, 1e-5, 1024)
    got = infer_text_encoder_config(shapes, {"rope_parameters": {"rope_type": "default", "rope_theta": 2.0}})
    assert got.rope_theta == 2.0
    with pytest.raises(CheckpointError, match="lacks tensor"):
        infer_text_encoder_config({"embed_tokens.weight": (10, 4)})


def test_loaded_model_and_skipped_weights(files, cfg, tok, monkeypatch):
    read: list[str] = []
    orig = WeightSource.__getitem__
    monkeypatch.setattr(WeightSource, "__getitem__", lambda self, k: (read.append(k), orig(self, k))[1])
    for path in (files / "diffusers", files / "comfy" / "qwen_3_4b.safetensors"):
        read.clear()
        te = TextEncoder.load(path, tokenizer=tok)
        assert te.config == cfg.replace(vocab_size=151936)
        assert len(te.model.layers) == cfg.n_layers - 1
        assert isinstance(te.model.norm, torch.nn.Identity)
        assert not [n for n, _ in te.model.named_parameters() if n.startswith("norm")]
        assert te.model.rotary_emb.inv_freq.dtype == torch.float32
        assert te.device == torch.device("cpu") and te.dtype == torch.float32
        assert read and "embed_tokens.weight" in read
        assert not [
            k for k in read if k.startswith(f"layers.{cfg.n_layers - 1}.") or "norm.weight" == k or "lm_head" in k
        ]


def test_layout_variants(tmp_path, qwen, tok):
    ref = reference(qwen, tok, ["a cat"])[0]
    save_hf_text_encoder(qwen, tmp_path / "bare" / "text_encoder", prefix="")  # keys without model.
    save_tokenizer(tmp_path / "bare" / "tokenizer")
    aio = tmp_path / "aio" / "zimage_aio.safetensors"
    save_comfy_text_encoder(qwen, aio, prefix="text_encoders.qwen3_4b.transformer.")
    extra = dict(WeightSource.open(aio).items())
    extra["model.diffusion_model.cap_pad_token"] = torch.zeros(1, 8)
    extra["vae.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    save_safetensors(extra, aio)
    for path, kw in ((tmp_path / "bare" / "text_encoder", {}), (aio, {"tokenizer": tok})):
        te = TextEncoder.load(path, **kw)
        assert rel_err(te.encode("a cat")[0], ref) <= 1e-5
    te = TextEncoder.load(aio, tokenizer=str(FIXTURE), dtype="bfloat16")
    assert te.dtype == torch.bfloat16 and te.encode("a cat")[0].dtype == torch.bfloat16
    assert rel_err(te.encode("a cat")[0], ref) < 0.05


def test_diffusers_loads_factory_folder(files, qwen):
    from transformers import Qwen3Model

    loaded = Qwen3Model.from_pretrained(str(files / "diffusers" / "text_encoder"), local_files_only=True)
    for (n, a), b in zip(qwen.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_fp8_scaled_file(tmp_path, qwen, tok):
    state = fp8_scaled_state(qwen, comfy_quant=True)
    save_safetensors(state, tmp_path / "qwen_3_4b_fp8_mixed.safetensors")
    te = TextEncoder.load(tmp_path / "qwen_3_4b_fp8_mixed.safetensors", tokenizer=tok)
    assert rel_err(te.encode("a cat")[0], reference(qwen, tok, ["a cat"])[0]) < 0.1


def test_wrong_files(tmp_path):
    dit = {"cap_embedder.1.weight": torch.zeros(8, 4), "layers.0.attention.qkv.weight": torch.zeros(24, 8)}
    vae = {"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2, 3, 3), "decoder.up.0.x": torch.zeros(1)}
    qwen2 = {
        "model.embed_tokens.weight": torch.zeros(10, 8),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
    }
    for name, state, pattern in (
        ("dit.safetensors", dit, "diffusion model"),
        ("ae.safetensors", vae, "VAE"),
        ("qwen25.safetensors", qwen2, "q_norm"),
    ):
        save_safetensors(state, tmp_path / name)
        save_tokenizer(tmp_path / "tokenizer")
        with pytest.raises(CheckpointError, match=pattern) as e:
            TextEncoder.load(tmp_path / name, tokenizer=str(FIXTURE))
        assert "qwen_3_4b.safetensors" in str(e.value) and "--text-encoder" in str(e.value)
        assert "ComfyUI/models/text_encoders" in str(e.value)


# ---- tokenizer lookup -------------------------------------------------------------------------
def test_tokenizer_lookup_order(tmp_path):
    explicit = save_tokenizer(tmp_path / "mine")
    comfy = save_tokenizer(tmp_path / "comfy" / "qwen25_tokenizer")
    root = tmp_path / "root"
    (root / "text_encoder").mkdir(parents=True)
    save_tokenizer(root / "tokenizer")
    te_file = tmp_path / "models" / "qwen_3_4b.safetensors"
    te_file.parent.mkdir()
    te_file.write_bytes(b"")

    assert find_tokenizer(explicit, root, comfy) == explicit
    assert find_tokenizer(None, root, comfy) == root / "tokenizer"
    assert find_tokenizer(None, root / "text_encoder", comfy) == root / "tokenizer"
    assert find_tokenizer(None, te_file, comfy) == comfy  # nothing beside the file yet
    save_tokenizer(te_file.parent)  # tokenizer files in the same folder as the weights
    assert find_tokenizer(None, te_file, comfy) == te_file.parent
    save_tokenizer(te_file.parent / "tokenizer")  # a tokenizer/ folder beside the file wins
    assert find_tokenizer(None, te_file, comfy) == te_file.parent / "tokenizer"
    with pytest.raises(ZImageError, match="not a tokenizer folder"):
        find_tokenizer(tmp_path / "models" / "nothing_here", root, comfy)


def test_tokenizer_missing_message(tmp_path):
    lonely = tmp_path / "qwen_3_4b.safetensors"
    lonely.write_bytes(b"")
    with pytest.raises(ZImageError) as e:
        find_tokenizer(None, lonely, None)
    msg = str(e.value)
    assert "Tongyi-MAI/Z-Image-Turbo" in msg and "--tokenizer DIR" in msg and str(tmp_path / "tokenizer") in msg
    with pytest.raises(ZImageError, match="no Qwen tokenizer found"):
        TextEncoder.load(lonely)


# ---- cache and placement ----------------------------------------------------------------------
def test_cache_hit_skips_model(files, tok):
    te = TextEncoder.load(files / "diffusers", tokenizer=tok)
    te.cache_size = 3
    calls = []
    te.model.register_forward_hook(lambda *a: calls.append(1))
    a = te.encode(["a cat", "a dog"])
    assert len(calls) == 1
    b = te.encode(["a dog", "a cat"])
    assert len(calls) == 1 and torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    b[0].add_(1.0)  # callers get copies: the cache is not corrupted
    assert torch.equal(te.encode(["a dog"])[0], a[1]) and len(calls) == 1
    te.encode(["a cat"], max_length=None)  # another max_length is another entry
    assert len(calls) == 2
    te.encode(["x", "y", "z"])  # evicts older entries (LRU of 3)
    te.encode(["a dog"])
    assert len(calls) == 4
    te.to("cpu")
    te.encode(["a dog"])
    assert len(calls) == 4
    te.to("cpu", torch.bfloat16)  # another dtype: cached float32 embeddings are dropped
    assert te.dtype == torch.bfloat16 and te.model.rotary_emb.inv_freq.dtype == torch.float32
    assert te.encode(["a dog"])[0].dtype == torch.bfloat16 and len(calls) == 5
    te.unload()
    assert not te.loaded
    with pytest.raises(ZImageError, match="unloaded"):
        te.encode(["a dog"])
