"""svi_kernels.stability: MMR, MHLoss and SURT (Fu, So & Collier) on hand-made numbers and tiny random
HF BERTs (no download). Each test pins one part of a formula, so breaking it makes a test fail."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import svi_kernels.stability as st

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ MMR
def test_mmr_value_is_minus_weight_times_class_mean_distance():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 4.0], [3.0, 4.0]])  # means (0, 0) and (3, 4)
    y = torch.tensor([0, 0, 1, 1])
    assert st.max_margin_loss(x, y, weight=0.5, normalize="none").item() == pytest.approx(-2.5)
    assert st.max_margin_loss(x, y, weight=0.5, distance="squared", normalize="none").item() == pytest.approx(-12.5)
    # cosine on raw features: class means (0,0) has no direction -> use a case with one
    xc = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert st.max_margin_loss(xc, torch.tensor([0, 1]), distance="cosine", normalize="none").item() == pytest.approx(-1.0)


def test_mmr_averages_over_class_pairs_and_skips_absent_classes():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    # pairs: 5, 10, 5 -> mean 20/3 (a sum would be 20, a max 10)
    got = st.max_margin_loss(x, torch.tensor([0, 1, 2]), normalize="none").item()
    assert got == pytest.approx(-20.0 / 3.0)
    # labels 0 and 5 only (class ids need not be contiguous)
    assert st.max_margin_loss(x[:2], torch.tensor([0, 5]), normalize="none").item() == pytest.approx(-5.0)


def test_mmr_l2_normalisation_bounds_the_term_and_is_scale_free():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    y = torch.arange(16) % 2
    a = st.max_margin_loss(x, y)
    b = st.max_margin_loss(10 * x, y)
    torch.testing.assert_close(a, b)
    raw_a = st.max_margin_loss(x, y, normalize="none")
    raw_b = st.max_margin_loss(10 * x, y, normalize="none")
    torch.testing.assert_close(raw_b, 10 * raw_a)
    # opposite unit vectors: the largest possible euclidean margin on the sphere is 2
    x2 = torch.tensor([[1.0, 0.0], [-5.0, 0.0]])
    assert st.max_margin_loss(x2, torch.tensor([0, 1])).item() == pytest.approx(-2.0)


def test_mmr_gradient_pushes_classes_apart_and_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2] * 3 + [0])
    for dist in st.DISTANCES:
        for norm in st.NORMALISATIONS:
            assert torch.autograd.gradcheck(
                lambda t: st.max_margin_loss(t, y, weight=0.3, distance=dist, normalize=norm), (x,))
    # a small descent step on the features increases the margin (the term goes down)
    x0 = torch.randn(8, 4, generator=g)
    y0 = torch.arange(8) % 2
    xr = x0.clone().requires_grad_(True)
    term = st.max_margin_loss(xr, y0, normalize="none")
    term.backward()
    after = st.max_margin_loss(x0 - 0.1 * xr.grad, y0, normalize="none")
    assert after < term
    m0, m1 = x0[y0 == 0].mean(0), x0[y0 == 1].mean(0)
    # each class-1 row is pushed along (mu_1 - mu_0), away from class 0
    direction = -xr.grad[y0 == 1]
    assert torch.all(direction @ (m1 - m0) > 0)


def test_mmr_single_class_is_zero_with_a_graph_and_bad_arguments_raise():
    x = torch.randn(4, 3, requires_grad=True)
    t = st.max_margin_loss(x, torch.zeros(4, dtype=torch.long))
    assert t.item() == 0.0
    t.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="distance"):
        st.MaxMarginRegularizer(distance="manhattan")
    with pytest.raises(ValueError, match="normalize"):
        st.max_margin_loss(x, torch.zeros(4, dtype=torch.long), normalize="batch")
    with pytest.raises(ValueError, match="labels"):
        st.max_margin_loss(x, torch.zeros(3, dtype=torch.long))
    mod = st.MaxMarginRegularizer(weight=0.2, distance="squared", normalize="none")
    xx = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert mod(xx, torch.tensor([0, 1])).item() == pytest.approx(-0.4)


# --------------------------------------------------------------------------------------------- MHLoss
def test_mhloss_one_head_equals_plain_cross_entropy():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(6, 3)
    head = st.MultiHeadClassifier.like(lin, num_heads=1)
    with torch.no_grad():
        head.weight[0].copy_(lin.weight)
        head.bias[0].copy_(lin.bias)
    x, y = torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
    logits = head(x)
    torch.testing.assert_close(logits, lin(x))
    torch.testing.assert_close(head.loss(y), F.cross_entropy(lin(x), y))


def test_mhloss_is_the_mean_or_sum_of_per_head_losses_and_predicts_with_mean_logits():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 4, generator=g), torch.randint(0, 2, (9,), generator=g)
    head = st.MultiHeadClassifier(4, 2, num_heads=3, init_std=0.5, generator=g)
    per = [F.cross_entropy(F.linear(x, head.weight[h], head.bias[h]), y) for h in range(3)]
    logits = head(x)
    torch.testing.assert_close(logits, torch.stack([F.linear(x, head.weight[h], head.bias[h]) for h in range(3)]).mean(0))
    torch.testing.assert_close(head.loss(y), torch.stack(per).mean())
    # not the CE of the averaged logits (the heads differ)
    assert abs(head.loss(y).item() - F.cross_entropy(logits, y).item()) > 1e-4
    head.reduction = "sum"
    torch.testing.assert_close(head.loss(y), torch.stack(per).sum())
    # gradients: head h gets exactly the gradient of its own CE / H (mean reduction)
    head.reduction = "mean"
    head.zero_grad()
    head(x)
    head.loss(y).backward()
    for h in range(3):
        w = head.weight[h].detach().clone().requires_grad_(True)
        F.cross_entropy(F.linear(x, w, head.bias[h].detach()), y).backward()
        torch.testing.assert_close(head.weight.grad[h], w.grad / 3)


def test_mhloss_as_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    model.classifier = st.MultiHeadClassifier.like(model.classifier, num_heads=4)
    ids = torch.randint(5, 50, (5, 7))
    y = torch.tensor([0, 1, 2, 0, 1])
    out = model(input_ids=ids)
    assert out.logits.shape == (5, 3) and model.classifier.last_head_logits.shape == (4, 5, 3)
    model.classifier.loss(y).backward()
    gw = model.classifier.weight.grad
    assert gw.shape == (4, 3, 16) and torch.all(gw.flatten(1).norm(dim=1) > 0)
    assert model.bert.pooler.dense.weight.grad is not None
    with pytest.raises(ValueError, match="num_heads"):
        st.MultiHeadClassifier(4, 2, num_heads=0)
    with pytest.raises(ValueError, match="reduction"):
        st.MultiHeadClassifier(4, 2, reduction="max")


# ----------------------------------------------------------------------------------------------- SURT
WORDS = ["good", "bad", "film", "plot", "the", "a", "is", "was", "very", "boring", "great", "fun", "dull"]


def _tokenizer(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizer(str(vocab))


def _texts(n=40):
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g)) for _ in range(n)]


def _model(seed=0, cls=None):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return (cls or BertForSequenceClassification)(cfg)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_surt_moves_only_the_allowed_encoder_params_and_says_it_made_a_head(tmp_path):
    tok = _tokenizer(tmp_path)
    model = _model()
    before = _state(model)
    top = list(model.bert.encoder.layer[1].parameters())
    with pytest.warns(UserWarning, match="no masked-LM head"):
        rep = st.surt(model, tok, _texts(), steps=6, lr=1e-2, batch_size=8, parameters=top, seed=1)
    assert rep.mlm_head_initialised and rep.head_only_steps == 3 and len(rep.losses) == 9
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("bert.encoder.layer.1.") for k in changed)
    assert "bert.encoder.layer.1.attention.self.query.weight" in changed
    # all encoder params (default): embeddings move too (they are tied to the MLM decoder), head never
    model2 = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.surt(model2, tok, _texts(), steps=3, lr=1e-2, batch_size=8, seed=1, head_only_steps=0)
    after2 = _state(model2)
    changed2 = {k for k in before if not torch.equal(before[k], after2[k])}
    assert "bert.embeddings.word_embeddings.weight" in changed2
    assert "bert.encoder.layer.0.output.dense.weight" in changed2
    assert not any(k.startswith(("classifier.", "bert.pooler.")) for k in changed2)
    assert all(p.requires_grad for p in model2.parameters())  # flags restored


def test_surt_is_deterministic_per_seed_and_restores_the_global_rng(tmp_path):
    tok = _tokenizer(tmp_path)
    runs = []
    for i, seed in enumerate((4, 4, 5)):
        m = _model()
        torch.manual_seed(123 + i)  # a different global RNG state each time: only ``seed`` may matter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = st.surt(m, tok, _texts(), steps=4, lr=1e-2, batch_size=8, seed=seed)
        after = torch.rand(3)
        torch.manual_seed(123 + i)
        runs.append((_state(m), rep.losses, torch.equal(after, torch.rand(3))))
    (a, la, ra), (b, lb, rb), (c, lc, rc) = runs
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)
    assert la != lc and any(not torch.equal(a[k], c[k]) for k in a)
    assert ra and rb and rc  # the caller's global RNG state is restored


def test_surt_masked_rows_loss_equals_hf_mlm_loss(tmp_path):
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    tok = _tokenizer(tmp_path)
    mlm = _model(cls=BertForMaskedLM).eval()
    enc = tok(_texts(8), truncation=True, max_length=16)
    batch = DataCollatorForLanguageModeling(tok, mlm_probability=0.3, seed=0)([{"input_ids": r} for r in enc["input_ids"]])
    torch.testing.assert_close(st._mlm_loss(mlm, "bert", dict(batch)), mlm(**batch).loss)
    batch["labels"].fill_(-100)
    assert st._mlm_loss(mlm, "bert", dict(batch)) is None


def test_surt_reuses_a_checkpoints_mlm_head_and_learns(tmp_path):
    from transformers import BertForMaskedLM, BertForSequenceClassification

    tok = _tokenizer(tmp_path)
    ck = tmp_path / "ck"
    _model(cls=BertForMaskedLM).save_pretrained(str(ck))
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    model = BertForSequenceClassification.from_pretrained(str(ck))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fresh head" warning for a checkpoint that has one
        # two fixed sentences: a masked word is predictable from the rest
        texts = ["the film was very good fun", "a plot is very dull boring"] * 8
        rep = st.surt(model, tok, texts, steps=60, lr=3e-3, batch_size=8, checkpoint=str(ck))
    assert not rep.mlm_head_initialised and rep.head_only_steps == 0 and len(rep.losses) == 60
    first, last = sum(rep.losses[:10]) / 10, sum(rep.losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    with pytest.raises(ValueError, match="mlm_probability"):
        st.surt(model, tok, _texts(), mlm_probability=0.0)
    with pytest.raises(ValueError, match="base_model"):
        st.surt(model, tok, _texts(), parameters=list(model.classifier.parameters()))
