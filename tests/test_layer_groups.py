"""layer_groups on tiny random HF models (+ BART, an encoder-decoder) and custom modules: every trainable
parameter in exactly one group, the requested number of groups (fewer only when blocks run out), depth order."""
import pytest
import torch
from torch import nn

import svi_kernels as sk
from svi_kernels.layer_groups import find_stacks
from tiny_models import HF_NAMES, hf_model

# per model: (stack paths in order, number of blocks in each)
STACKS = {
    "bert": [("bert.encoder.layer", 2)], "electra": [("electra.encoder.layer", 2)],
    "deberta-v2": [("deberta.encoder.layer", 2)], "roberta": [("roberta.encoder.layer", 2)],
    "distilbert": [("distilbert.transformer.layer", 2)],
    "albert": [("albert.encoder.albert_layer_groups", 1)],  # one layer group, applied at every depth
    "t5-encoder": [("encoder.block", 2)], "gpt2": [("transformer.h", 2)], "llama": [("model.layers", 2)],
    "vit": [("vit.layers", 2)], "bart": [("model.encoder.layers", 2), ("model.decoder.layers", 3)],
}


def first_param_index(model):
    return {id(p): i for i, (_, p) in enumerate(model.named_parameters())}


def check_partition(model, groups):
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", HF_NAMES + ["bart"])
@pytest.mark.parametrize("n_groups", [3, 5, 10])
def test_hf_models(name, n_groups):
    model = hf_model(name, dtype=torch.float32)[0]
    assert [(n, len(s)) for n, s in find_stacks(model)] == STACKS[name]
    groups = sk.layer_groups(model, n_groups=n_groups)
    check_partition(model, groups)
    if name == "bart" and n_groups < 5:  # before, between, after + one run per stack: merged down
        assert len(groups) == n_groups
    else:
        n_blocks = sum(n for _, n in STACKS[name])
        n_fixed = len(groups) - sum(1 for g in groups if any(g["name"].startswith(p) or g["name"].startswith("layers")
                                                             for p, _ in STACKS[name]))
        assert len(groups) == min(n_groups, n_fixed + n_blocks)
    # depth order: the first parameter of each group comes later in registration order than the previous one's
    order = first_param_index(model)
    firsts = [order[id(g["params"][0])] for g in groups]
    assert firsts == sorted(firsts)
    emb = {id(p) for p in groups[0]["params"]}
    head = {id(p) for p in groups[-1]["params"]}
    first_name, last_name = next(iter(model.named_parameters()))[0], list(model.named_parameters())[-1][0]
    assert id(model.get_parameter(first_name)) in emb and id(model.get_parameter(last_name)) in head


def test_bart_groups_both_stacks():
    model = hf_model("bart", dtype=torch.float32)[0]
    names = [g["name"] for g in sk.layer_groups(model, n_groups=8)]
    assert names == ["model", "model.encoder.layers 0-0", "model.encoder.layers 1-1",
                     "between model.encoder.layers and model.decoder.layers", "model.decoder.layers 0-0",
                     "model.decoder.layers 1-1", "model.decoder.layers 2-2", "head"]


def tiny_bart(encoder_layers=1, decoder_layers=1):
    """BartForConditionalGeneration from a config (no download): embeddings tied to the LM head."""
    T = pytest.importorskip("transformers")
    cfg = T.BartConfig(vocab_size=50, d_model=16, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                       decoder_ffn_dim=24, max_position_embeddings=32)
    torch.manual_seed(0)
    return T.BartForConditionalGeneration(cfg)


@pytest.mark.parametrize("n_groups", [1, 2, 3, 4, 5, 6])
def test_bart_below_its_natural_count_merges_neighbours(n_groups):
    """1+1-layer BART: 5 groups of its own (embeddings, encoder, between, decoder, head); fewer merge
    neighbours (each parameter once, tied weights once, depth order, embeddings first, head last); more
    give the 5."""
    model = tiny_bart()
    assert model.lm_head.weight is model.model.shared.weight
    natural = sk.layer_groups(model, n_groups=5)
    assert [g["name"] for g in natural] == ["model", "model.encoder.layers 0-0",
                                            "between model.encoder.layers and model.decoder.layers",
                                            "model.decoder.layers 0-0", "head"]
    groups = sk.layer_groups(model, n_groups=n_groups)
    check_partition(model, groups)
    assert len(groups) == min(n_groups, 5)
    order = first_param_index(model)
    firsts = [order[id(g["params"][0])] for g in groups]
    assert firsts == sorted(firsts)
    # every group is a run of neighbouring natural groups, in order
    flat = [id(p) for g in natural for p in g["params"]]
    assert [id(p) for g in groups for p in g["params"]] == flat
    assert id(model.model.shared.weight) in {id(p) for p in groups[0]["params"]}
    assert {id(p) for p in natural[-1]["params"]} <= {id(p) for p in groups[-1]["params"]}
    opt = sk.LayerwiseAdamSLS(groups, warmup_steps=1)
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert len(opt.ls_state["step_sizes"]) == len(groups)


def test_tied_weights_once():
    model = hf_model("gpt2", dtype=torch.float32)[0]
    T = pytest.importorskip("transformers")
    lm = T.GPT2LMHeadModel(model.config)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    check_partition(lm, sk.layer_groups(lm, n_groups=4))


def test_frozen_parameters_left_out():
    model = hf_model("bert", dtype=torch.float32)[0]
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    groups = sk.layer_groups(model, n_groups=4)
    assert [g["name"] for g in groups] == ["layers 0-0", "layers 1-1", "head"]
    check_partition(model, groups)
    assert len(sk.layer_groups(model, n_groups=4, trainable_only=False)) == 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # nested: not a stack of its own


def test_custom_stack_and_sequential_root():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.blocks = nn.ModuleList([Block() for _ in range(5)])
            self.head = nn.Linear(4, 2)
    net = Net()
    groups = sk.layer_groups(net, n_groups=4)
    assert [g["name"] for g in groups] == ["emb", "layers 0-2", "layers 3-4", "head"]
    check_partition(net, groups)
    seq = nn.Sequential(*[Block() for _ in range(3)])  # the root itself is the stack: no fixed groups
    assert [g["name"] for g in sk.layer_groups(seq, n_groups=10)] == ["layers 0-0", "layers 1-1", "layers 2-2"]


def test_errors():
    with pytest.raises(ValueError, match="no repeated blocks"):
        sk.layer_groups(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="at least 1"):
        sk.layer_groups(hf_model("bart", dtype=torch.float32)[0], n_groups=0)
