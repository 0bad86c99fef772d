"""``ip2p generate-pairs``: before/after image pairs from caption pairs, as the paper made its training data
(Brooks et al. 2022, sec. 3.1.2): Stable Diffusion samples the input and the edited caption from the same
noise, and for the first fraction ``p`` of the steps the edited sample reuses the input sample's attention
maps (Prompt-to-Prompt, Hertz et al. 2022), so the two images share their layout; ``p`` and the text guidance
are drawn per candidate. A CLIP filter then drops candidates whose images do not match their captions, whose
images differ too much, or whose change does not follow the captions' change, and keeps the best by
directional similarity.

The attention sharing here copies the input sample's maps in every UNet attention layer: the self-attention
maps whole, and the cross-attention maps by word alignment: each token of the edited caption that the input
caption also has (aligned as the longest matching runs of token ids), or that swaps for one of its words,
takes the input's map of that token (Prompt-to-Prompt's "replace"), and a token the edit adds keeps its
own map ("refine"), so captions of different lengths ("in a field" -> "in a snowy field") line up as
captions that swap a word do.

Output: the folder format ``ip2p train --data`` reads (``metadata.jsonl`` with ``input_image``,
``edit_prompt``, ``edited_image``, ``input_caption``, ``output_caption``; images under ``images/``), one
shard file per prompt under ``shards/`` (written atomically, so a rerun resumes after the last finished
prompt), and ``report.json``: how many candidates each filter dropped.
"""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from engine.errors import InputError
from engine.images import save_image
from engine.files import write_json_atomic, write_jsonl_atomic
from training.prompts import read_prompts

log = logging.getLogger(__name__)
FILTERS = ("text_image", "image_image", "directional", "beyond_keep")


@dataclass(frozen=True)
class PairSettings:
    samples: int = 4  # candidates per prompt
    keep: int = 1  # best candidates kept per prompt, by directional similarity
    steps: int = 50
    resolution: int = 512
    seed: int = 0
    p_range: tuple[float, float] = (0.1, 0.9)  # fraction of steps with shared attention (the paper's range)
    guidance_range: tuple[float, float] = (5.0, 9.0)  # text guidance, drawn per candidate
    clip_threshold: float = 0.2  # each image against its caption
    clip_img_threshold: float = 0.7  # input image against edited image
    clip_dir_threshold: float = 0.2  # image change against caption change


# -- attention sharing ----------------------------------------------------------------------------------------
def align_tokens(source: list[int], target: list[int]) -> list[int]:
    """For each position of ``target`` (token ids), the position in ``source`` whose attention map it takes:
    the same token under the longest matching runs (difflib), or the token it swaps for where a run of
    tokens is replaced by as many ("red" -> "blue", Prompt-to-Prompt's word swap); -1 for tokens added, or
    replacing a run of another length (their own maps, Prompt-to-Prompt's refinement)."""
    aligned = [-1] * len(target)
    matcher = difflib.SequenceMatcher(a=source, b=target, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and a1 - a0 == b1 - b0):
            aligned[b0:b1] = range(a0, a1)
    return aligned


class SharingState:
    """Whether the edited rows take the input rows' attention maps right now (switched per step), and for each
    text token of the edited caption the input token whose cross-attention map it takes (-1: its own)."""

    def __init__(self) -> None:
        self.sharing = False
        self.token_map: list[int] | None = None  # None: position by position


class SharedAttention:
    """A diffusers attention processor for batches of (input, edited) row pairs, rows 0, 2, ... the inputs and
    1, 3, ... their edits (classifier-free guidance doubles the pairs). While ``state.sharing``, each edited row
    attends with its input row's attention probabilities, applied to its own values."""

    def __init__(self, state: SharingState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        import torch

        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("attention sharing covers the UNet's transformer attention layers only")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        rows = hidden_states.shape[0]
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], rows)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        if self.state.sharing:
            probs = attn.get_attention_scores(query, key, mask)  # (rows * heads, queries, keys), row-major
            maps = probs.view(rows, -1, *probs.shape[1:]).clone()  # (rows, heads, queries, keys)
            token_map = self.state.token_map
            if encoder_hidden_states is None or token_map is None:
                maps[1::2] = maps[0::2]
            else:  # cross-attention: aligned tokens take the input's map of their token, added ones keep theirs
                if len(token_map) != maps.shape[-1]:
                    raise ValueError(f"the token map covers {len(token_map)} tokens, the context has {maps.shape[-1]}")
                index = torch.tensor([max(i, 0) for i in token_map], device=maps.device)
                added = torch.tensor([i < 0 for i in token_map], device=maps.device)
                maps[1::2] = torch.where(added, maps[1::2], maps[0::2][..., index])
            out = torch.bmm(maps.view_as(probs), value)
        else:  # the maps are not needed: the fused kernel, as diffusers' own processor uses
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


