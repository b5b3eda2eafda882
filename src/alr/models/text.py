"""Text classifiers of Table 3: FastText, TextRNN, TextRCNN, CharCNN, Transformer.

Word models read ``B×L`` token ids from :mod:`alr.data.text` (0 = ``<pad>``, 1 = ``<unk>``, words from 2;
``vocab_size`` counts the words, so each embedding has ``vocab_size + 2`` rows); CharCNN reads ``B×L``
alphabet ids (0 = no character). Padding never changes an output: pooling and recurrences see only the
real tokens (masks, packed sequences), and a text's padding is always at its end.

Defaults are those of the widely used PyTorch text-classification code the paper's names and figures
point at (docs/deviations.md#table-3-text): embedding 300, dropout 0.5; each original paper's setting is
one override away (docs/table3-text.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from alr.data.text import ALPHABET, PAD, SPECIALS

# Multipliers for hashing n-grams of token ids into buckets (those of the widely used FastText code).
_HASH = (14_918_087, 18_408_749)


def _mask(x: Tensor) -> Tensor:
    """``B×L`` bool, True at real tokens."""
    return x != PAD


def _lengths(mask: Tensor) -> Tensor:
    """Real tokens per text, at least 1 (so an all-padding row still runs), on the CPU as packing wants."""
    return mask.sum(dim=1).clamp(min=1).cpu()


def _masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


class FastText(nn.Module):
    """Joulin et al. 2017 as the widely used PyTorch code builds it.

    Word, hashed-bigram and hashed-trigram embeddings are concatenated per position, averaged over the
    text's real tokens, then dropout, a hidden layer (ReLU) and the classifier. The n-gram of the ids
    ending at position ``i`` is hashed into ``buckets`` from the ids themselves (positions before the
    text count as ``<pad>``), so no n-gram vocabulary is stored. Joulin et al.'s own model is
    ``ngrams=2 hidden=0 embed_dim=10`` (no hidden layer, bigrams): one override away.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        embed_dim: int = 300,
        ngrams: int = 3,
        buckets: int = 250_499,
        hidden: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not 1 <= ngrams <= 3:
            raise ValueError(f"ngrams must be 1, 2 or 3, not {ngrams}")
        self.ngrams, self.buckets = ngrams, buckets
        self.words = nn.Embedding(vocab_size + len(SPECIALS), embed_dim, padding_idx=PAD)
        self.grams = nn.ModuleList(nn.Embedding(buckets, embed_dim) for _ in range(ngrams - 1))
        width = embed_dim * ngrams
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def _gram_ids(self, x: Tensor, n: int) -> Tensor:
        """Bucket of the n-gram ending at each position (``n`` = 2 or 3)."""
        x = x.long()
        prev1 = F.pad(x, (1, 0))[:, :-1]
        h = prev1 * _HASH[0] + x
        if n == 3:
            prev2 = F.pad(x, (2, 0))[:, :-2]
            h = prev2 * (_HASH[0] * _HASH[1]) + h
        return h % self.buckets

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.words(x)] + [emb(self._gram_ids(x, n)) for n, emb in enumerate(self.grams, start=2)]
        return self.head(_masked_mean(torch.cat(parts, dim=-1), _mask(x)))


class TextRNN(nn.Module):
    """A bidirectional LSTM over the word embeddings; the last layer's final states of both directions
    (at each text's own last token: packed sequences) feed dropout and the classifier."""

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        embed_dim: int = 300,
        hidden: int = 128,
        layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + len(SPECIALS), embed_dim, padding_idx=PAD)
        self.rnn = nn.LSTM(
            embed_dim, hidden, layers, batch_first=True, bidirectional=True, dropout=dropout if layers > 1 else 0.0
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(x), _lengths(_mask(x)), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(torch.cat([h[-2], h[-1]], dim=1))


class TextRCNN(nn.Module):
    """Lai et al. 2015: each word's embedding between its left and right recurrent contexts, a tanh
    projection, max-pooling over the text's real tokens, then the classifier.

    The contexts are a one-layer bidirectional LSTM's outputs (Lai et al. use a plain recurrence whose
    context excludes the word itself; the LSTM, as in the widely used code, includes it).
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        embed_dim: int = 300,
        hidden: int = 128,
        projection: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + len(SPECIALS), embed_dim, padding_idx=PAD)
        self.rnn = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.project = nn.Linear(embed_dim + 2 * hidden, projection)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(projection, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        mask = _mask(x)
        e = self.embed(x)
        packed = pack_padded_sequence(e, _lengths(mask), batch_first=True, enforce_sorted=False)
        context, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        y = torch.tanh(self.project(torch.cat([context, e], dim=-1)))
        mask = mask.clone()
        mask[:, 0] = True  # an all-padding row pools its first position rather than -inf
        return self.head(y.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1))


class CharCNN(nn.Module):
    """Zhang et al. 2015's small character-level ConvNet.

    One-hot characters (``alphabet_size`` channels; id 0 is the zero vector) over ``length`` positions;
    six convolutions of ``features`` (kernels 7, 7, 3, 3, 3, 3, ReLU; max-pool 3 after layers 1, 2 and
    6); two fully connected layers of ``fc`` with ReLU and dropout; the classifier. Shorter inputs are
    padded with zeros to ``length``, so a text's encoding does not depend on how its batch was padded.
    Weights start from N(0, 0.05²) as Zhang et al.'s small model; biases at zero.
    """

    def __init__(
        self,
        num_classes: int,
        alphabet_size: int = len(ALPHABET),
        length: int = 1014,
        features: int = 256,
        fc: int = 1024,
        dropout: float = 0.5,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.alphabet_size, self.length = alphabet_size, length
        convs, pooled, width, c_in = [], (0, 1, 5), length, alphabet_size
        for i, k in enumerate((7, 7, 3, 3, 3, 3)):
            convs += [nn.Conv1d(c_in, features, k), nn.ReLU(inplace=True)]
            width = width - k + 1
            if i in pooled:
                convs.append(nn.MaxPool1d(3))
                width //= 3
            c_in = features
        if width < 1:
            raise ValueError(f"length {length} is too short for six convolutions and three poolings")
        self.features = nn.Sequential(*convs, nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(features * width, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, init_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x.long()[:, : self.length], (0, max(0, self.length - x.shape[1])))
        onehot = F.one_hot(x, self.alphabet_size + 1)[..., 1:]  # id 0 (other, padding) -> zeros
        return self.head(self.features(onehot.transpose(1, 2).to(self.head[0].weight.dtype)))


class Transformer(nn.Module):
    """An encoder (Vaswani et al. 2017, post-norm) over word embeddings plus fixed sinusoidal positions,
    padding masked out of attention, mean-pooled over the real tokens, then the classifier."""

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        d_model: int = 300,
        heads: int = 5,
        layers: int = 2,
        ffn: int = 1024,
        dropout: float = 0.5,
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + len(SPECIALS), d_model, padding_idx=PAD)
        position = torch.arange(max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10_000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * freq)
        pe[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]
        self.register_buffer("positions", pe, persistent=False)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > len(self.positions):
            raise ValueError(f"texts of {x.shape[1]} tokens, longer than model.max_len={len(self.positions)}")
        mask = _mask(x)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # an all-padding row attends to its padding, not to nothing
        h = self.embed(x) + self.positions[: x.shape[1]]
        return self.head(_masked_mean(self.encoder(h, src_key_padding_mask=~mask), mask))
