"""ip2p generate-pairs: Prompt-to-Prompt attention sharing on a tiny random Stable Diffusion, the CLIP filter on
constructed similarities, the written folder training with ip2p train, resuming, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import InputError
from ip2p.cli import main
from tests.conftest import cli_error
from training.pairs import PairSettings, align_tokens, clip_filter, load_base, sample_pair

PROMPTS = [{"input": "a red circle on a white wall", "edit": "make the circle blue",
            "output": "a blue circle on a white wall"},
           {"input": "a green square in a field", "edit": "make it winter", "output": "a green square in a snowy field"}]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def base(saved_models):
    return load_base(saved_models["sd"])


def test_p_zero_is_the_plain_text_to_image_sample_of_each_caption(base, saved_models):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe, state = base
    first, second = sample_pair(pipe, state, PROMPTS[0]["input"], PROMPTS[0]["output"], p=0.0, guidance=7.0,
                                seed=11, steps=4, resolution=64)
    plain = StableDiffusionPipeline.from_pretrained(saved_models["sd"], safety_checker=None,
                                                    requires_safety_checker=False)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    side = 64 // plain.vae_scale_factor
    noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(11))
    for caption, got in ((PROMPTS[0]["input"], first), (PROMPTS[0]["output"], second)):
        expected = plain(caption, num_inference_steps=4, guidance_scale=7.0, latents=noise, height=64,
                         width=64).images[0]
        assert np.abs(pixels(got) - pixels(expected)).max() <= 1  # the same sample, to 8-bit rounding


def attention_layer(cross: bool):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_shared_attention_is_diffusers_attention_until_it_shares(cross):
    from diffusers.models.attention_processor import AttnProcessor

    from training.pairs import SharedAttention, SharingState

    layer, state = attention_layer(cross), SharingState()
    hidden = torch.randn(4, 10, 16)  # rows: input, edited, input, edited (guidance doubles the pairs)
    context = torch.randn(4, 7, 12) if cross else None
    with torch.no_grad():
        expected = AttnProcessor()(layer, hidden, context)
        plain = SharedAttention(state)(layer, hidden, context)
        state.sharing = True
        shared = SharedAttention(state)(layer, hidden, context)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(shared[0::2], expected[0::2])  # the input rows never change
    # an edited row: its own values, weighted by its input row's attention probabilities
    source = context if cross else hidden
    with torch.no_grad():
        for edited in (1, 3):
            q = layer.head_to_batch_dim(layer.to_q(hidden[edited - 1:edited]))
            k = layer.head_to_batch_dim(layer.to_k(source[edited - 1:edited]))
            v = layer.head_to_batch_dim(layer.to_v(source[edited:edited + 1]))
            probs = (q @ k.transpose(1, 2) * layer.scale).softmax(-1)
            manual = layer.to_out[0](layer.batch_to_head_dim(probs @ v))
            torch.testing.assert_close(shared[edited:edited + 1], manual)
    assert not torch.allclose(shared[1::2], expected[1::2])


def test_sharing_changes_only_the_edited_sample_and_switches_off(base):
    pipe, state = base
    samples = {p: sample_pair(pipe, state, PROMPTS[0]["input"], PROMPTS[0]["output"], p=p, guidance=7.0, seed=3,
                              steps=6, resolution=64) for p in (0.0, 1.0)}
    # the input sample is as alone (to 8-bit rounding: shared steps use the explicit kernel, others the fused one)
    assert np.abs(pixels(samples[1.0][0]) - pixels(samples[0.0][0])).max() <= 1
    assert np.abs(pixels(samples[1.0][1]) - pixels(samples[0.0][1])).max() > 0
    assert not state.sharing  # switched off after the run


def test_words_align_across_captions_of_different_lengths():
    # "a green square in a field" -> "a green square in a snowy field", as token ids, padded with 0
    source, target = [49406, 1, 2, 3, 4, 5, 6, 49407, 0, 0], [49406, 1, 2, 3, 4, 5, 9, 6, 49407, 0]
    assert align_tokens(source, target) == [0, 1, 2, 3, 4, 5, -1, 6, 7, 8]
    assert align_tokens(source, source) == list(range(10))
    swapped = [49406, 1, 7, 3, 4, 5, 6, 49407, 0, 0]  # a word swapped: its map is the word it replaces
    assert align_tokens(source, swapped) == list(range(10))
    assert align_tokens(source, [49406, 1, 7, 8, 3, 4, 5, 6, 49407, 0])[1:5] == [1, -1, -1, 3]


def test_cross_attention_is_shared_by_word_alignment():
    """An edited row's cross-attention takes its input row's map of the aligned token; an added token keeps
    its own map."""
    from training.pairs import SharedAttention, SharingState

    layer, state = attention_layer(True), SharingState()
    hidden, context = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    state.sharing, state.token_map = True, [0, 1, -1, 2, 3, 4, 5]
    with torch.no_grad():
        shared = SharedAttention(state)(layer, hidden, context)
        q = [layer.head_to_batch_dim(layer.to_q(hidden[i : i + 1])) for i in (0, 1)]
        k = [layer.head_to_batch_dim(layer.to_k(context[i : i + 1])) for i in (0, 1)]
        v = layer.head_to_batch_dim(layer.to_v(context[1:2]))
        own, source = ((q[i] @ k[i].transpose(1, 2) * layer.scale).softmax(-1) for i in (1, 0))
        maps = torch.stack([source[..., 0], source[..., 1], own[..., 2], source[..., 2], source[..., 3],
                            source[..., 4], source[..., 5]], -1)
        manual = layer.to_out[0](layer.batch_to_head_dim(maps @ v))
    torch.testing.assert_close(shared[1:2], manual)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["same length", "a word added"])
def test_sharing_pulls_the_edited_sample_toward_the_input_layout(saved_models, prompt):
    """With attention maps that carry layout, sharing them moves the edited sample measurably toward the input
    sample, for a swapped word and for an added one. A randomly initialised UNet attends almost uniformly (its
    maps carry nothing to share), so this model's query and key weights are scaled up 8x: peaked maps, as a
    trained model's are."""
    pipe, state = load_base(saved_models["sd"])
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.to_q.weight.mul_(8.0)
                module.to_k.weight.mul_(8.0)
    distance = {}
    for p in (0.0, 0.5, 1.0):
        first, second = sample_pair(pipe, state, prompt["input"], prompt["output"], p=p, guidance=7.0, seed=3,
                                    steps=10, resolution=64)
        distance[p] = np.abs(pixels(first) - pixels(second)).mean()
    # measured: 3.9 and 1.6 against 6.6 and 5.8 (8-bit levels; the tiny tokenizer splits "red" and "blue"
    # into word pieces of different counts, so the swapped word keeps its own maps there)
    assert distance[1.0] < 0.7 * distance[0.0]
    assert distance[0.5] < 0.7 * distance[0.0]


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_the_clip_filter_keeps_and_drops_the_right_candidates():
    # 2-D embeddings at chosen angles: text_in at 0 deg, text_out at 30 deg
    deg = np.deg2rad
    text_in, text_out = unit([[1, 0]]), unit([[np.cos(deg(30)), np.sin(deg(30))]])
    angle_in = [0, 0, 0, 0, 85]  # input images' angles
    angle_out = [30, 10, 60, -20, 85]  # edited images'
    image_in = unit([[np.cos(deg(a)), np.sin(deg(a))] for a in angle_in])
    image_out = unit([[np.cos(deg(a)), np.sin(deg(a))] for a in angle_out])
    settings = PairSettings(clip_threshold=0.2, clip_img_threshold=0.7, clip_dir_threshold=0.2, keep=1)
    kept, dropped, direction = clip_filter(image_in, image_out, text_in, text_out, settings)
    # 4: the input image is 85 deg from its caption (cos 0.09 < 0.2): caption filter
    # 2: input and edit 60 deg apart (cos 0.5 < 0.7): image filter
    # 3: moved away from the caption's direction: directional filter
    # 0 and 1 pass; 0 moved exactly along the caption change (directional 1), so it is the one kept
    assert dropped == {"text_image": 1, "image_image": 1, "directional": 1, "beyond_keep": 1}
    assert kept == [0] and direction[0] == pytest.approx(1.0)
    kept, dropped, _ = clip_filter(image_in, image_out, text_in, text_out, PairSettings(keep=5))
    assert kept == [0, 1] and dropped["beyond_keep"] == 0


