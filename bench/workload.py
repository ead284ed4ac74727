"""The synthetic memories and queries the speed benchmarks store and recall.

Embedding 100k texts with the model takes ~10 minutes here, so the bulk of a large corpus is made
the way ``bench.perf`` documents: ``BASE_TEXTS`` real sentences are embedded once with the model,
and memory ``i`` gets the vector of sentence ``i % BASE_TEXTS`` plus small gaussian noise
(re-normalised). The database and the scan thus see realistic, clustered MiniLM vectors. Each text
is its base sentence plus three words from a vocabulary of made-up words, so the keyword index has
the long tail of rare words that real memories have.

Everything is seeded: the same arguments give the same corpus and queries on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.core.memory.embeddings import Embedder

BASE_TEXTS = 2_000
VOCABULARY = 5_000
NOISE = 0.04

_SUBJECTS = ["My sister", "The landlord", "Our team lead", "My doctor", "The neighbour",
             "A colleague", "My brother", "The coach", "Grandma", "The new intern"]
_VERBS = ["recommended", "complained about", "asked me about", "is learning", "cancelled",
          "booked", "forgot about", "keeps talking about", "wants to try", "finished"]
_OBJECTS = ["the vegetarian lasagna recipe", "a cycling trip to the coast", "the Postgres upgrade",
            "piano lessons on Tuesdays", "the tomato seedlings", "flights to Lisbon",
            "the quarterly budget", "the dog's vet appointment", "a documentary about whales",
            "the leaking kitchen tap", "Spanish evening classes", "the half marathon in May",
            "a new standing desk", "the insurance renewal", "the book club novel",
            "a birthday dinner for Sam", "the broken bike chain", "the garden fence",
            "a pottery workshop", "the migration to Kubernetes"]
_WHEN = ["last week", "yesterday", "this morning", "on Friday", "before the holidays",
         "twice this month", "after work", "during lunch", "at the weekend", "in March"]
_SYLLABLES = ["ka", "lo", "mi", "ven", "tor", "sa", "qui", "dra", "pel", "nu", "rho", "zen",
              "bix", "ul", "fa", "gor", "me", "wun", "ti", "sko", "bre", "ald", "yo", "cus"]


def base_sentences(count: int = BASE_TEXTS) -> list[str]:
    """``count`` distinct plain-English sentences (subject, verb, object, time)."""
    sentences = []
    for i in range(count):
        subject, verb = _SUBJECTS[i % 10], _VERBS[(i // 10) % 10]
        thing, when = _OBJECTS[(i // 100) % 20], _WHEN[(i * 7 + i // 200) % 10]
        sentences.append(f"{subject} {verb} {thing} {when} (note {i}).")
    return sentences


def vocabulary(rng: np.random.Generator, count: int = VOCABULARY) -> list[str]:
    """``count`` distinct made-up words of three syllables (at most 24**3)."""
    words = ["".join(_SYLLABLES[j] for j in (i // 576, i // 24 % 24, i % 24))
             for i in range(len(_SYLLABLES) ** 3)]
    return [words[i] for i in rng.permutation(len(words))[:count]]


@dataclass
class Corpus:
    """Texts and vectors for memories ``0..size-1`` and the queries to recall them with."""

    texts: list[str]
    vectors: np.ndarray
    query_texts: list[str]
    query_vectors: np.ndarray


def make_corpus(base_vectors: np.ndarray, size: int, queries: int, seed: int = 7) -> Corpus:
    """``size`` memories and ``queries`` queries built on the model's ``base_vectors``.

    A query aims at a random memory: its vector is that memory's plus noise, its text two of the
    memory's words (one a rare one) and a sentence-like phrase, so both search sides have work.
    """
    rng = np.random.default_rng(seed)
    sentences = base_sentences(len(base_vectors))
    words = vocabulary(rng)
    extra = rng.integers(len(words), size=(size, 3))
    texts = [f"{sentences[i % len(sentences)]} {' '.join(words[j] for j in extra[i])}"
             for i in range(size)]
    vectors = _jitter(base_vectors[np.arange(size) % len(base_vectors)], rng, NOISE)
    targets = rng.integers(size, size=queries)
    topic = [_OBJECTS[(t % len(sentences)) // 100 % len(_OBJECTS)] for t in targets]
    query_texts = [f"what about {words[extra[t][0]]} and {topic[q]} ({q})"
                   for q, t in enumerate(targets)]
    query_vectors = _jitter(vectors[targets], rng, NOISE)
    return Corpus(texts, vectors, query_texts, query_vectors)


def _jitter(vectors: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    noisy = vectors + rng.normal(0, scale, size=vectors.shape).astype(np.float32)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


class BenchEmbedder:
    """An ``Embedder`` that hands out preset vectors where it has them, else asks the model.

    ``preset_documents(vectors)`` queues vectors for the next ``embed_documents`` calls (so bulk
    loads skip the model); ``preset_queries`` maps query texts to vectors (so recall can be timed
    without the query embedding). Anything else goes to the real model, as in production.
    """

    def __init__(self, model: Embedder) -> None:
        self.model = model
        self.model_name = model.model_name
        self.dimension = model.dimension
        self._documents: list[np.ndarray] = []
        self._queries: dict[str, np.ndarray] = {}

    def preset_documents(self, vectors: np.ndarray) -> None:
        self._documents.extend(vectors)

    def preset_queries(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        self._queries.update(zip(texts, vectors, strict=True))

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        if len(self._documents) >= len(texts) > 0:
            batch, self._documents = self._documents[: len(texts)], self._documents[len(texts):]
            return np.stack(batch)
        return self.model.embed_documents(texts)

    def clear_queries(self) -> None:
        self._queries.clear()

    def embed_query(self, text: str) -> np.ndarray:
        preset = self._queries.get(text)
        # Not ``model.embed_query``: its cache would answer for a text seen before.
        return preset if preset is not None else self.model.embed_documents([text])[0]
