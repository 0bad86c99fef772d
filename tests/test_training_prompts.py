"""ip2p generate-prompts and train-prompts: the prompt format, parsing, a real local OpenAI-style completion
server, a tiny GPT-2 through transformers (fine-tuned, then generating), and bad input."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ip2p.cli import main
from tests.conftest import cli_error
from tests.serving_server import free_port
from training.prompts import HEADER, few_shot_prompt, parse_completion, shipped_examples

CAPTIONS = ["a red car on a bridge", "a cat on a sofa", "a cat on a sofa", "a house by a lake", "a tree"]


def test_the_shipped_examples_and_the_prompt_format():
    examples = shipped_examples()
    assert len(examples) >= 20 and all(set(e) == {"input", "edit", "output"} for e in examples)
    prompt = few_shot_prompt("a red car", examples[:2])
    assert prompt.startswith(HEADER) and prompt.endswith("\nCaption: a red car\nInstruction:")
    assert f"Edited caption: {examples[1]['output']}\n" in prompt


@pytest.mark.parametrize("completion, expected", [
    (" make it blue\nEdited caption: a blue car\n", {"input": "a red car", "edit": "make it blue",
                                                      "output": "a blue car"}),
    (" make it blue\nEdited caption: a blue car\nCaption: next", {"input": "a red car", "edit": "make it blue",
                                                                   "output": "a blue car"}),
    (" make it blue", None),  # no edited caption
    (" make it blue\nOutput: a blue car", None),
    (" \nEdited caption: a blue car", None),  # empty instruction
    (" do nothing\nEdited caption: A red car", None),  # the caption unchanged
])
def test_parse_completion(completion, expected):
    assert parse_completion("a red car", completion) == expected


class CompletionServer:
    """An OpenAI-style /v1/completions server on loopback that answers from a table (caption -> text), or
    garbage when asked to."""

    def __init__(self, answers: dict, garbage: bool = False):
        self.requests, outer = [], self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                caption = body["prompt"].rsplit("Caption: ", 1)[1].split("\n")[0]
                payload = b"<html>oops</html>" if garbage else json.dumps(
                    {"choices": [{"text": answers.get(caption, " ???")}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def write_captions(tmp_path, captions=CAPTIONS):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(captions) + "\n\n", encoding="utf-8")
    return path


def test_generate_prompts_from_an_endpoint(tmp_path):
    answers = {"a red car on a bridge": " make the car green\nEdited caption: a green car on a bridge",
               "a cat on a sofa": " turn the cat into a dog\nEdited caption: a dog on a sofa",
               "a house by a lake": " make it winter\nEdited caption: a house by a frozen lake"}
    server = CompletionServer(answers)
    out = tmp_path / "prompts.jsonl"
    try:
        assert main(["-q", "generate-prompts", str(write_captions(tmp_path)), "-o", str(out), "--endpoint", server.url,
                     "--endpoint-model", "my-lm", "--seed", "10"]) == 0
    finally:
        server.close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"input": c, "edit": a.split("\n")[0].strip(), "output": a.split(": ")[1]}
                    for c, a in answers.items()]  # the duplicate cat and the garbled tree are left out
    paths = {path for path, _ in server.requests}
    assert paths == {"/v1/completions"} and len(server.requests) == 5
    first = server.requests[0][1]
    assert first["model"] == "my-lm" and first["seed"] == 10 and first["stop"] == ["\n\n"]
    assert first["prompt"] == few_shot_prompt(CAPTIONS[0], shipped_examples())


def test_an_endpoint_that_answers_garbage_or_nothing_is_one_line_and_writes_nothing(tmp_path, capsys):
    captions, out = write_captions(tmp_path), tmp_path / "prompts.jsonl"
    server = CompletionServer({}, garbage=True)
    try:
        assert main(["-q", "generate-prompts", str(captions), "-o", str(out), "--endpoint", server.url]) == 2
    finally:
        server.close()
    assert "not an OpenAI-style completion" in capsys.readouterr().err
    closed = f"http://127.0.0.1:{free_port()}"
    assert main(["-q", "generate-prompts", str(captions), "-o", str(out), "--endpoint", closed]) == 2
    assert "does not answer" in cli_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".prompts*"))


def test_train_prompts_lowers_the_loss_and_the_model_generates(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM

    from training.prompts import train_prompts

    out = tmp_path / "prompt-lm"
    result = train_prompts(shipped_examples(), tiny_lm, out, steps=80, lr=3e-3, batch_size=8, progress=False)
    assert result["last_loss"] < 0.5 * result["first_loss"]
    AutoModelForCausalLM.from_pretrained(out)  # a whole model folder
    prompts = tmp_path / "prompts.jsonl"
    assert main(["-q", "generate-prompts", str(write_captions(tmp_path)), "-o", str(prompts), "--lm", str(out)]) == 0
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert all(set(r) == {"input", "edit", "output"} and r["input"] in CAPTIONS for r in rows)
    # the CLI refuses to overwrite what it trained
    assert main(["-q", "train-prompts", "--lm", tiny_lm, "-o", str(out), "--steps", "1"]) == 2


@pytest.mark.parametrize("case, message", [
    ("missing captions", "no such captions file"),
    ("empty captions", "no captions"),
    ("clip as lm", "not a causal language model"),
    ("sd as lm", "a diffusers pipeline, not a causal language model"),
])
def test_generate_prompts_bad_input_is_one_line(tmp_path, tiny_clip, saved_models, capsys, case, message):
    captions, lm = write_captions(tmp_path), tiny_clip
    if case == "missing captions":
        captions = tmp_path / "none.txt"
    elif case == "empty captions":
        captions.write_text("\n \n")
    elif case == "sd as lm":
        lm = saved_models["sd"]
    assert main(["-q", "generate-prompts", str(captions), "-o", str(tmp_path / "p.jsonl"), "--lm", lm]) == 2
    assert message in cli_error(capsys)
