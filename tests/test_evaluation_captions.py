"""Caption metrics as PointLLM computes them, against values worked out by hand."""

import numpy as np
import pytest
import torch

from cgmllm.evaluation import caption_metrics, load_wordnet


@pytest.fixture(scope="module")
def wordnet():
    return load_wordnet()


def test_known_scores(wordnet):
    # "a small wooden chair" vs "a wooden chair": 3 of 4 unigrams match, hypothesis longer (no brevity penalty);
    # bigrams: only "wooden chair" of 3 matches -> BLEU-2 = sqrt(3/4 * 1/3) = 1/2.
    # ROUGE-L: LCS 3, P = 3/4, R = 1 -> F = 2 * 3/4 / (7/4) = 6/7.
    # METEOR (alpha .9, beta 3, gamma .5): P = 3/4, R = 1, Fmean = PR / (.9 P + .1 R) = .75 / .775;
    # alignment a-a, wooden-wooden, chair-chair is 2 chunks over 3 matches -> penalty .5 (2/3)^3.
    result = caption_metrics(["a small wooden chair"], ["a wooden chair"], wordnet=wordnet)
    scores = result["scores"]
    assert result["count"] == 1 and set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2",
                                                    "rouge_l", "meteor"}
    assert scores["bleu_1"] == pytest.approx(75.0)
    assert scores["bleu_2"] == pytest.approx(50.0)
    assert scores["rouge_l"] == pytest.approx(100 * 6 / 7, abs=1e-4)
    assert scores["rouge_1"] == pytest.approx(100 * 6 / 7, abs=1e-4)
    assert scores["meteor"] == pytest.approx(100 * 0.75 / 0.775 * (1 - 0.5 * (2 / 3) ** 3), rel=1e-9)
    # BLEU-3 uses PointLLM's weights (.33, .33, .33): trigrams 0 of 2 -> smoothing method1 gives epsilon .1 / 2.
    expected_bleu3 = np.exp(0.33 * np.log(3 / 4) + 0.33 * np.log(1 / 3) + 0.33 * np.log(0.1 / 2))
    assert scores["bleu_3"] == pytest.approx(100 * expected_bleu3, rel=1e-9)


def test_meteor_uses_wordnet_synonyms(wordnet):
    # "car" and "auto" share the synset car.n.01: all three words match in one chunk, METEOR = 1 - .5 (1/3)^3.
    # Without the synonym it would be 2/3 * (1 - .5) = 1/3.
    scores = caption_metrics(["a red car"], ["a red auto"], wordnet=wordnet)["scores"]
    assert scores["meteor"] == pytest.approx(100 * (1 - 0.5 / 27), rel=1e-9)
    assert scores["bleu_1"] == pytest.approx(100 * 2 / 3)
    # nltk looks synonyms up after its stem stage, against the Porter stems of the leftover reference words:
    # "large" is left as "larg", so "big" does not match it although both are lemmas of large.a.01 (1/3, as nltk).
    scores = caption_metrics(["a big car"], ["a large car"], wordnet=wordnet)["scores"]
    assert scores["meteor"] == pytest.approx(100 / 3, rel=1e-9)


def test_empty_prediction_and_averaging(wordnet):
    result = caption_metrics(["", "a wooden chair"], ["a wooden chair", "a wooden chair"], wordnet=wordnet)
    empty, perfect = result["per_sample"]
    assert all(value == 0.0 for value in empty.values())  # scored as "##", as PointLLM does
    assert perfect["bleu_1"] == pytest.approx(100.0) and perfect["meteor"] > 90
    assert result["scores"]["bleu_1"] == pytest.approx(50.0)


def test_several_references(wordnet):
    single = caption_metrics(["a red car"], ["a red car"], wordnet=wordnet)["scores"]
    several = caption_metrics(["a red car"], [["a blue cube", "a red car"]], wordnet=wordnet)["scores"]
    assert several["rouge_l"] == pytest.approx(single["rouge_l"])  # the best reference
    assert several["bleu_1"] == pytest.approx(100.0)  # nltk's multi-reference BLEU clips by the best match


def test_bad_inputs(wordnet, tmp_path):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        caption_metrics(["a", "b"], ["a"], wordnet=wordnet)
    with pytest.raises(ValueError, match="reference 0 is empty"):
        caption_metrics(["a chair"], ["  "], wordnet=wordnet)
    with pytest.raises(ValueError, match="no predictions"):
        caption_metrics([], [], wordnet=wordnet)
    with pytest.raises(ValueError, match="missing"):
        load_wordnet(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        caption_metrics(["a chair"], ["a chair"], wordnet=wordnet, simcse_model=tmp_path / "none")


def test_wordnet_from_a_folder(wordnet, tmp_path):
    # The reader found by default is a WordNet 3.0 folder; the same files given explicitly give the same METEOR.
    folder = tmp_path / "wordnet"
    folder.mkdir()
    root = wordnet.root.path if hasattr(wordnet.root, "path") else str(wordnet.root)
    from pathlib import Path

    for name in ("lexnames", "data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb",
                 "index.adj", "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc"):
        (folder / name).write_bytes((Path(root) / name).read_bytes())
    explicit = load_wordnet(folder)
    assert explicit.get_version() == "3.0"
    assert sorted(s.name() for s in explicit.synsets("big")) == sorted(s.name() for s in wordnet.synsets("big"))


def tiny_simcse(folder):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "car", "blue", "cube", "wooden", "chair"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def test_simcse_similarity_from_a_local_folder(wordnet, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_simcse(tmp_path)
    result = caption_metrics(["a red car", "a blue cube"], ["a red car", "a wooden chair"], wordnet=wordnet,
                             simcse_model=folder)
    same, different = result["per_sample"]
    assert same["simcse_similarity"] == pytest.approx(100.0, abs=1e-4)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pooled = model(**tokenizer(["a wooden chair", "a blue cube"], padding=True, return_tensors="pt")).pooler_output
    expected = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0).item()
    assert different["simcse_similarity"] == pytest.approx(100 * expected, rel=1e-5)


def test_sbert_similarity_from_a_local_folder(wordnet, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from sentence_transformers import models  # a lazily imported submodule in sentence-transformers >= 6
    (tmp_path / "bert").mkdir()
    folder = tiny_simcse(tmp_path / "bert")
    encoder = models.Transformer(str(folder))
    pooling = models.Pooling(encoder.get_word_embedding_dimension())
    sentence_transformers.SentenceTransformer(modules=[encoder, pooling]).save(str(tmp_path / "sbert"))
    result = caption_metrics(["a red car", "a blue cube"], ["a red car", "a wooden chair"], wordnet=wordnet,
                             sbert_model=tmp_path / "sbert")
    same, different = result["per_sample"]
    assert same["sbert_similarity"] == pytest.approx(100.0, abs=1e-3)
    embeddings = sentence_transformers.SentenceTransformer(str(tmp_path / "sbert")).encode(
        ["a wooden chair", "a blue cube"], convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0).item()
    assert different["sbert_similarity"] == pytest.approx(100 * expected, rel=1e-4)
