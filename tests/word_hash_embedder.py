"""A deterministic bag-of-words embedder for tests where ranking is not under test.

A test double standing in for the model: tenancy, concurrency and crash tests run thousands of
stores, and the real model (~400 texts/s on two cores) would make them minutes long without
testing anything more. Tests of ranking use the real model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np


class WordHashEmbedder:
    """384-d vectors: each word hashed to one dimension, counted, then normalised."""

    model_name = "word-hash-test"
    dimension = 384

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                vectors[row, int.from_bytes(digest, "little") % self.dimension] += 1.0
            norm = float(np.linalg.norm(vectors[row]))
            if norm > 0:
                vectors[row] /= norm
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]
