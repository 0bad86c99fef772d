"""Hostile clients beside a serving load run: what an attacker sent the server (image bombs, crafted files of
every format Pillow reads, odd JSON, unknown paths, slow uploads, big jobs never fetched), counted by answer."""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import random
from collections import Counter
from urllib.parse import urlsplit

import httpx
from PIL import Image

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO", "DDS", "QOI", "JPEG2000", "PCX", "SGI",
           "IM", "SPIDER", "BLP", "DIB", "ICNS", "MPO")
ODD_JSON = ('{"instruction": "x", "image": "IMAGE", "steps": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000,
            '{"instruction": "x", "image": "IMAGE", "steps": true}', '{"instruction": "x", "image": "IMAGE", '
            '"resolution": "\u00b2"}')


@functools.lru_cache(maxsize=None)
def blank_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A flat picture as PNG: a few KB however many pixels it claims (30000x30000 mode 1: a 109 KB bomb)."""
    data = io.BytesIO()
    Image.new(mode, (width, height)).save(data, format="PNG")
    return data.getvalue()


def sample_files(picture: Image.Image) -> list[bytes]:
    """``picture`` (small, RGB) in every format of ``FORMATS`` that this Pillow writes."""
    files = []
    for fmt in FORMATS:
        data = io.BytesIO()
        try:
            (picture.convert("L") if fmt == "SPIDER" else picture).save(data, format=fmt)
        except (KeyError, OSError, ValueError):  # not writable by this Pillow
            continue
        files.append(data.getvalue())
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A crafted variant of an image file: header bits flipped, header fields set to extremes, cut short, or
    random bytes spliced in."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        at = rng.randrange(min(len(data), 64)) if kind < 2 else rng.randrange(len(data))
        if kind == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[at : at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\x00\x00\x01\x00"])
        elif kind == 2:
            del data[at:]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


class Attacker:
    """Hostile requests of every kind, in turn, until told to stop; ``counts[kind][status]``."""

    KINDS = ("bomb", "crafted_file", "odd_json", "unknown_path", "slow_upload", "big_job")

    def __init__(self, url: str, picture: Image.Image, seed: int = 0, slow_body_bytes: int = 2_000_000):
        self.url, self.rng = url, random.Random(seed)
        self.samples = sample_files(picture)
        self.image_b64 = base64.b64encode(self.samples[0]).decode()
        self.slow_body_bytes = slow_body_bytes
        self.counts: dict[str, Counter] = {kind: Counter() for kind in self.KINDS}

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        turn = 0
        while not stop.is_set():
            kind = self.KINDS[turn % len(self.KINDS)]
            turn += 1
            status = await getattr(self, kind)(client)
            self.counts[kind][status] += 1

    async def bomb(self, client: httpx.AsyncClient) -> int:
        return (await client.post(f"{self.url}/v1/edits", data={"instruction": "x"},
                                  files={"image": ("a.png", blank_png(30000, 30000, "1"))})).status_code

    async def crafted_file(self, client: httpx.AsyncClient) -> int:
        upload = mutate(self.rng.choice(self.samples), self.rng)
        return (await client.post(f"{self.url}/v1/edits", data={"instruction": "x", "steps": "1"},
                                  files={"image": ("a", upload)})).status_code

    async def odd_json(self, client: httpx.AsyncClient) -> int:
        body = self.rng.choice(ODD_JSON).replace("IMAGE", self.image_b64)
        return (await client.post(f"{self.url}/v1/edits", content=body,
                                  headers={"Content-Type": "application/json"})).status_code

    async def unknown_path(self, client: httpx.AsyncClient) -> int:
        return (await client.get(f"{self.url}/x-{self.rng.randrange(10**9)}")).status_code

    async def big_job(self, client: httpx.AsyncClient) -> int:
        """A 16-megapixel upload queued as a job whose result is never fetched."""
        return (await client.post(f"{self.url}/v1/jobs", data={"instruction": "x", "steps": "1"},
                                  files={"image": ("a.png", blank_png(4000, 4000))})).status_code

    async def slow_upload(self, _: httpx.AsyncClient) -> int:
        """Half a large body, then silence: the server's read deadline should answer 408."""
        parts = urlsplit(self.url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(b"POST /v1/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: " + str(self.slow_body_bytes).encode() + b"\r\n\r\n"
                         + b"a" * (self.slow_body_bytes // 2))
            await writer.drain()
            status_line = await reader.readline()
            return int(status_line.split()[1]) if status_line else 0
        finally:
            writer.close()


def attack_summary(attackers: list[Attacker]) -> dict[str, dict[str, int]]:
    """Answers to every attacker's requests, by kind and status (JSON-ready)."""
    total: dict[str, Counter] = {kind: Counter() for kind in Attacker.KINDS}
    for attacker in attackers:
        for kind, counts in attacker.counts.items():
            total[kind].update(counts)
    return {kind: {str(status): n for status, n in sorted(counts.items())} for kind, counts in total.items()}


def server_errors(summary: dict[str, dict[str, int]]) -> int:
    """Hostile requests answered 5xx other than 503 (the request cap's refusal), or not answered at all (0)."""
    return sum(n for counts in summary.values() for status, n in counts.items()
               if status == "0" or (status.startswith("5") and status != "503"))

