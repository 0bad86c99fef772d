"""The service's request and response models, declared once for the single-machine server and the Ray app."""
from __future__ import annotations

import base64
import binascii
import secrets
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import InputError, one_line

MAX_SEED = 2**31 - 1
NUMBER_FIELDS = ("steps", "text_guidance", "image_guidance", "seed", "resolution")
MAX_DIGITS = 12  # a number given as a longer string is refused before it is parsed (JSON's own: by json.loads)


class EditParameters(BaseModel):
    """One edit's settings, as form fields or JSON. Left out: the preset's (exact: 20 steps, s_T 7.5, s_I 1.5; a
    distilled model's: its own steps and scales)."""

    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(max_length=2000)
    steps: Optional[int] = Field(None, ge=1)
    text_guidance: Optional[float] = Field(None, ge=0, le=50, allow_inf_nan=False)
    image_guidance: Optional[float] = Field(None, ge=0, le=50, allow_inf_nan=False)
    sampler: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    resolution: Union[int, Literal["auto", "none"]] = "auto"
    keep_detail: bool = False  # edit at the resolution, answer at the input's size with only the change added
    preset: str = "exact"
    output_format: Optional[Literal["png", "jpeg", "webp"]] = None  # default: from the Accept header, else png

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _no_booleans(cls, value: object) -> object:
        """JSON's true and false are not numbers here (pydantic's lax mode would read ``"steps": true`` as 1)."""
        if isinstance(value, bool):
            raise ValueError("a number is expected, not true or false")
        return value


class EditOutput(BaseModel):
    """An edit's answer in JSON: the image in base64 (PNG unless asked otherwise), and what produced it."""

    image: str
    media_type: str
    seed: int
    steps: int
    text_guidance: float
    image_guidance: float
    unet_evaluations: int
    timings: dict[str, float]


class JobView(BaseModel):
    """A job's state: queued (with its queue position), running (steps done), or finished."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: Optional[int] = None
    steps_done: int
    steps: int
    tiles: Optional[tuple[str, int, int]] = None  # a tiled VAE running: (stage, tiles done, of how many)
    error: Optional[str] = None
    result: Optional[EditOutput] = None


def parse_parameters(fields: dict) -> EditParameters:
    """EditParameters from form or JSON fields (form values arrive as strings); one line naming the field."""
    values = {k: v for k, v in fields.items() if v not in (None, "")}
    for name in NUMBER_FIELDS:
        value = values.get(name)
        if isinstance(value, str) and len(value.strip()) > MAX_DIGITS and value.strip().lstrip("+-").isdigit():
            raise InputError(f"{name}: a number of at most {MAX_DIGITS} digits is expected")
    resolution = values.get("resolution")
    if isinstance(resolution, str) and resolution.isascii() and resolution.isdigit():
        values["resolution"] = int(resolution)
    try:
        return EditParameters.model_validate(values, strict=False)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = "missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        if where.startswith("resolution"):  # the union's branches would each be named
            where, message = "resolution", "a whole number of pixels, 'auto' or 'none' is expected"
        raise InputError(one_line(f"{where}: {message}")) from None


def decode_base64(text: object) -> bytes:
    """The bytes of a base64 image field (a data: URL prefix allowed)."""
    if not isinstance(text, str) or not text:
        raise InputError("image: missing (a base64 string in JSON, or a file in a multipart form)")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image: not valid base64") from None


def draw_seed() -> int:
    """A seed for a request that gave none; answered with the result so the edit can be repeated."""
    return secrets.randbelow(MAX_SEED + 1)
