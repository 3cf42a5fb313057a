"""The prompt enhancer: a causal LM over the loaded text encoder (tied head, shared modules), seeded sampling,
greedy parity with transformers' own generate, separate local LLMs, and the ZImagePromptEnhancer node."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from zimage_pack.nodes import enhancer as N
from zimage_pack.nodes import loaders
from zimage_pack.zimage_core.errors import ZImageError as NodeError  # raised inside the pack

from tests.factories.text_encoder import hf_config, make_qwen3, save_comfy_text_encoder, save_tokenizer
from zimage_core.config import TextEncoderConfig
from zimage_core.enhancer import DEFAULT_SYSTEM_PROMPT, QWEN3_CHAT, CausalLM, pick_token, strip_think
from zimage_core.errors import ZImageError
from zimage_core.text_encoder import TextEncoder

IDEA = "a lighthouse on a cliff at dusk"


def lively_qwen3(cfg: TextEncoderConfig, seed: int):
    """A tiny random Qwen3 whose layers outweigh the tied embeddings, so greedy decoding does not just repeat."""
    model = make_qwen3(cfg, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enhancer")
    cfg = TextEncoderConfig.tiny()
    qwen = lively_qwen3(cfg, 0)
    te_dir = tmp / "models" / "text_encoders"
    save_comfy_text_encoder(qwen, te_dir / "qwen_3_4b.safetensors")
    save_tokenizer(te_dir / "tokenizer")
    encoder = TextEncoder.load(te_dir / "qwen_3_4b.safetensors")
    return SimpleNamespace(
        tmp=tmp,
        cfg=cfg,
        qwen=qwen,
        file=te_dir / "qwen_3_4b.safetensors",
        models=tmp / "models",
        encoder=encoder,
        lm=CausalLM.from_text_encoder(encoder),
    )


def reference_lm(env):
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM(hf_config(env.cfg)).eval()
    ref.model.load_state_dict(env.qwen.state_dict())
    ref.tie_weights()
    return ref


# ---------------------------------------------------------------------------------------------- the tied LM
def test_tied_lm_reuses_the_encoder_modules(env):
    lm, enc = env.lm.model, env.encoder.model
    assert lm.model.embed_tokens is enc.embed_tokens
    assert lm.lm_head.weight is enc.embed_tokens.weight  # tied: no second copy of the embeddings
    n_run = len(enc.layers)
    assert n_run == env.cfg.n_layers - 1 and len(lm.model.layers) == env.cfg.n_layers
    assert all(lm.model.layers[i] is enc.layers[i] for i in range(n_run))
    # only the last layer and the final norm are new, read from the same file
    shared = {p.data_ptr() for p in enc.parameters()}
    new = [n for n, p in lm.named_parameters() if p.data_ptr() not in shared]
    assert new and all(n.startswith((f"model.layers.{n_run}.", "model.norm.")) for n in new)
    want = env.qwen.state_dict()
    got = lm.state_dict()
    for k in (f"layers.{n_run}.mlp.down_proj.weight", f"layers.{n_run}.self_attn.q_norm.weight", "norm.weight"):
        assert torch.equal(got["model." + k], want[k])


def test_greedy_matches_transformers_generate(env):
    ids = env.lm.chat_ids(IDEA)
    ours, finished = env.lm.generate(ids, 16, temperature=0.0)
    ref = reference_lm(env)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=sorted(env.lm.stop_ids),
            pad_token_id=sorted(env.lm.stop_ids)[0],
            suppress_tokens=list(range(env.lm.vocab_limit, env.cfg.vocab_size)),
        )
    want = out[0, len(ids) :].tolist()
    if want and want[-1] in env.lm.stop_ids:
        want = want[:-1]
    assert ours == want and len(set(ours)) > 2
    assert finished == (len(ours) < 16)


def test_sampling_is_seeded_and_bounded(env):
    ids = env.lm.chat_ids(IDEA)
    a, _ = env.lm.generate(ids, 12, temperature=1.0, top_p=1.0, seed=3)
    b, _ = env.lm.generate(ids, 12, temperature=1.0, top_p=1.0, seed=3)
    c, _ = env.lm.generate(ids, 12, temperature=1.0, top_p=1.0, seed=4)
    assert a == b and a != c and len(a) <= 12
    greedy, _ = env.lm.generate(ids, 12, temperature=0.0, seed=1)
    assert env.lm.generate(ids, 12, temperature=0.0, seed=2)[0] == greedy  # greedy ignores the seed
    assert len(env.lm.generate(ids, 1, temperature=1.0, seed=5)[0]) <= 1
    with pytest.raises(ZImageError, match="max_new_tokens"):
        env.lm.generate(ids, 0)
    with pytest.raises(ZImageError, match="top_p"):
        env.lm.generate(ids, 4, temperature=1.0, top_p=0.0)


def test_cancel_stops_generation(env):
    ids = env.lm.chat_ids(IDEA)
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        env.lm.generate(ids, 50, temperature=0.0, cancel=cancel)
    assert len(calls) == 4


def test_pick_token_nucleus():
    logits = torch.tensor([3.0, 2.0, 0.0, -1.0, float("-inf")])
    g = torch.Generator().manual_seed(0)
    assert pick_token(logits, g, 0.0, 0.5) == 0
    assert {pick_token(logits, g, 1.0, 0.5) for _ in range(50)} == {0}  # p(0) = 0.66 covers top_p 0.5
    p = torch.softmax(logits, 0)
    drawn = {pick_token(logits, g, 1.0, float(p[0] + p[1]) - 1e-4) for _ in range(200)}
    assert drawn == {0, 1}
    assert 4 not in {pick_token(logits, g, 2.0, 1.0) for _ in range(200)}


def test_chat_format_and_thinking_removed(env):
    ids = env.lm.chat_ids(IDEA)
    assert env.lm.tokenizer.decode(ids) == QWEN3_CHAT.format(system=DEFAULT_SYSTEM_PROMPT, prompt=IDEA)
    custom = env.lm.tokenizer.decode(env.lm.chat_ids(IDEA, system="Be brief."))
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>") and custom.endswith("<think>\n\n</think>\n\n")
    assert strip_think("<think>plan it</think>\n\nA lighthouse.") == "A lighthouse."
    assert strip_think("still thinking</think> The answer") == "The answer"
    assert strip_think("An answer <think>unfinished") == "An answer"
    tok = env.lm.tokenizer
    text, raw = env.lm.decode(tok("<think>\nhmm\n</think>\n\nA red door.", add_special_tokens=False)["input_ids"])
    assert text == "A red door." and "hmm" in raw


def test_separate_llm_file_and_folder_generate_like_the_tied_lm(env, tmp_path):
    ids = env.lm.chat_ids(IDEA)
    want, _ = env.lm.generate(ids, 10)
    single = CausalLM.load(env.file)  # the whole Qwen3 read from the file (tokenizer/ found beside it)
    assert single.model.lm_head.weight is not env.encoder.model.embed_tokens.weight
    assert single.generate(ids, 10)[0] == want
    folder = tmp_path / "Qwen3-tiny"
    reference_lm(env).save_pretrained(folder)
    save_tokenizer(folder)
    hf = CausalLM.load(folder)
    assert hf.chat_template is None  # a folder's own tokenizer chat template is used
    assert hf.generate(ids, 10)[0] == want
    assert "Be brief." in hf.tokenizer.decode(hf.chat_ids(IDEA, system="Be brief."))
    with pytest.raises(ZImageError, match="does not exist"):
        CausalLM.load(tmp_path / "nope")


def test_encoder_without_source_is_explained(env):
    orphan = TextEncoder(env.encoder.model, env.encoder.tokenizer, env.encoder.config)
    with pytest.raises(ZImageError, match="weight file"):
        CausalLM.from_text_encoder(orphan)


# ---------------------------------------------------------------------------------------------- the node
@pytest.fixture()
def node_env(env, monkeypatch):
    monkeypatch.setenv("ZIMAGE_MODELS_DIR", str(env.models))
    return env


def test_node_output_shown_and_deterministic(node_env):
    handle = loaders.ZImageTextEncoderLoader().load("qwen_3_4b.safetensors")[0]
    node = N.ZImagePromptEnhancer()
    out = node.enhance(IDEA, seed=11, max_new_tokens=8, temperature=0.8, top_p=0.9, text_encoder=handle)
    assert set(out) == {"ui", "result"} and out["ui"]["text"] == [out["result"][0]]
    lm = node._tied[1]
    again = node.enhance(IDEA, seed=11, max_new_tokens=8, temperature=0.8, top_p=0.9, text_encoder=handle)
    assert again == out and node._tied[1] is lm  # the LM is built once per text encoder
    greedy = node.enhance(IDEA, seed=0, max_new_tokens=8, temperature=0.0, top_p=1.0, text_encoder=handle)
    ids = lm.generate(lm.chat_ids(IDEA), 8, temperature=0.0)[0]
    assert greedy["result"][0] == (lm.decode(ids)[0] or IDEA)


def test_node_separate_llm_and_errors(node_env, tmp_path):
    folder = node_env.models / "LLM" / "Qwen3-tiny"
    reference_lm(node_env).save_pretrained(folder)
    save_tokenizer(folder)
    assert N.llm_choices()[:2] == [N.USE_TEXT_ENCODER, "Qwen3-tiny"] and "qwen_3_4b.safetensors" in N.llm_choices()
    node = N.ZImagePromptEnhancer()
    out = node.enhance(IDEA, seed=1, max_new_tokens=6, temperature=0.0, top_p=1.0, llm="Qwen3-tiny")
    assert isinstance(out["result"][0], str) and out["result"][0]
    with pytest.raises(NodeError, match="text_encoder"):
        node.enhance(IDEA, seed=1, max_new_tokens=4, temperature=0.0, top_p=1.0)
    with pytest.raises(NodeError, match="empty"):
        node.enhance("  ", seed=1, max_new_tokens=4, temperature=0.0, top_p=1.0, llm="Qwen3-tiny")
    with pytest.raises(NodeError, match="models/LLM"):
        node.enhance(IDEA, seed=1, max_new_tokens=4, temperature=0.0, top_p=1.0, llm="missing-llm")
