"""Tiny random-init models for tests: Hugging Face configs and small local vision nets."""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


def _hf(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **common)
        return tf.LlamaForCausalLM(cfg)
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=1, eos_token_id=2)
        return tf.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common)
        return tf.BertModel(cfg)
    if name == "opt":
        cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
        return tf.OPTForCausalLM(cfg)
    if name == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **common)
        return tf.Qwen2ForCausalLM(cfg)
    if name == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
        return tf.Phi3ForCausalLM(cfg)
    if name == "falcon":  # fused query_key_value, multi-query attention, parallel attention and MLP
        cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
                              alibi=False, bos_token_id=1, eos_token_id=2)
        return tf.FalconForCausalLM(cfg)
    raise KeyError(name)


def small_llama() -> nn.Module:
    """A 4-layer Llama with grouped-query attention (random weights, ~4M parameters)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(config).eval()


class BasicBlock(nn.Module):
    """ResNet residual block with BatchNorm."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class TinyCNN(nn.Module):
    """Residual block, depthwise + grouped convs, squeeze-excitation, dense concat, classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = BasicBlock(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.se = SqueezeExcite(16)
        self.dense = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.se(self.grouped(torch.relu(self.depthwise(x))))
        x = torch.cat([x, self.dense(x)], dim=1)  # DenseNet-style concatenation
        return self.head(x.mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm attention block, classification token."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


class InvertedResidual(nn.Module):
    """MobileNetV2 / EfficientNet block: expand, depthwise, squeeze-excite (SiLU), project, residual."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                       nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 4, 1), nn.SiLU(), nn.Conv2d(h // 4, h, 1),
                                nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        return x + self.project(h * self.se(h))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, linear MLP, layer scale, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.gamma * self.pw2(nn.functional.gelu(self.pw1(h)))
        return x + h.permute(0, 3, 1, 2)


class DenseBlock(nn.Module):
    """DenseNet: each layer's BN-ReLU-conv output is concatenated to its input."""

    def __init__(self, c: int, growth: int = 8, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(), nn.Conv2d(c + i * growth, growth, 3, padding=1))
            for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class RegNetBlock(nn.Module):
    """Bottleneck with a grouped 3x3 conv and squeeze-excitation."""

    def __init__(self, c: int, group_width: int = 8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c // group_width, bias=False), nn.BatchNorm2d(c),
                               nn.ReLU())
        self.se = SqueezeExcite(c)
        self.c = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.c(self.se(self.b(self.a(x)))))


class TinyVisionZoo(nn.Module):
    """The patterns of MobileNet/EfficientNet, ConvNeXt, DenseNet and RegNet in one small net."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mbconv = InvertedResidual(16)
        self.convnext = ConvNeXtBlock(16)
        self.dense = DenseBlock(16)
        self.transition = nn.Sequential(nn.BatchNorm2d(32), nn.Conv2d(32, 32, 1), nn.AvgPool2d(2))
        self.regnet = RegNetBlock(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.convnext(self.mbconv(self.stem(x)))
        x = self.regnet(self.transition(self.dense(x)))
        return self.head(x.mean((2, 3)))


class TinyMLP(nn.Module):
    """A plain nn.Module returning a tuple."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 64), nn.Linear(64, 5)

    def forward(self, x, scale):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) * scale, h


HF_MODELS = ["llama", "gpt2", "bert", "opt", "qwen2"]
FAST_ARCHS = ("llama", "bert", "cnn", "mlp", "vit")  # the matrices' cases in make test; the rest in make test-all


def fast_only(values, keep, *, unpack: bool = False) -> list:
    """A test matrix: the cases ``keep`` holds (or accepts, when it is a function) run in
    ``make test``; the others are marked slow and run in ``make test-all`` (CI) only.
    ``unpack``: each value is a tuple of several parameters."""
    import pytest

    kept = keep if callable(keep) else keep.__contains__
    return [v if kept(v) else pytest.param(*(v if unpack else (v,)), marks=pytest.mark.slow) for v in values]
FUSED_MODELS = ["phi3", "falcon"]  # families with fused projections, held out of the main matrix
LOCAL_MODELS = ["cnn", "vit", "mlp", "zoo"]


def build(name: str) -> tuple[nn.Module, object]:
    """A model and example inputs for it."""
    torch.manual_seed(0)
    if name in HF_MODELS + FUSED_MODELS:
        model = _hf(name).eval()
        ids = torch.randint(3, VOCAB, (2, 12))
        if name == "bert":
            return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return model, ids
    if name == "cnn":
        return TinyCNN().eval(), torch.randn(2, 3, 32, 32)
    if name == "vit":
        return TinyViT().eval(), torch.randn(2, 3, 32, 32)
    if name == "mlp":
        return TinyMLP().eval(), (torch.randn(4, 20), torch.tensor(2.0))
    if name == "zoo":
        return TinyVisionZoo().eval(), torch.randn(2, 3, 32, 32)
    raise KeyError(name)


def other_inputs(name: str, example) -> object:
    """Inputs of a different batch/sequence size, to check dynamic shapes."""
    if name in HF_MODELS + FUSED_MODELS:
        ids = torch.randint(3, VOCAB, (3, 7))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if name == "bert" else ids
    if name in ("cnn", "vit", "zoo"):
        return torch.randn(3, 3, 32, 32)
    return (torch.randn(7, 20), torch.tensor(0.5))
