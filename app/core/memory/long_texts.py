"""Texts longer than the model reads: split into windows it reads whole, vectors averaged.

A model such as all-MiniLM-L6-v2 reads 256 tokens (about 1,000 characters of English) and
silently drops the rest, while a memory may hold 10,000 characters and a query 4,000. So every
embedder that ``embeddings.build_embedder`` makes is a ``WholeTextEmbedder`` around the backend:

- a text that fits the model's window (by the model's own tokenizer, special tokens included) is
  handed to the backend unchanged, so its vector is exactly what it was before windows existed;
- a longer text is cut into windows of at most ``WINDOW_TOKENS`` tokens, of about equal size,
  ending at a paragraph, line or sentence end where one is near (else between words), each
  starting up to ``OVERLAP_TOKENS`` tokens before the previous one ended (at a sentence start when
  there is one), so that a sentence cut at a boundary is also read whole. The text's vector is the
  mean of its windows' vectors, normalised to length 1.

All the windows of a batch go to the backend in one call, so a ``store_many`` of long texts is
batched as before. Documents and queries are treated alike: a query vector is made by the same
``embed_documents``. The tokenizer is the model's own: the prepared folder's ``tokenizer.json``
on the onnx backend, the loaded model's tokenizer on torch; both are the same file for the
packaged model, so both backends cut a text into the same windows.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from app.core.memory.embeddings import Embedder, QueryVectorCache

#: The longest window, in tokens. The model's own limit is used when it is smaller.
WINDOW_TOKENS = 128
#: How far a window may reach back into the one before it.
OVERLAP_TOKENS = 16
_SENTENCE_ENDS = frozenset(".!?;:")


class TokenWindows:
    """Cuts texts into windows of at most ``max_tokens`` tokens of ``tokenizer`` (a
    ``tokenizers.Tokenizer``; its own truncation and padding are ignored), special tokens
    included: the model's input limit."""

    def __init__(self, tokenizer: Any, max_tokens: int, *, window_tokens: int = WINDOW_TOKENS,
                 overlap_tokens: int = OVERLAP_TOKENS) -> None:
        from tokenizers import Tokenizer

        # A copy: the caller's tokenizer may be shared (a loaded model's) and configured for it.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        #: Content tokens the model reads (its limit less [CLS] and [SEP] or the like).
        self.fits = max_tokens - self._tokenizer.num_special_tokens_to_add(False)
        if self.fits < 8:
            raise ValueError(f"a model that reads {max_tokens} tokens cannot be windowed")
        self.window = min(window_tokens, self.fits)
        self.overlap = max(0, min(overlap_tokens, self.window // 4))

    def count(self, text: str) -> int:
        """How many tokens ``text`` is, special tokens left out."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def split(self, texts: Sequence[str]) -> list[list[str]]:
        """For each text, its windows in order: ``[text]`` itself when it fits the model."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [[text] if len(encoding.ids) <= self.fits else self._windows(text, encoding)
                for text, encoding in zip(texts, encodings, strict=True)]

    def _windows(self, text: str, encoding: Any) -> list[str]:
        offsets: list[tuple[int, int]] = encoding.offsets
        words: list[int | None] = encoding.word_ids
        count = len(offsets)

        def strength(i: int) -> int:
            """How good a place to cut before token ``i`` is: 0 inside a word, 1 between words,
            2 after a sentence, 3 at a line or paragraph break."""
            if words[i] is not None and words[i] == words[i - 1]:
                return 0
            if "\n" in text[offsets[i - 1][1]:offsets[i][0]]:
                return 3
            return 2 if text[offsets[i - 1][0]:offsets[i - 1][1]] in _SENTENCE_ENDS else 1

        step = self.window - self.overlap
        pieces = max(1, math.ceil((count - self.overlap) / step))
        # Windows of about equal size: a short last window would weigh as much as a full one.
        size = min(self.window, math.ceil((count + (pieces - 1) * self.overlap) / pieces))
        spans: list[tuple[int, int]] = []
        start = 0
        while True:
            if count - start <= self.window:
                spans.append((start, count))
                break
            # Cut where the strongest boundary is in the window's second half (the latest of
            # equals); a text without any boundary there is cut at the window's end.
            candidates = range(start + size // 2 + 1, start + size + 1)
            end = max(candidates, key=lambda i: (strength(i), i))
            spans.append((start, end))
            start = self._next_start(start, end, strength)
        return [text[offsets[first][0]:offsets[last - 1][1]] for first, last in spans]

    def _next_start(self, start: int, end: int, strength: Callable[[int], int]) -> int:
        """Where the window after ``start:end`` begins: at ``end`` when that is a sentence
        boundary; else at the start of the sentence cut there, if it is within the overlap;
        else at the first word boundary within the overlap (else at ``end``)."""
        if strength(end) >= 2:
            return end
        back = range(max(start + 1, end - self.overlap), end)
        sentence = [i for i in back if strength(i) >= 2]
        if sentence:
            return sentence[-1]
        return next((i for i in back if strength(i) == 1), end)


class WholeTextEmbedder:
    """An ``Embedder`` that embeds whole texts with a backend that reads only the first
    ``max_tokens``: texts that fit go through unchanged, longer ones are averaged over windows.

    ``windows`` makes the ``TokenWindows`` of the backend's model (called once, on first use; it
    may load the model); ``None`` from it means the model has no usable tokenizer and texts go
    through unchanged. Everything else (``backend``, ``is_loaded``, ...) is the backend's.
    """

    def __init__(self, inner: Embedder, windows: Callable[[], TokenWindows | None], *,
                 query_cache_size: int = 1_024) -> None:
        self._inner = inner
        self._make_windows = windows
        self._windows: TokenWindows | None = None
        self._windows_made = False
        self._lock = threading.Lock()
        self._query_cache = QueryVectorCache(query_cache_size)

    @property
    def inner(self) -> Embedder:
        """The backend's embedder (which truncates long texts)."""
        return self._inner

    @property
    def model_name(self) -> str:
        return self._inner.model_name

    @property
    def dimension(self) -> int:
        return self._inner.dimension

    @property
    def backend(self) -> str | None:
        return getattr(self._inner, "backend", None)

    @property
    def is_loaded(self) -> bool:
        return bool(getattr(self._inner, "is_loaded", True))

    def token_windows(self) -> TokenWindows | None:
        """The windows of the backend's model (made on first call)."""
        if not self._windows_made:
            with self._lock:
                if not self._windows_made:
                    self._windows = self._make_windows()
                    self._windows_made = True
        return self._windows

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        windows = self.token_windows() if texts else None
        if windows is None:
            return self._inner.embed_documents(texts)
        split = windows.split(texts)
        if all(len(parts) == 1 for parts in split):
            return self._inner.embed_documents(texts)  # the common case: nothing to average
        vectors = self._inner.embed_documents([part for parts in split for part in parts])
        result = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        row = 0
        for index, parts in enumerate(split):
            if len(parts) == 1:
                result[index] = vectors[row]
            else:
                mean = vectors[row:row + len(parts)].mean(axis=0)
                result[index] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            row += len(parts)
        return result

    def embed_query(self, text: str) -> np.ndarray:
        return self._query_cache.vector_for(text, self.embed_documents)
