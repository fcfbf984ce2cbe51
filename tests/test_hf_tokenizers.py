"""Tokenizer fidelity to transformers beyond tokenizer.json folders: GPT-2-style vocab.json +
merges.txt folders (ids from AutoTokenizer, tests/fixtures/make_bpe_folder.py) and chat templates
rendered in transformers' own Jinja environment (expected strings computed by transformers 5.24.0's
render_jinja_template on the same templates and messages)."""

import json
import re
from pathlib import Path

import pytest

from jaxinfer.tokenizer import TokenizerError, _render_chat, load_tokenizer

GPT2 = Path(__file__).parent / "fixtures" / "gpt2_bpe"
MESSAGES = [{"role": "system", "content": "sys <b>&"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}, {"role": "user", "content": "x"}]


def test_gpt2_style_folder_matches_auto_tokenizer():
    tok, golden = load_tokenizer(GPT2), json.loads((GPT2 / "golden.json").read_text())
    assert not (GPT2 / "tokenizer.json").exists()
    for text, ids, decoded in zip(golden["texts"], golden["ids"], golden["decoded"]):
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == decoded
    assert tok.eos_ids == (golden["eos_token_id"],) and tok.vocab_size == golden["vocab_size"]


def test_folder_without_any_tokenizer_files_names_both_forms(tmp_path):
    with pytest.raises(TokenizerError, match="vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name,template,want", [
    ("loop controls", "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                      "{% if loop.index > 3 %}{% break %}{% endif %}[{{ m['content'] }}]{% endfor %}", "[hi][hello]"),
    ("tojson keeps <>& and key order", "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': '<&>'} | tojson(indent=1) }}",
     '{"role": "system", "content": "sys <b>&"}|{\n "b": 1,\n "a": "<&>"\n}'),
    ("generation blocks", "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}A:{{ m['content'] }}"
                          "{% endgeneration %}{% else %}U:{{ m['content'] }}{% endif %}\n{% endfor %}",
     "U:sys <b>&U:hiA:helloU:byeU:x"),
    ("namespace and dict", "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                           "{{ ns.n }} {{ dict(x=1) | tojson }}", '5 {"x": 1}'),
    ("strftime_now", "{{ strftime_now('%Y') | length }}", "4"),
])
def test_chat_template_features_render_as_transformers(name, template, want):
    assert _render_chat(template, MESSAGES, True) == want, name


def test_raise_exception_reaches_the_user_as_one_message():
    with pytest.raises(TokenizerError, match=re.escape("chat template: no system role")):
        _render_chat("{{ raise_exception('no system role') }}", MESSAGES, True)


def test_namespace_refuses_underscore_attributes():
    with pytest.raises(TokenizerError, match="underscore-prefixed"):
        _render_chat("{% set ns = namespace(_x=1) %}", MESSAGES, True)