def write_prompts(path, rows=PROMPTS, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines), encoding="utf-8")
    return path


PERMISSIVE = ["--clip-threshold", "-1", "--clip-img-threshold", "-1", "--clip-dir-threshold", "-1"]


def test_generate_pairs_writes_trainable_data_and_resumes(tmp_path, saved_models, tiny_clip, tiny_model):
    prompts = write_prompts(tmp_path / "prompts.jsonl", extra_lines=["not json\n", '{"input": "x"}\n'])
    out = tmp_path / "pairs"
    args = ["-q", "generate-pairs", str(prompts), "--base", saved_models["sd"], "--clip", tiny_clip, "-o", str(out),
            "--samples", "2", "--keep", "1", "--steps", "3", "--resolution", "64", *PERMISSIVE]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report == dict(prompts=2, prompts_done=2, malformed_prompt_lines=2, candidates=4,
                          dropped=dict(text_image=0, image_image=0, directional=0, beyond_keep=2), kept=2)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["edit_prompt"] for r in rows] == [p["edit"] for p in PROMPTS]
    assert rows[0]["input_caption"] == PROMPTS[0]["input"] and 0.1 <= rows[0]["p"] <= 0.9
    first_image = (out / rows[0]["edited_image"]).read_bytes()

    # a rerun resumes: the finished prompts are not redone (their files stay as they are)
    (out / "shards" / "000001.json").unlink()
    stamp = (out / rows[0]["edited_image"]).stat().st_mtime_ns
    assert main(args) == 0
    assert (out / rows[0]["edited_image"]).stat().st_mtime_ns == stamp
    assert (out / rows[0]["edited_image"]).read_bytes() == first_image
    assert json.loads((out / "report.json").read_text())["kept"] == 2
    # other settings in the same folder are refused
    assert main([*args[:-len(PERMISSIVE)], "--steps", "4"]) == 2

    # the written folder trains
    trained = tmp_path / "trained"
    assert main(["-q", "train", "--base", tiny_model, "--data", str(out), "--output", str(trained), "--max-steps", "2",
                 "--resolution", "32", "--batch-size", "1"]) == 0
    assert (trained / "model_index.json").is_file() or any(trained.rglob("model_index.json"))


