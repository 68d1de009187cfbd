import pytest

from tests.corpus_fixture import build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny English-like corpus: jsonl, tokenizer, and preprocessed train/valid prefixes."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))
