"""Tokenizer from tokenizer.json, chat template via jinja2, EOS and stop strings end requests."""

from __future__ import annotations

import json

import pytest

from runtime.engine import Engine, EngineConfig
from runtime.tokenizer import StreamDecoder, Tokenizer
from runtime.weights.tiny import write_tiny

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = write_tiny(tmp_path_factory.mktemp("tok"), "glm4_moe", vocab_size=300)
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the cat sat on the mat. héllo wörld ✓"] * 50, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"})
    )
    return d


def test_chat_template_and_roundtrip(model_with_tokenizer):
    t = Tokenizer(model_with_tokenizer)
    text = t.apply_chat_template([{"role": "user", "content": "the cat"}])
    assert text == "<|user|>\nthe cat<|assistant|>\n"
    ids = t.encode("héllo wörld ✓")
    assert t.decode(ids) == "héllo wörld ✓"
    dec = StreamDecoder(t)
    assert "".join(dec.push(i) for i in ids) == "héllo wörld ✓"  # no broken UTF-8 pieces
    assert t.eos_token_id == 0


def test_messages_prompt_and_stream_concatenate_to_text(model_with_tokenizer):
    e = Engine(model_with_tokenizer, EngineConfig(device="cpu", page_size=8))
    rid = e.submit(messages=[{"role": "user", "content": "the cat"}], max_new_tokens=12)
    streamed = "".join(ev.text for ev in e.stream(rid))
    req = e.request(rid)
    assert streamed == req.text
    assert req.prompt_ids == e.tokenizer.encode("<|user|>\nthe cat<|assistant|>\n")


def test_stop_string_truncates(model_with_tokenizer):
    e = Engine(model_with_tokenizer, EngineConfig(device="cpu", page_size=8))
    rid = e.submit("the cat", max_new_tokens=40, ignore_eos=True)
    e.run_until_done()
    full = e.request(rid).text
    if len(full) < 4:
        pytest.skip("generated text too short to pick a stop string")
    stop = full[2:4]
    rid2 = e.submit("the cat", max_new_tokens=40, ignore_eos=True, stop=(stop,))
    streamed = "".join(ev.text for ev in e.stream(rid2))
    r2 = e.request(rid2)
    assert r2.finish_reason == "stop" and r2.text == full[: full.find(stop)] == streamed
