"""Splitting knowledge documents into chunks that fit the embedding model's window.

all-MiniLM-L6-v2 reads at most 256 word pieces and was trained on up to 128; English text runs
at about 1.3 word pieces per word, so chunks of at most ``MAX_WORDS`` (150) words stay inside the
window with room to spare, and nothing of a chunk is cut off before it is embedded. Chunks follow
paragraph and sentence boundaries where they can; a sentence longer than a chunk is cut by words.
Consecutive chunks share ``OVERLAP_WORDS`` words so that a fact split across a boundary is still
found whole in one of them.
"""

from __future__ import annotations

import re

MAX_WORDS = 150
OVERLAP_WORDS = 20

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def chunk_text(text: str, *, max_words: int = MAX_WORDS,
               overlap_words: int = OVERLAP_WORDS) -> list[str]:
    """``text`` as a list of chunks of at most ``max_words`` words (at least one chunk)."""
    sentences = [s.split() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]
    chunks: list[list[str]] = []
    current: list[str] = []
    for words in sentences:
        while len(words) > max_words:
            if current:
                chunks.append(current)
                current = []
            chunks.append(words[:max_words])
            words = words[max_words - overlap_words:]
        if current and len(current) + len(words) > max_words:
            chunks.append(current)
            current = current[-overlap_words:] if overlap_words else []
            if len(current) + len(words) > max_words:
                current = []
        current = current + words
    if current or not chunks:
        chunks.append(current)
    return [" ".join(words) for words in chunks if words] or [text.strip()]
