"""Tokenizers (host only, no jax): Hugging Face `tokenizer.json` folders, and bytes for random models.

`HFTokenizer` reproduces `transformers.AutoTokenizer` on the same folder: the post-processor in
tokenizer.json adds BOS/EOS, `add_bos_token` / `add_eos_token` in tokenizer_config.json override it
when they say otherwise, and the chat template (tokenizer_config.json or chat_template.jinja) is
rendered with the same Jinja settings transformers uses.
"""

from __future__ import annotations

import json
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer folder we cannot use; the message names the file."""


def _render_chat(template: str, messages: list[dict], add_generation_prompt: bool, **special) -> str:
    """Renders like transformers: sandboxed Jinja, trim_blocks + lstrip_blocks, raise_exception()."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then BOS, EOS, PAD. For random-weight models: no files needed."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259
    chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, f"<{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return _render_chat(self.chat_template, messages, add_generation_prompt)


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json [+ tokenizer_config.json, chat_template.jinja])."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"'{path}' is missing: jaxinfer reads fast-tokenizer files only "
                                 "(save with transformers' save_pretrained to produce one)")
        self.tok = Tokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        jinja = folder / "chat_template.jinja"
        self.chat_template = jinja.read_text() if jinja.is_file() else self.config.get("chat_template")
        self.bos_token = self._token_text("bos_token")
        self.eos_token = self._token_text("eos_token")
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.pad_id = self.tok.token_to_id(self._token_text("pad_token") or "") or self.eos_id
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # What the post-processor adds on its own; tokenizer_config.json may say otherwise.
        empty = self.tok.encode("", add_special_tokens=True).ids
        self._post_bos = self.bos_id is not None and empty[:1] == [self.bos_id]
        self._post_eos = self.eos_id is not None and empty[-1:] == [self.eos_id]
        self._add_bos = self.config.get("add_bos_token", self._post_bos) and self.bos_id is not None
        self._add_eos = self.config.get("add_eos_token", self._post_eos) and self.eos_id is not None

    def _token_text(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return () if self.eos_id is None else (self.eos_id,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens:
            return ids
        if self._post_bos and not self._add_bos:
            ids = ids[1:]
        elif self._add_bos and not self._post_bos:
            ids = [self.bos_id] + ids
        if self._post_eos and not self._add_eos:
            ids = ids[:-1]
        elif self._add_eos and not self._post_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return _render_chat(self.chat_template, messages, add_generation_prompt,
                            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def load_tokenizer(spec: str | Path | None):
    """'byte' (or None) -> ByteTokenizer; a folder -> HFTokenizer."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    folder = Path(spec)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder '{folder}' does not exist (or use tokenizer=byte)")
    return HFTokenizer(folder)