def test_a_strict_filter_keeps_nothing_and_says_so(tmp_path, saved_models, tiny_clip):
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows=PROMPTS[:1])
    out = tmp_path / "pairs"
    assert main(["-q", "generate-pairs", str(prompts), "--base", saved_models["sd"], "--clip", tiny_clip, "-o",
                 str(out), "--samples", "2", "--steps", "2", "--resolution", "64", "--clip-img-threshold", "1.01"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 0 and sum(report["dropped"].values()) == 2
    assert (out / "metadata.jsonl").read_text() == ""


@pytest.mark.parametrize("case, message", [
    ("missing prompts", "no such prompts file"),
    ("empty prompts", "no prompts"),
    ("ip2p base", "not a text-to-image Stable Diffusion model"),
    ("clip is sd", "not a CLIP model"),
    ("bad p range", "--p-range"),
])
def test_generate_pairs_bad_input_is_one_line(tmp_path, saved_models, tiny_clip, capsys, case, message):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    base, clip, extra = saved_models["sd"], tiny_clip, []
    if case == "missing prompts":
        prompts = tmp_path / "none.jsonl"
    elif case == "empty prompts":
        prompts.write_text("\n")
    elif case == "ip2p base":
        base = saved_models["ip2p"]
    elif case == "clip is sd":
        clip = saved_models["sd"]
    elif case == "bad p range":
        extra = ["--p-range", "0.9:0.1"]
    code = main(["-q", "generate-pairs", str(prompts), "--base", base, "--clip", clip, "-o", str(tmp_path / "out"),
                 *extra])
    assert code == 2 and message in cli_error(capsys)


def test_load_base_refuses_an_edit_model(saved_models):
    with pytest.raises(InputError, match="in_channels 8"):
        load_base(saved_models["ip2p"])
