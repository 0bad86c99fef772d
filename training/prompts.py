"""The text half of the paper's data (Brooks et al. 2022, sec. 3.1.1): for an input caption, a language model
writes an edit instruction and the edited caption. ``ip2p generate-prompts`` runs a causal LM through
transformers (a local folder or hub id) or an OpenAI-compatible completion endpoint (vLLM, llama.cpp's
server); ``ip2p train-prompts`` fine-tunes a causal LM on such triplets, as the paper fine-tuned GPT-3 on 700.

One text format throughout, for few-shot prompts and for fine-tuning (``TRIPLET``); the few-shot examples
(``prompt_examples.jsonl``) were written for this project. Generations that do not parse are skipped and
counted, duplicates removed; the output is written once, atomically.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, Sequence

from tqdm.auto import tqdm

from engine.errors import InputError, quote_error
from training.hub import model_folder
from engine.files import write_jsonl_atomic

log = logging.getLogger(__name__)
TRIPLET = "Caption: {input}\nInstruction: {edit}\nEdited caption: {output}\n"
HEADER = "For each image caption, write an edit instruction and the caption of the edited image.\n\n"
LM_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
MAX_NEW_TOKENS = 64


def shipped_examples() -> list[dict]:
    """The project's example triplets (input, edit, output)."""
    text = resources.files("training").joinpath("prompt_examples.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def few_shot_prompt(caption: str, examples: Sequence[dict]) -> str:
    """The header, the examples in TRIPLET form, and the caption waiting for its instruction."""
    shots = "\n".join(TRIPLET.format(**e) for e in examples)
    return f"{HEADER}{shots}\nCaption: {caption}\nInstruction:"


def parse_completion(caption: str, completion: str) -> dict | None:
    """The triplet a completion of ``few_shot_prompt(caption)`` gives, or None if it does not parse: an
    instruction line, then ``Edited caption: ...`` different from the input."""
    lines = completion.strip("\n").split("\n")
    if len(lines) < 2 or not lines[1].startswith("Edited caption:"):
        return None
    edit, output = lines[0].strip(), lines[1][len("Edited caption:"):].strip()
    if not edit or not output or output.lower() == caption.lower() or "Caption:" in edit:
        return None
    return {"input": caption, "edit": edit, "output": output}


def read_captions(path: str | Path) -> list[str]:
    """One caption a line, blank lines skipped."""
    path = Path(path)
    try:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise InputError(f"{path}: no such captions file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable captions file ({type(err).__name__})") from None
    if not captions:
        raise InputError(f"{path}: no captions (one a line)")
    return captions


class Completer(Protocol):
    def complete(self, prompt: str, seed: int) -> str: ...

    def fits(self, prompt: str) -> bool:
        """Whether the prompt and an answer fit the model's context."""
        ...


def fitted_prompt(caption: str, examples: Sequence[dict], lm: Completer) -> str:
    """The few-shot prompt with as many of the examples as the LM's context holds (at least one)."""
    count = len(examples)
    while count > 1 and not lm.fits(few_shot_prompt(caption, examples[:count])):
        count -= 1
    return few_shot_prompt(caption, examples[:count])


class TransformersLM:
    """A causal LM through transformers, sampling with a seed per prompt."""

    def __init__(self, name: str, device: str = "cpu", temperature: float = 0.8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = causal_lm_folder(name)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        self.torch, self.device, self.temperature = torch, device, temperature
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def fits(self, prompt: str) -> bool:
        return self.context is None or len(self.tokenizer(prompt)["input_ids"]) + MAX_NEW_TOKENS <= self.context

    def complete(self, prompt: str, seed: int) -> str:
        self.torch.manual_seed(seed)
        tokens = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.torch.inference_mode():
            out = self.model.generate(**tokens, max_new_tokens=MAX_NEW_TOKENS, do_sample=self.temperature > 0,
                                      temperature=self.temperature or None, top_p=0.95 if self.temperature else None,
                                      pad_token_id=pad)
        text = self.tokenizer.decode(out[0, tokens["input_ids"].shape[1]:], skip_special_tokens=True)
        return text.split("\n\n")[0]


class EndpointLM:
    """An OpenAI-compatible ``/v1/completions`` endpoint."""

    def __init__(self, url: str, model: str | None = None, temperature: float = 0.8, timeout: float = 120.0):
        url = url.rstrip("/")
        self.url = url if url.endswith("/completions") else f"{url}/v1/completions"
        self.model, self.temperature, self.timeout = model, temperature, timeout

    def fits(self, prompt: str) -> bool:
        return True  # the server truncates or refuses; its context is not known here

    def complete(self, prompt: str, seed: int) -> str:
        body = dict(prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=self.temperature, stop=["\n\n"], seed=seed)
        if self.model:
            body["model"] = self.model
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = response.read()
        except urllib.error.HTTPError as err:
            raise InputError(f"{self.url}: answered HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            raise InputError(f"{self.url}: does not answer ({getattr(err, 'reason', err)})") from None
        try:
            return json.loads(answer)["choices"][0]["text"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise InputError(f"{self.url}: the answer is not an OpenAI-style completion "
                             f"({answer[:60]!r})") from None


def causal_lm_folder(name: str) -> Path:
    """The folder of a causal language model (InputError naming what else it is)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = model_folder(name, "language model", LM_FILES)
    if (folder / "model_index.json").is_file():
        raise InputError(f"{folder}: a diffusers pipeline, not a causal language model")
    try:
        model_type = AutoConfig.from_pretrained(folder).model_type
    except (OSError, ValueError) as err:
        raise InputError(f"{folder}: not a transformers model ({quote_error(err)})") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"{folder}: not a causal language model (model_type {model_type!r})")
    return folder


@dataclass
class PromptReport:
    captions: int
    written: int
    malformed: int
    duplicates: int


def generate_prompts(captions: Sequence[str], lm: Completer, out: str | Path, seed: int = 0,
                     examples: Sequence[dict] | None = None, progress: bool = True) -> PromptReport:
    """One triplet per caption where the LM's answer parses; written to ``out`` as JSON lines, atomically."""
    examples = shipped_examples() if examples is None else examples
    rows, seen, malformed, duplicates = [], set(), 0, 0
    for i, caption in enumerate(tqdm(captions, desc="prompts", unit="caption", disable=not progress)):
        triplet = parse_completion(caption, lm.complete(fitted_prompt(caption, examples, lm), seed + i))
        if triplet is None:
            malformed += 1
            continue
        key = tuple(triplet[k].lower() for k in ("input", "edit", "output"))
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(triplet)
    out = Path(out)
    write_jsonl_atomic(out, rows)
    report = PromptReport(len(captions), len(rows), malformed, duplicates)
    log.info("%s: %d triplets from %d captions (%d malformed, %d duplicates skipped)", out, report.written,
             report.captions, report.malformed, report.duplicates)
    return report


def read_prompts(path: str | Path) -> tuple[list[dict], int]:
    """The (input, edit, output) rows of a prompts.jsonl; (rows, malformed lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable ({type(err).__name__})") from None
    rows, malformed = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if all(isinstance(row.get(k), str) and row[k].strip() for k in ("input", "edit", "output")):
                rows.append({k: row[k].strip() for k in ("input", "edit", "output")})
                continue
        except (json.JSONDecodeError, AttributeError):
            pass
        malformed += 1
    if not rows:
        raise InputError(f"{path}: no prompts (each line a JSON object with input, edit and output)")
    return rows, malformed


def read_triplets(path: str | Path) -> list[dict]:
    """Training triplets (input, edit, output) from JSON lines."""
    rows, malformed = read_prompts(path)
    if malformed:
        log.warning("%s: %d malformed lines skipped", path, malformed)
    return rows


def train_prompts(triplets: Sequence[dict], base: str, out: str | Path, steps: int = 200, lr: float = 5e-5,
                  batch_size: int = 8, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Fine-tune causal LM ``base`` on ``triplets`` in TRIPLET form (the whole text is the target); the model and
    tokenizer written to ``out`` (a new folder, made whole then renamed into place). Returns the first and last
    losses."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists; train-prompts writes a new folder")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise InputError("--steps and --batch-size must be at least 1, --lr positive")
    folder = causal_lm_folder(base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    texts = [TRIPLET.format(**t) + (tokenizer.eos_token or "") for t in triplets]
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="training", unit="step", disable=not progress):
        pick = torch.randint(len(texts), (min(batch_size, len(texts)),), generator=order).tolist()
        batch = tokenizer([texts[i] for i in pick], return_tensors="pt", padding=True, truncation=True,
                          max_length=128).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.eval().save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, out)
    log.info("%s: trained %d steps on %d triplets, loss %.3f -> %.3f", out, steps, len(texts), losses[0], losses[-1])
    return dict(first_loss=losses[0], last_loss=losses[-1], steps=steps, triplets=len(texts))
