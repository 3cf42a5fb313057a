"""The reward interface: built-in statistics, module:function plug-ins, the judge JSONL, CLIP alignment and the
aesthetic predictor on tiny models made here, and one clear error for every missing file or bad output."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from train.rl.rewards import (
    AestheticReward,
    AlignmentReward,
    RewardError,
    brightness,
    build_rewards,
    contrast,
    redness,
    saturation,
)


def images(b=3, h=16, w=16, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_statistics_are_what_they_say_and_differentiable():
    x = torch.zeros(2, 3, 4, 4)
    x[0] = 1.0  # white
    x[1, 0] = 1.0  # pure red
    assert brightness(x).tolist() == pytest.approx([1.0, 0.299])
    assert saturation(x).tolist() == pytest.approx([0.0, 1.0])
    assert redness(x).tolist() == pytest.approx([0.0, 1.0])
    half = torch.zeros(1, 3, 2, 2)
    half[..., 0] = 1.0  # left column white: luminance 1, 0, 1, 0 -> std (unbiased) of [1,0,1,0]
    assert contrast(half).item() == pytest.approx(torch.tensor([1.0, 0, 1, 0]).std().item())
    rs = build_rewards([{"name": "brightness", "weight": 2.0}, {"name": "redness", "weight": -1.0, "label": "red"}])
    img = images().requires_grad_(True)
    scores = rs.scores(img, ["a", "b", "c"])
    assert list(scores) == ["brightness", "red"] and rs.weights == {"brightness": 2.0, "red": -1.0}
    total = rs.total(scores)
    torch.testing.assert_close(total, 2 * brightness(img) - redness(img))
    total.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0 and rs.differentiable


def test_plugin_function_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            import torch
            def length(images, prompts):
                return [float(len(p)) for p in prompts]
            def wrong(images, prompts):
                return [1.0]
            def nan(images, prompts):
                return torch.full((images.shape[0],), float("nan"))
            not_callable = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = build_rewards([{"function": "my_rewards:length", "weight": 0.5}])
    assert rs.labels == ["my_rewards:length"]
    assert rs.scores(images(2), ["ab", "abcd"])["my_rewards:length"].tolist() == [2.0, 4.0]
    with pytest.raises(RewardError, match="one score per image"):
        build_rewards([{"function": "my_rewards:wrong"}]).scores(images(2), ["a", "b"])
    with pytest.raises(RewardError, match="non-finite"):
        build_rewards([{"function": "my_rewards:nan"}]).scores(images(2), ["a", "b"])
    with pytest.raises(RewardError, match="no callable 'not_callable'"):
        build_rewards([{"function": "my_rewards:not_callable"}])
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        build_rewards([{"function": "no_such_module:f"}])
    with pytest.raises(RewardError, match="package.module:function"):
        build_rewards([{"function": "just_a_name"}])


def test_configuration_errors_name_the_problem():
    with pytest.raises(RewardError, match="at least one reward"):
        build_rewards([])
    with pytest.raises(RewardError, match="unknown reward 'pickscore'"):
        build_rewards([{"name": "pickscore"}])
    with pytest.raises(RewardError, match="exactly one of name"):
        build_rewards([{"name": "brightness", "function": "a:b"}])
    with pytest.raises(RewardError, match="takes no \\['path'\\]"):
        build_rewards([{"name": "brightness", "path": "x"}])
    with pytest.raises(RewardError, match="two rewards are called 'brightness'"):
        build_rewards([{"name": "brightness"}, {"name": "brightness"}])
    with pytest.raises(RewardError, match="weight must be a number"):
        build_rewards([{"name": "brightness", "weight": "high"}])
    rs = build_rewards([{"name": "brightness"}])
    with pytest.raises(RewardError, match="2 images but 1 prompts"):
        rs.scores(images(2), ["a"])
    with pytest.raises(RewardError, match=r"\[B, 3, H, W\]"):
        rs.scores(torch.rand(2, 16, 16), ["a", "b"])


def test_judge_scores_from_jsonl(tmp_path):
    f = tmp_path / "judge.jsonl"
    f.write_text(
        json.dumps({"id": "00000-0", "score": 0.25, "scores": {"text": 1.0}})
        + "\n\n"
        + json.dumps({"id": "00001-3", "score": 0.75, "scores": {"text": 0.5}})
        + "\n"
    )
    rs = build_rewards(
        [{"name": "judge", "path": str(f)}, {"name": "judge", "path": str(f), "field": "scores.text", "label": "text"}]
    )
    out = rs.scores(images(2), ["p", "q"], keys=["00001-3", "00000-0"])
    assert out["judge"].tolist() == [0.75, 0.25] and out["text"].tolist() == [0.5, 1.0]
    with pytest.raises(RewardError, match="no score for 1 image"):
        rs.scores(images(1), ["p"], keys=["00002-0"])
    with pytest.raises(RewardError, match="needs their ids"):
        rs.scores(images(1), ["p"])
    with pytest.raises(RewardError, match="does not exist.*candidates.jsonl"):
        build_rewards([{"name": "judge", "path": str(tmp_path / "missing.jsonl")}])
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(RewardError, match="line 1"):
        build_rewards([{"name": "judge", "path": str(tmp_path / "bad.jsonl")}])


def test_missing_model_files_are_one_clear_error(tmp_path):
    with pytest.raises(RewardError, match="needs model = the folder of a CLIP or SigLIP"):
        build_rewards([{"name": "alignment"}])
    with pytest.raises(RewardError, match="not a model folder. Put a CLIP or SigLIP"):
        build_rewards([{"name": "alignment", "model": str(tmp_path / "siglip2")}])
    with pytest.raises(RewardError, match="predictor file .*nothing is downloaded"):
        build_rewards([{"name": "aesthetic", "path": str(tmp_path / "aesthetic.pth")}])
    (tmp_path / "mlp.safetensors").write_bytes(b"")
    with pytest.raises(RewardError, match="needs clip = the folder of the CLIP model"):
        build_rewards([{"name": "aesthetic", "path": str(tmp_path / "mlp.safetensors")}])


# ---------------------------------------------------------------------------------------------
# Tiny CLIP made here (no download): the alignment and aesthetic rewards on a real transformers model
# ---------------------------------------------------------------------------------------------
WORDS = ["a", "red", "blue", "circle", "square", "photo", "of"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("clip")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 32}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    )
    return folder


def test_alignment_reward_is_clip_cosine_and_differentiable(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    reward = AlignmentReward(model=str(tiny_clip))
    img = images(2, 32, 32).requires_grad_(True)
    prompts = ["a red circle", "a blue square"]
    score = reward(img, prompts)
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_clip))(
        prompts, padding="max_length", max_length=12, return_tensors="pt"
    )
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=(img - mean) / std)
    expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(score.detach(), expected, atol=1e-5, rtol=1e-4)
    score.sum().backward()
    assert img.grad.abs().sum() > 0


def test_aesthetic_reward_reads_a_linear_stack(tiny_clip, tmp_path):
    from transformers import CLIPModel

    from zimage_core.weights import save_safetensors

    g = torch.Generator().manual_seed(1)
    mlp = {
        "layers.0.weight": torch.randn(4, 8, generator=g),
        "layers.0.bias": torch.randn(4, generator=g),
        "layers.2.weight": torch.randn(1, 4, generator=g),
        "layers.2.bias": torch.randn(1, generator=g),
    }
    save_safetensors(mlp, tmp_path / "aesthetic.safetensors")
    reward = build_rewards(
        [
            {
                "name": "aesthetic",
                "path": str(tmp_path / "aesthetic.safetensors"),
                "clip": str(tiny_clip),
                "activation": "relu",
            }
        ]
    )
    img = images(2, 32, 32)
    score = reward.scores(img, ["x", "y"])["aesthetic"]
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=(img - mean) / std)
        emb = getattr(emb, "pooler_output", emb)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        h = torch.relu(emb @ mlp["layers.0.weight"].T + mlp["layers.0.bias"])
        expected = (h @ mlp["layers.2.weight"].T + mlp["layers.2.bias"])[:, 0]
    torch.testing.assert_close(score.detach(), expected, atol=1e-5, rtol=1e-4)
    save_safetensors({"w.weight": torch.randn(1, 5)}, tmp_path / "wrong.safetensors")
    with pytest.raises(RewardError, match="width 5.*gives 8"):
        AestheticReward(path=str(tmp_path / "wrong.safetensors"), clip=str(tiny_clip))
