"""
The nanochat tokenizer: byte-level BPE trained and run by the Rust extension `rustbpe`,
plus the special tokens of the chat format and `render_conversation` (ids + loss mask).

On-disk format (a directory, written by `save`, read by `from_directory`):
  tokenizer.json     {"format": "nanochat-tokenizer", "version": 1, "pattern": <split regex>,
                      "num_mergeable": N, "special_tokens": {name: id, ...},
                      "ranks_file": "ranks.tiktoken", "ranks_sha256": <hex>, "metadata": {...}}
  ranks.tiktoken     one line per mergeable token, in rank order: "<base64 bytes> <rank>"
                     (tiktoken's own format, so tiktoken.load.load_tiktoken_bpe reads it too)
  token_bytes.pt     int32 tensor [vocab_size]: bytes per token id, 0 for special tokens
                     (the bits-per-byte metric divides by it)
Mergeable tokens have ids 0..N-1 (rank = id); special tokens follow as N, N+1, ... in
SPECIAL_TOKENS order. No pickle anywhere except torch's weights-only tensor file.
"""
import base64
import hashlib
import json
import os
import re
import shutil
import tempfile

import rustbpe

from nanochat.common import fsync_dir, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, fed back (never trained on)
    "<think>", "</think>",  # reasoning traces inside assistant text
]

# GPT-4's split pattern, except numbers split in groups of 1-2 digits (not 1-3): fewer
# number tokens wasted on a small vocab. Same as rustbpe's default.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

FORMAT_NAME = "nanochat-tokenizer"
FORMAT_VERSION = 1
MANIFEST_FILE = "tokenizer.json"
RANKS_FILE = "ranks.tiktoken"
TOKEN_BYTES_FILE = "token_bytes.pt"

# the only specials recognised inside assistant text; everything else is plain text
_THINK_SPLIT = re.compile(r"(<think>|</think>)")


class TokenizerFormatError(ValueError):
    """A saved tokenizer directory is corrupt, incomplete or of an unknown format."""