# -- the base model ---------------------------------------------------------------------------------------
def load_base(model: str, device: str = "cpu"):
    """A diffusers StableDiffusionPipeline (text-to-image, 4-channel UNet) with a DDIM scheduler and attention
    sharing installed; (pipeline, its SharingState). InputError naming the problem for anything else."""
    import torch

    from engine.checkpoints import resolve_model

    folder = resolve_model(model).folder
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        in_channels = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))["in_channels"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise InputError(f"{folder}: not a diffusers Stable Diffusion folder (model_index.json, unet/config.json)") from None
    if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline") or in_channels != 4:
        raise InputError(f"{folder}: not a text-to-image Stable Diffusion model ({index.get('_class_name')}, UNet "
                         f"in_channels {in_channels}); --base takes e.g. stable-diffusion-v1-5")
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    return pipe, install_sharing(pipe)


def install_sharing(pipe) -> SharingState:
    """Give a StableDiffusionPipeline a DDIM scheduler and attention sharing; the state that switches it.
    DDIM is deterministic given the initial noise, so the two samples of a pair differ only by caption and
    sharing (an ancestral sampler would draw different noise for each row at every step)."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    state = SharingState()
    pipe.unet.set_attn_processor(SharedAttention(state))
    return state


def sample_pair(pipe, state: SharingState, input_caption: str, output_caption: str, p: float, guidance: float,
                seed: int, steps: int, resolution: int):
    """(input image, edited image) as PIL images from one noise, attention shared for the first round(p *
    steps) steps (cross-attention by word alignment of the two captions). p = 0 gives the plain
    text-to-image sample of each caption."""
    import torch

    shared_steps = round(p * steps)
    ids = pipe.tokenizer([input_caption, output_caption], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True).input_ids
    state.token_map = align_tokens(list(ids[0]), list(ids[1]))
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype).repeat(2, 1, 1, 1)

    def after_step(_pipe, step, _timestep, tensors):
        state.sharing = step + 1 < shared_steps
        return tensors

    state.sharing = shared_steps > 0
    try:
        images = pipe([input_caption, output_caption], num_inference_steps=steps, guidance_scale=guidance,
                      latents=noise, height=resolution, width=resolution, callback_on_step_end=after_step).images
    finally:
        state.sharing = False
    return images[0], images[1]


# -- the CLIP filter --------------------------------------------------------------------------------------
def clip_filter(image_in: np.ndarray, image_out: np.ndarray, text_in: np.ndarray, text_out: np.ndarray,
                settings: PairSettings) -> tuple[list[int], dict[str, int], np.ndarray]:
    """Which candidates of one prompt to keep, from unit CLIP embeddings (one row per candidate; the caption
    rows may be one row). Filters in order: each image against its caption (>= clip_threshold), input
    against edited image (>= clip_img_threshold), image change against caption change (>=
    clip_dir_threshold), then the best ``keep`` by directional similarity. Returns (kept indices, best
    first; candidates each filter dropped; directional similarities)."""
    from training.clip_metrics import cosine

    text_in, text_out = np.broadcast_to(text_in, image_in.shape), np.broadcast_to(text_out, image_out.shape)
    caption_fit = np.minimum(cosine(image_in, text_in), cosine(image_out, text_out))
    similarity = cosine(image_in, image_out)
    direction = cosine(image_out - image_in, text_out - text_in)
    dropped = dict.fromkeys(FILTERS, 0)
    alive = np.ones(len(image_in), bool)
    for name, passed in (("text_image", caption_fit >= settings.clip_threshold),
                         ("image_image", similarity >= settings.clip_img_threshold),
                         ("directional", direction >= settings.clip_dir_threshold)):
        dropped[name] = int(np.sum(alive & ~passed))
        alive &= passed
    ranked = [int(i) for i in np.argsort(-direction, kind="stable") if alive[i]]
    dropped["beyond_keep"] = max(0, len(ranked) - settings.keep)
    return ranked[:settings.keep], dropped, direction


# -- the command ------------------------------------------------------------------------------------------
def _shards(out: Path) -> Iterator[dict]:
    for shard in sorted((out / "shards").glob("*.json")):
        yield json.loads(shard.read_text(encoding="utf-8"))


def generate_pairs(prompts: str | Path, base: str, clip: str, out: str | Path, settings: PairSettings,
                   device: str = "cpu", progress: bool = True) -> dict:
    """Candidates for every prompt, filtered; resumable. Returns the report (also written to report.json)."""
    from training.clip_metrics import ClipScorer, resolve_clip

    rows, malformed = read_prompts(prompts)
    if settings.samples < 1 or settings.keep < 1 or settings.steps < 1:
        raise InputError("--samples, --keep and --steps must be at least 1")
    if settings.resolution % 8 or settings.resolution < 64:
        raise InputError(f"--resolution: a multiple of 8, at least 64, got {settings.resolution}")
    resolve_clip(clip)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    settings_file = out / "settings.json"
    recorded = dict(asdict(settings), prompts=str(Path(prompts).resolve()), base=str(base), clip=str(clip))
    if settings_file.is_file():
        before = json.loads(settings_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in recorded if json.dumps(before.get(k)) != json.dumps(recorded[k]))
        if changed:
            raise InputError(f"{out}: made with other settings ({', '.join(changed)} differ); use a new folder")
    else:
        write_json_atomic(settings_file, recorded)
    done = {shard["index"] for shard in _shards(out)}
    todo = [i for i in range(len(rows)) if i not in done]
    if done:
        log.info("%s: %d of %d prompts already done; resuming", out, len(done), len(rows))
    if todo:
        pipe, state = load_base(base, device)
        scorer = ClipScorer(clip, device=device)
    for index in tqdm(todo, desc="prompts", unit="prompt", disable=not progress):
        row = rows[index]
        rng = np.random.default_rng([settings.seed, index])
        candidates = []
        for c in range(settings.samples):
            p = float(rng.uniform(*settings.p_range))
            guidance = float(rng.uniform(*settings.guidance_range))
            seed = int(rng.integers(0, 2**31 - 1))
            first, second = sample_pair(pipe, state, row["input"], row["output"], p, guidance, seed, settings.steps,
                                        settings.resolution)
            candidates.append(dict(p=p, guidance=guidance, seed=seed, images=(first, second)))
        image_in = scorer.image_embeddings([c["images"][0] for c in candidates])
        image_out = scorer.image_embeddings([c["images"][1] for c in candidates])
        text_in, text_out = scorer.text_embeddings([row["input"]]), scorer.text_embeddings([row["output"]])
        kept, dropped, direction = clip_filter(image_in, image_out, text_in, text_out, settings)
        examples = []
        for rank, c in enumerate(kept):
            names = (f"images/{index:06d}-{rank}-input.png", f"images/{index:06d}-{rank}-edited.png")
            for image, name in zip(candidates[c]["images"], names):
                save_image(image, out / name)
            examples.append(dict(input_image=names[0], edit_prompt=row["edit"], edited_image=names[1],
                                 input_caption=row["input"], output_caption=row["output"],
                                 p=round(candidates[c]["p"], 4), text_guidance=round(candidates[c]["guidance"], 4),
                                 seed=candidates[c]["seed"], clip_directional_similarity=float(direction[c])))
        write_json_atomic(out / "shards" / f"{index:06d}.json",
                          dict(index=index, prompt=row, candidates=settings.samples, dropped=dropped, examples=examples))
    return finish(out, len(rows), malformed)


def finish(out: Path, prompts: int, malformed: int) -> dict:
    """metadata.jsonl and report.json from the shards, each written atomically."""
    shards = list(_shards(out))
    examples = [e for shard in shards for e in shard["examples"]]
    write_jsonl_atomic(out / "metadata.jsonl", examples)
    report = dict(prompts=prompts, prompts_done=len(shards), malformed_prompt_lines=malformed,
                  candidates=sum(s["candidates"] for s in shards),
                  dropped={name: sum(s["dropped"][name] for s in shards) for name in FILTERS}, kept=len(examples))
    write_json_atomic(out / "report.json", report)
    log.info("%s: %d pairs kept of %d candidates (dropped: %s)", out, report["kept"], report["candidates"],
             ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    return report
