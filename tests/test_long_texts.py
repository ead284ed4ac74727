"""Whole-text embedding (``long_texts.py``): texts that fit the model embed exactly as the backend
embeds them, longer ones are the normalised mean of windows the model reads whole, cut the same
way on both backends and in the async API's embedding process. Real model throughout.

The ranking consequence (a fact at the end of a long memory is found) is in the contract suite:
``test_recall_finds_a_fact_at_the_end_of_a_long_memory``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from app.core.memory.embed_process import ProcessEmbedder
from app.core.memory.embeddings import (
    DEFAULT_MODEL,
    SentenceTransformerEmbedder,
    build_embedder,
    get_default_embedder,
    resolve_backend,
)
from app.core.memory.long_texts import TokenWindows, WholeTextEmbedder
from app.core.memory.onnx_export import prepare
from tests.long_memory import EARLY_QUERY, LATE_QUERY, LONG_MEMORY, UNRELATED

#: all-MiniLM-L6-v2 reads 256 tokens, [CLS] and [SEP] included: 254 of the text.
FITS = 254


@pytest.fixture(scope="module")
def whole() -> WholeTextEmbedder:
    prepare(DEFAULT_MODEL)  # the onnx backend's folder (kept if intact: ~0.5 s)
    # fp32: a text's int8 vector moves slightly with the batch it is in (activations are
    # quantized per call), and these tests compare a text's vector across batches exactly.
    embedder = get_default_embedder(precision="fp32")
    assert isinstance(embedder, WholeTextEmbedder)
    return embedder


def _tokens(embedder: WholeTextEmbedder, text: str) -> int:
    windows = embedder.token_windows()
    assert windows is not None
    return windows.count(text)


def test_texts_that_fit_the_model_embed_exactly_as_before(whole: WholeTextEmbedder):
    at_limit = " ".join(["word"] * FITS)
    assert _tokens(whole, at_limit) == FITS
    texts = [*UNRELATED, at_limit, "Zürich, São Paulo and 東京 🚲", "ok"]
    got = whole.embed_documents(texts)
    assert np.array_equal(got, whole.inner.embed_documents(texts))  # bit for bit
    assert np.array_equal(whole.embed_query(UNRELATED[0]),
                          whole.inner.embed_documents([UNRELATED[0]])[0])
    assert whole.embed_documents([]).shape == (0, 384)


def test_one_token_more_than_the_model_reads_is_windowed(whole: WholeTextEmbedder):
    windows = whole.token_windows()
    assert windows is not None
    assert windows.split([" ".join(["word"] * FITS)]) == [[" ".join(["word"] * FITS)]]
    parts = windows.split([" ".join(["word"] * (FITS + 1))])[0]
    assert len(parts) == 3  # windows of at most 128 tokens, overlapping a little
    assert sum(len(part.split()) for part in parts) > FITS + 1


def test_windows_end_at_paragraphs_and_cover_the_whole_text(whole: WholeTextEmbedder):
    windows = whole.token_windows()
    assert windows is not None
    parts = windows.split([LONG_MEMORY])[0]
    assert len(parts) > 2
    for part in parts:
        assert 0 < _tokens(whole, part) <= windows.window <= FITS
        assert part in LONG_MEMORY and part.endswith(".")  # whole paragraphs here
    assert parts[0].startswith(LONG_MEMORY[:40]) and parts[-1].endswith(LONG_MEMORY[-40:])
    assert set(LONG_MEMORY.split()) == {word for part in parts for word in part.split()}


def test_text_without_boundaries_is_cut_between_words_with_overlap(whole: WholeTextEmbedder):
    windows = whole.token_windows()
    assert windows is not None
    words = [f"w{i}" for i in range(600)]  # one run-on "sentence" of 1,200 tokens
    parts = windows.split([" ".join(words)])[0]
    seen: list[str] = []
    for part in parts:
        assert _tokens(whole, part) <= windows.window
        part_words = part.split()
        assert part_words[0] in words  # never a piece of a word
        overlap = len(seen) - words.index(part_words[0]) if seen else 0
        assert 0 <= overlap <= windows.overlap
        seen = words[:words.index(part_words[-1]) + 1]
    assert seen == words
    sizes = [_tokens(whole, part) for part in parts]
    assert min(sizes) >= 0.9 * max(sizes)  # about equal: a short tail would weigh as much


def test_a_long_text_is_the_normalised_mean_of_its_windows(whole: WholeTextEmbedder):
    windows = whole.token_windows()
    assert windows is not None
    vector = whole.embed_documents([LONG_MEMORY])[0]
    mean = whole.inner.embed_documents(windows.split([LONG_MEMORY])[0]).mean(axis=0)
    assert np.allclose(vector, mean / np.linalg.norm(mean), atol=1e-6)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    # The late fact is now in the vector; the first paragraph still is.
    late, early = whole.inner.embed_documents([LATE_QUERY, EARLY_QUERY])
    truncated = whole.inner.embed_documents([LONG_MEMORY])[0]
    assert float(vector @ late) > float(truncated @ late) + 0.1
    assert float(vector @ early) > 0.25


def test_a_long_query_is_averaged_like_a_document(whole: WholeTextEmbedder):
    query = LONG_MEMORY[:3_900]  # under the 4,000-character query limit, ~800 tokens
    vector = whole.embed_query(query)
    assert np.array_equal(vector, whole.embed_documents([query])[0])
    assert float(vector @ whole.inner.embed_documents([query])[0]) < 0.99  # not truncated
    assert whole.embed_query(query) is vector  # cached


class _CountingEmbedder:
    """The real backend, counting its calls (to see how the windows are batched)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.model_name = inner.model_name

    @property
    def dimension(self) -> int:
        return int(self.inner.dimension)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.asarray(self.inner.embed_documents(texts))

    def embed_query(self, text: str) -> np.ndarray:
        raise AssertionError("not used")


