"""Tiny random models for the SVI and layer_groups tests: HF configs (no downloads) and custom modules.

``hf_model(name)`` returns (model in eval mode, inputs dict, loss function of (model, inputs)).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

HF_NAMES = ["bert", "electra", "deberta-v2", "roberta", "distilbert", "albert", "t5-encoder", "gpt2", "llama",
            "vit"]
VOCAB = 40


def _configs(T):
    common = dict(hidden_size=16, num_attention_heads=2, intermediate_size=24)
    return {
        "bert": (T.BertConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=32, **common),
                 T.BertForSequenceClassification),
        "electra": (T.ElectraConfig(vocab_size=VOCAB, embedding_size=8, num_hidden_layers=2, max_position_embeddings=32,
                                    **common), T.ElectraForSequenceClassification),
        "deberta-v2": (T.DebertaV2Config(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=32, **common),
                       T.DebertaV2ForSequenceClassification),
        "roberta": (T.RobertaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=40, **common),
                    T.RobertaForSequenceClassification),
        "distilbert": (T.DistilBertConfig(vocab_size=VOCAB, n_layers=2, dim=16, n_heads=2, hidden_dim=24,
                                          max_position_embeddings=32), T.DistilBertForSequenceClassification),
        "albert": (T.AlbertConfig(vocab_size=VOCAB, embedding_size=8, num_hidden_layers=3, max_position_embeddings=32,
                                  **common), T.AlbertForSequenceClassification),
        "t5-encoder": (T.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2),
                       T.T5EncoderModel),
        "gpt2": (T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0,
                              bos_token_id=1, eos_token_id=1), T.GPT2ForSequenceClassification),
        "llama": (T.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=32,
                                pad_token_id=0, bos_token_id=1, eos_token_id=1, **common),
                  T.LlamaForSequenceClassification),
        "vit": (T.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_hidden_layers=2, **common),
                T.ViTForImageClassification),
        "bart": (T.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                              max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                 T.BartForSequenceClassification),
    }


def hf_model(name, dtype=torch.float64, seed=0):
    T = pytest.importorskip("transformers")
    cfg, cls = _configs(T)[name]
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    if name == "vit":
        inputs = {"pixel_values": torch.randn(3, 3, 8, 8, generator=g, dtype=dtype)}
    else:
        inputs = {"input_ids": torch.randint(3, VOCAB, (3, 7), generator=g)}
        if name == "bart":
            inputs["input_ids"][:, -1] = 2  # BART classifies at the eos token
    if name == "t5-encoder":
        proj = torch.randn(16, generator=g, dtype=dtype)

        def loss(m, inp):
            return (m(**inp).last_hidden_state * proj).sum()
    else:
        labels = torch.tensor([0, 1, 1])

        def loss(m, inp):
            return m(**inp, labels=labels).loss
    return model, inputs, loss


class ModuleActs(nn.Module):
    """Module activations in a hand-written forward (not an nn.Sequential), a gated MLP, a shared Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.act_in = nn.ReLU()
        self.gate, self.up, self.down = nn.Linear(8, 12), nn.Linear(8, 12, bias=False), nn.Linear(12, 8)
        self.gate_act = nn.SiLU()
        self.shared = nn.Linear(8, 8)
        self.shared_act = nn.Hardswish()  # no fused kernel: the tapped path
        self.p_lin, self.prelu = nn.Linear(8, 8), nn.PReLU()  # an activation with a parameter: hooked, kept
        self.norm_lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.norm_act = nn.GELU()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act_in(self.inp(x))
        h = h + self.down(self.gate_act(self.gate(h)) * self.up(h))
        for _ in range(2):  # one Linear used twice: its field is summed over the uses
            h = h + self.shared_act(self.shared(h))
        h = self.prelu(self.p_lin(h))
        h = self.norm_act(self.norm(self.norm_lin(h)))  # a norm in between: not a pair
        return self.out(h)


class FunctionActs(nn.Module):
    """Functional activations, an activation module also applied to a non-Linear input, a Linear whose
    output also feeds a residual (not a pair), and an activation module created in forward."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.l4, self.l5 = (nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                       nn.Linear(8, 8), nn.Linear(8, 8))
        self.act = nn.Tanh()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.gelu(self.l1(x))
        h = self.l2(h).sigmoid() + self.act(h)  # method call; self.act also takes h (not a Linear output)
        h = self.act(self.l3(h))
        z = self.l4(h)
        h = F.relu(z) + z  # z also feeds the sum: l4 keeps its ordinary gradient
        h = nn.ELU()(self.l5(h))  # a module made in forward: seen as the function it calls
        return self.out(h)


# custom models: (factory, expected pairs {layer: activation: a submodule name or a function}, not paired)
CUSTOM = {
    "module-acts": (ModuleActs, {"inp": "act_in", "gate": "gate_act", "shared": "shared_act", "p_lin": "prelu"},
                    ["up", "down", "norm_lin", "out"]),
    "function-acts": (FunctionActs, {"l1": F.gelu, "l2": torch.Tensor.sigmoid, "l3": "act", "l5": F.elu},
                      ["l4", "out"]),
}


def custom_model(name, dtype=torch.float64, seed=0):
    factory, expected, _ = CUSTOM[name]
    torch.manual_seed(seed)
    model = factory().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 3, 5, generator=g, dtype=dtype)
    y = torch.randn(4, 3, 3, generator=g, dtype=dtype)

    def loss(m, inp):
        return ((m(**inp) - y) ** 2).mean()
    return model, {"x": x}, loss