class RustBPETokenizer:
    """Wraps a rustbpe.Tokenizer that holds the ranks and the special tokens."""

    def __init__(self, core: "rustbpe.Tokenizer"):
        self._core = core
        self._special = dict(core.get_special_tokens())
        self._num_mergeable = len(core.get_mergeable_ranks())
        expected = {name: self._num_mergeable + i for i, name in enumerate(SPECIAL_TOKENS)}
        assert self._special == expected, f"special tokens {self._special} != {expected}"
        self._id_to_special = {i: name for name, i in self._special.items()}

    # ---------------------------------------------------------------- construction
    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, pattern: str | None = None):
        """Train on an iterable of strings. vocab_size counts the special tokens."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_size:
            raise ValueError(f"vocab_size={vocab_size!r}: must be an int >= {min_size} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        core = rustbpe.Tokenizer()
        core.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS),
                                 pattern=pattern or SPLIT_PATTERN)
        return cls._with_specials(core)

    @classmethod
    def from_ranks(cls, mergeable_ranks, pattern: str = SPLIT_PATTERN):
        """From (bytes, rank) pairs, e.g. another tokenizer's get_mergeable_ranks()."""
        ranks = sorted(((bytes(b), int(r)) for b, r in mergeable_ranks), key=lambda br: br[1])
        return cls._with_specials(rustbpe.Tokenizer.from_ranks(ranks, pattern))

    @classmethod
    def _with_specials(cls, core):
        n = len(core.get_mergeable_ranks())  # not core.vocab_size: whether it counts specials varies
        core.set_special_tokens({name: n + i for i, name in enumerate(SPECIAL_TOKENS)})
        return cls(core)

    @classmethod
    def from_directory(cls, path: str):
        ranks, pattern = _load_directory(path)
        try:
            return cls.from_ranks(ranks, pattern)
        except ValueError as e:
            raise TokenizerFormatError(f"{os.path.join(path, MANIFEST_FILE)}: field 'pattern': {e}") from e

    # ---------------------------------------------------------------- saving
    def save(self, path: str, metadata: dict | None = None) -> None:
        """Write tokenizer.json, ranks.tiktoken and token_bytes.pt into directory `path`.

        Everything is first written and fsynced in a temp dir beside `path`. A new `path`
        is a single rename; into an existing directory each file is renamed over its old
        version with the manifest last, and the manifest carries the sha256 of the ranks
        file, so a crash mid-way is detected at load time instead of loading a mix.
        Other files in `path` are left alone.
        """
        import torch  # only needed for token_bytes.pt

        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        ranks = self.get_mergeable_ranks()
        ranks_text = "".join(f"{base64.b64encode(b).decode('ascii')} {r}\n" for b, r in ranks).encode("ascii")
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.get_pattern(),
            "num_mergeable": len(ranks),
            "special_tokens": self._special,
            "ranks_file": RANKS_FILE,
            "ranks_sha256": hashlib.sha256(ranks_text).hexdigest(),
            "metadata": metadata or {},
        }
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
        try:
            _write_synced(os.path.join(tmp, RANKS_FILE), ranks_text)
            lengths = [len(b) for b, _ in ranks] + [0] * len(SPECIAL_TOKENS)
            token_bytes_path = os.path.join(tmp, TOKEN_BYTES_FILE)
            torch.save(torch.tensor(lengths, dtype=torch.int32), token_bytes_path)
            _fsync_file(token_bytes_path)
            _write_synced(os.path.join(tmp, MANIFEST_FILE),
                          (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            if not os.path.exists(path):
                os.rename(tmp, path)
            else:
                if not os.path.isdir(path):
                    raise NotADirectoryError(f"{path}: exists and is not a directory")
                for name in (RANKS_FILE, TOKEN_BYTES_FILE, MANIFEST_FILE):  # manifest last
                    os.replace(os.path.join(tmp, name), os.path.join(path, name))
            fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------- encode / decode
    def _token_id(self, token) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"prepend/append: {token!r} is neither a special token name nor an id "
                         f"in [0, {self.get_vocab_size()})")

    def encode(self, text_or_list, prepend=None, append=None):
        """Ordinary encoding (special-token strings stay plain text). A list of strings is
        encoded in parallel. prepend/append: a special token name or a token id."""
        pre = None if prepend is None else self._token_id(prepend)
        post = None if append is None else self._token_id(append)
        if isinstance(text_or_list, str):
            rows = [self._core.encode(text_or_list)]
        elif isinstance(text_or_list, (list, tuple)):
            for i, t in enumerate(text_or_list):
                if not isinstance(t, str):
                    raise TypeError(f"encode: item {i} is {type(t).__name__}, expected str")
            rows = self._core.batch_encode(list(text_or_list))
        else:
            raise TypeError(f"encode: expected str or list of str, got {type(text_or_list).__name__}")
        if pre is not None:
            rows = [[pre] + ids for ids in rows]
        if post is not None:
            for ids in rows:
                ids.append(post)
        return rows[0] if isinstance(text_or_list, str) else rows

    def decode(self, ids) -> str:
        """Invalid UTF-8 (e.g. a cut multi-byte char) decodes to U+FFFD; unknown ids raise."""
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        return self._core.decode(list(ids))

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    # ---------------------------------------------------------------- vocabulary
    def get_vocab_size(self) -> int:
        return self._num_mergeable + len(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self._special["<|bos|>"]

    def encode_special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's bytes (a special token: its name in UTF-8)."""
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode("utf-8")
        return self._core.token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str:
        """The token's text (special tokens by name; partial UTF-8 bytes shown as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def get_pattern(self) -> str:
        return self._core.get_pattern()

    def get_mergeable_ranks(self) -> list[tuple[bytes, int]]:
        return sorted(self._core.get_mergeable_ranks(), key=lambda br: br[1])

    def to_tiktoken(self, name: str = "nanochat"):
        """A tiktoken.Encoding with the same ranks and specials (the reference encoder)."""
        import tiktoken
        return tiktoken.Encoding(name=name, pat_str=self.get_pattern(),
                                 mergeable_ranks=dict(self.get_mergeable_ranks()),
                                 special_tokens=dict(self._special))

    # ---------------------------------------------------------------- chat rendering
    def render_conversation(self, conversation, max_tokens: int = 2048):
        """Conversation -> (ids, mask). mask[i] == 1 where the model is trained to predict
        ids[i]: the assistant's own tokens and its <|assistant_end|>; never user text,
        <|assistant_start|> or python tool output. Truncated to max_tokens."""
        ids, mask = self._render(_normalize_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids for sampling the next assistant turn: the final assistant message
        (if any) is dropped and <|assistant_start|> appended."""
        messages = _normalize_messages(conversation)
        if messages and messages[-1][1].get("role") == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self._special["<|assistant_start|>"]]

    def _render(self, messages):
        sp = self._special
        ids, mask = [sp["<|bos|>"]], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        def add_assistant_text(text):
            for piece in _THINK_SPLIT.split(text):
                if piece in ("<think>", "</think>"):
                    add([sp[piece]], 1)
                elif piece:
                    add(self._core.encode(piece), 1)

        for turn, (index, msg) in enumerate(messages):
            role, content = msg["role"], msg["content"]
            expected = "user" if turn % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"conversation message {index}: role {role!r} out of order "
                                 f"(expected {expected!r}: user and assistant must alternate, starting with user)")
            if role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"conversation message {index}: user content must be a string, "
                                     f"got {type(content).__name__}")
                add([sp["<|user_start|>"]], 0)
                add(self._core.encode(content), 0)
                add([sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add_assistant_text(content)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    text = part.get("text") if isinstance(part, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"conversation message {index}, part {j}: needs a string 'text' field")
                    if kind == "text":
                        add_assistant_text(text)
                    elif kind == "python":
                        add([sp["<|python_start|>"]], 1)
                        add(self._core.encode(text), 1)
                        add([sp["<|python_end|>"]], 1)
                    elif kind == "python_output":  # produced by the tool, not the model
                        add([sp["<|output_start|>"]], 0)
                        add(self._core.encode(text), 0)
                        add([sp["<|output_end|>"]], 0)
                    else:
                        raise ValueError(f"conversation message {index}, part {j}: unknown type {kind!r} "
                                         f"(expected 'text', 'python' or 'python_output')")
            else:
                raise ValueError(f"conversation message {index}: assistant content must be a string or "
                                 f"a list of parts, got {type(content).__name__}")
            add([sp["<|assistant_end|>"]], 1)
        return ids, mask


def _normalize_messages(conversation):
    """-> [(original_index, message)] with a leading system message folded into the first
    user message. Accepts {"conversations": [...]} (MiniMind) or a bare list of messages."""
    if isinstance(conversation, dict):
        if "conversations" not in conversation:
            raise ValueError(f"conversation: missing 'conversations' field (keys: {sorted(conversation)})")
        messages = conversation["conversations"]
    else:
        messages = conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation: 'conversations' must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"conversation message {i}: must be an object with 'role' and 'content'")
        if msg["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"conversation message {i}: unknown role {msg['role']!r} "
                             f"(expected 'system', 'user' or 'assistant')")
        if msg["role"] == "system" and i != 0:
            raise ValueError(f"conversation message {i}: a system message may only come first")
        out.append((i, msg))
    if out[0][1]["role"] == "system":
        system = out[0][1]["content"]
        if not isinstance(system, str):
            raise ValueError("conversation message 0: system content must be a string")
        if len(out) < 2 or out[1][1]["role"] != "user" or not isinstance(out[1][1]["content"], str):
            raise ValueError("conversation message 1: a system message must be followed by a user message")
        out = [(1, {"role": "user", "content": system + "\n\n" + out[1][1]["content"]})] + out[2:]
    return out


# -------------------------------------------------------------------- file helpers
def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_synced(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _load_directory(path):
    """Read and validate a saved tokenizer -> (ranks, pattern). Errors name file and field."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{manifest_path}: missing (not a saved nanochat tokenizer directory; "
                                f"train one with `python -m scripts.tok_train`)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerFormatError(f"{manifest_path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise TokenizerFormatError(f"{manifest_path}: not UTF-8 ({e})") from None

    def field(name, kind):
        if not isinstance(m, dict) or name not in m:
            raise TokenizerFormatError(f"{manifest_path}: missing field {name!r}")
        if not isinstance(m[name], kind) or isinstance(m[name], bool):
            raise TokenizerFormatError(f"{manifest_path}: field {name!r} must be {kind.__name__}, "
                                       f"got {type(m[name]).__name__}")
        return m[name]

    if field("format", str) != FORMAT_NAME:
        raise TokenizerFormatError(f"{manifest_path}: field 'format' is {m['format']!r}, expected {FORMAT_NAME!r}")
    if field("version", int) != FORMAT_VERSION:
        raise TokenizerFormatError(f"{manifest_path}: field 'version' is {m['version']}, this code reads "
                                   f"version {FORMAT_VERSION}")
    pattern = field("pattern", str)
    n = field("num_mergeable", int)
    specials = field("special_tokens", dict)
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise TokenizerFormatError(f"{manifest_path}: field 'special_tokens' is {specials}, expected {expected}")
    ranks_name = field("ranks_file", str)
    if os.path.basename(ranks_name) != ranks_name or ranks_name in ("", ".", ".."):
        raise TokenizerFormatError(f"{manifest_path}: field 'ranks_file' must be a plain file name, got {ranks_name!r}")
    ranks_sha = field("ranks_sha256", str)

    ranks_path = os.path.join(path, ranks_name)
    if not os.path.isfile(ranks_path):
        raise FileNotFoundError(f"{ranks_path}: missing (named by field 'ranks_file' of {manifest_path})")
    with open(ranks_path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != ranks_sha:
        raise TokenizerFormatError(f"{ranks_path}: sha256 does not match field 'ranks_sha256' of "
                                   f"{manifest_path} (file corrupt, truncated or modified)")
    ranks, seen = [], set()
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        try:
            tok_b64, rank_s = line.split(b" ")
            tok, rank = base64.b64decode(tok_b64, validate=True), int(rank_s)
        except ValueError:
            raise TokenizerFormatError(f"{ranks_path}: line {lineno}: expected '<base64 token> <rank>'") from None
        if rank != len(ranks):
            raise TokenizerFormatError(f"{ranks_path}: line {lineno}: rank {rank}, expected {len(ranks)} "
                                       f"(ranks must be 0, 1, 2, ... in order)")
        if tok in seen or not tok:
            raise TokenizerFormatError(f"{ranks_path}: line {lineno}: empty or duplicate token {tok!r}")
        seen.add(tok)
        ranks.append((tok, rank))
    if len(ranks) != n:
        raise TokenizerFormatError(f"{ranks_path}: {len(ranks)} tokens, field 'num_mergeable' says {n}")
    if n < 256 or any(len(ranks[i][0]) != 1 or ranks[i][0] == b"" for i in range(256)) \
            or len({ranks[i][0] for i in range(256)}) != 256:
        raise TokenizerFormatError(f"{ranks_path}: the first 256 ranks must be the 256 single bytes")
    return ranks, pattern


# -------------------------------------------------------------------- convenience
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the split pattern, every mergeable token's bytes in rank order and the special
    tokens: two tokenizers with the same fingerprint map text to the same ids. Checkpoints record
    it so a model is never paired with another tokenizer of the same vocab size."""
    h = hashlib.sha256()
    h.update(tokenizer.get_pattern().encode("utf-8") + b"\0")
    for token, _ in tokenizer.get_mergeable_ranks():
        h.update(len(token).to_bytes(4, "little") + token)
    h.update("\0".join(tokenizer.get_special_tokens()).encode("utf-8"))
    return h.hexdigest()


def get_tokenizer() -> RustBPETokenizer:
    """The tokenizer trained by scripts.tok_train, from <base>/tokenizer/."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """int32 tensor [vocab_size]: how many bytes each token id stands for (0 for specials)."""
    import torch
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; train the tokenizer first: python -m scripts.tok_train")
    return torch.load(path, map_location=device, weights_only=True)