def test_a_batch_of_long_and_short_texts_is_one_call_to_the_backend(whole: WholeTextEmbedder):
    counting = _CountingEmbedder(whole.inner)
    embedder = WholeTextEmbedder(counting, whole.token_windows)
    texts = [LONG_MEMORY, *UNRELATED[:3], LONG_MEMORY[:1_500], UNRELATED[3]]
    vectors = embedder.embed_documents(texts)
    assert len(counting.calls) == 1 and counting.calls[0] > len(texts)
    assert np.allclose(vectors, np.vstack([whole.embed_documents([text]) for text in texts]),
                       atol=1e-5)  # row i is text i's vector, whatever else is in the batch


def test_both_backends_cut_texts_the_same_way_and_agree(whole: WholeTextEmbedder):
    torch = build_embedder(DEFAULT_MODEL, "torch", query_cache_size=0)
    assert isinstance(torch, WholeTextEmbedder)
    assert isinstance(torch.inner, SentenceTransformerEmbedder)
    onnx = build_embedder(DEFAULT_MODEL, "onnx", query_cache_size=0)
    texts = [LONG_MEMORY, " ".join(f"w{i}" for i in range(600)), "Zürich 東京 " * 200]
    torch_windows, onnx_windows = torch.token_windows(), onnx.token_windows()
    assert isinstance(torch_windows, TokenWindows) and isinstance(onnx_windows, TokenWindows)
    assert torch_windows.split(texts) == onnx_windows.split(texts)
    cosines = np.sum(torch.embed_documents(texts) * onnx.embed_documents(texts), axis=1)
    assert float(cosines.min()) >= 0.9999


def test_the_async_apis_embedding_process_embeds_whole_texts(whole: WholeTextEmbedder):
    backend = resolve_backend(DEFAULT_MODEL, "auto", "fp32")
    process = ProcessEmbedder(DEFAULT_MODEL, backend=backend)
    try:
        got = process.embed_documents([LONG_MEMORY, UNRELATED[0]])
    finally:
        process.close()
    assert np.allclose(got, whole.embed_documents([LONG_MEMORY, UNRELATED[0]]), atol=1e-5)
