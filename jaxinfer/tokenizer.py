"""Tokenizers (host only, no jax): Hugging Face `tokenizer.json` folders, and bytes for random models.

`HFTokenizer` reproduces `transformers.AutoTokenizer` on the same folder: the post-processor in
tokenizer.json adds BOS/EOS, `add_bos_token` / `add_eos_token` in tokenizer_config.json override it
when they say otherwise, and the chat template (tokenizer_config.json or chat_template.jinja) is
rendered with the same Jinja settings transformers uses.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer folder we cannot use; the message names the file."""


@functools.cache
def _chat_env():
    """The Jinja environment of transformers' `_compile_jinja_template` (transformers 5.x): sandboxed,
    trim_blocks + lstrip_blocks, loop controls ({% break %}, {% continue %}), `{% generation %}`
    blocks (rendered as their body: we track no assistant mask), `tojson` without HTML escaping
    or key sorting, `raise_exception`, `strftime_now`, and the guarded `dict` and `namespace`."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes "
                                                      f"on a namespace, got {name!r}")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "dict": Dict(), "namespace": Namespace,
                    "strftime_now": lambda fmt: datetime.datetime.now().strftime(fmt)}
    return env


def _render_chat(template: str, messages: list[dict], add_generation_prompt: bool, **special) -> str:
    """Renders like transformers' apply_chat_template(tokenize=False); a template's own
    raise_exception() or a syntax error comes back as TokenizerError with its message."""
    from jinja2.exceptions import TemplateError

    try:
        return _chat_env().from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **special)
    except TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None


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

        folder = self.folder = Path(folder)
        path = folder / "tokenizer.json"
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if path.is_file():
            self.tok = Tokenizer.from_file(str(path))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            self.tok = self._byte_level_bpe(folder)
        else:
            raise TokenizerError(f"'{path}' is missing, and so is a GPT-2-style vocab.json + merges.txt pair: "
                                 "save the tokenizer with transformers' save_pretrained to produce one")
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

    def _byte_level_bpe(self, folder: Path):
        """GPT-2's byte-level BPE from vocab.json + merges.txt, as transformers' GPT2Converter builds
        it, with the tokenizer_config.json special tokens matched whole."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                             continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(self.config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = [v["content"] for v in self.config.get("added_tokens_decoder", {}).values() if v.get("special")]
        specials += [t for t in map(self._token_text, ("bos_token", "eos_token", "unk_token", "pad_token")) if t]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
        return tok

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
            raise TokenizerError(f"the tokenizer in '{self.folder}' has no chat template (tokenizer_config.json or "
                                 "chat_template.jinja): pass plain prompts (no --chat), or use a chat model")
        return _render_chat(self.chat_template, messages, add_generation_prompt,
                            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same text to the same ids (the same vocabulary and merges)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, ByteTokenizer):
        return True
    probe = "The quick brown fox, 42 times! Über naïve café."
    return a.tok.to_str() == b.tok.to_str() or (a.tok.get_vocab(with_added_tokens=True) == b.tok.get_vocab(
        with_added_tokens=True) and a.encode(probe) == b.encode(probe))


def load_tokenizer(spec: str | Path | None):
    """'byte' (or None) -> ByteTokenizer; a folder (or `package:reference/target`) -> HFTokenizer."""
    from jaxinfer.config import resolve_path

    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    folder = resolve_path(spec)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder '{folder}' does not exist (or use tokenizer=byte)")
    return HFTokenizer(folder)
