"""A transformer written in plain torch (no Hugging Face class), traced through a model adapter.

``PlainTransformer``: 3 pre-LN layers, multi-head attention with biases, a GELU MLP, learned
positions, a character vocabulary (``CharTokenizer``). ``PlainAdapter`` implements
``routescope.workers.adapter.ModelAdapter`` for it, and ``PlainRange`` the ``LayerRange`` of layers
``[start, stop)``: the example of ``docs/adapters.md``, used by ``test_adapter.py`` and the Ray test.

Selection by dotted path: ``plain_torch_model:make`` (the model spec is a ``.pt`` file written by
``save``; anything else gives the seeded random model), ``plain_torch_model:make_broken`` (an
adapter whose ``hook_attn_out`` is wrong, which the stage's probe must refuse).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from routescope.workers.adapter import LayerRange, ModelFacts

D_MODEL, N_HEADS, D_FF, N_LAYERS, N_CTX = 32, 4, 64, 3, 64


class CharTokenizer:
    """Characters as tokens: 0 is BOS, 1 padding, then printable ASCII; anything else is '?'."""

    bos_token_id = 0
    pad_token_id = 1
    specials = ("<bos>", "<pad>")

    def __init__(self):
        self.chars = [chr(c) for c in range(32, 127)]
        self.index = {c: i + len(self.specials) for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.specials) + len(self.chars)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = [self.index.get(c, self.index["?"]) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.specials[i] if i < len(self.specials) else self.chars[i - len(self.specials)] for i in ids]

    def decode(self, ids) -> str:
        return "".join(self.convert_ids_to_tokens(ids))


VOCAB = len(CharTokenizer())


class Block(nn.Module):
    """``mid = x + attn(ln1(x))``, ``post = mid + mlp(ln2(mid))``; ``record`` gets the activations."""

    def __init__(self, d: int = D_MODEL, n_heads: int = N_HEADS, d_ff: int = D_FF):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d // n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        B, T, d = x.shape
        H, dh = self.n_heads, self.d_head
        h = self.ln1(x)
        q, k, v = (proj(h).reshape(B, T, H, dh) for proj in (self.q, self.k, self.v))
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & (mask[:, None, None, :] > 0)
        # The smallest finite value rather than -inf: a padding row (nothing allowed) stays finite.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        pattern = scores.softmax(-1)
        z = torch.einsum("bhts,bshd->bthd", pattern, v)
        attn_out = self.o(z.reshape(B, T, d))
        mid = x + attn_out
        act = nn.functional.gelu(self.fc1(self.ln2(mid)))
        mlp_out = self.fc2(act)
        post = mid + mlp_out
        if record is not None:
            record.update({"hook_resid_pre": x, "attn.hook_v": v, "attn.hook_pattern": pattern,
                           "hook_attn_out": attn_out, "hook_resid_mid": mid, "mlp.hook_post": act,
                           "hook_mlp_out": mlp_out, "hook_resid_post": post})
        return post

    def W_O(self) -> torch.Tensor:
        """``[H, d_head, d]``: ``o(z) = z.flatten() @ o.weight.T + o.bias``, head-major."""
        return self.o.weight.T.reshape(self.n_heads, self.d_head, -1)

    def W_out(self) -> torch.Tensor:
        return self.fc2.weight.T  # [d_ff, d]


class PlainTransformer(nn.Module):
    def __init__(self, n_layers: int = N_LAYERS, vocab: int = VOCAB):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, D_MODEL), nn.Embedding(N_CTX, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.unembed = nn.Linear(D_MODEL, vocab)

    @classmethod
    def random(cls, seed: int = 0) -> "PlainTransformer":
        """Seeded weights, scaled so attention is peaked and the norms have gains away from 1."""
        torch.manual_seed(seed)
        model = cls()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name and name != "pos.weight":
                    p.mul_(3.0)
                elif "ln" in name:
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.2)
        return model.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))[None]
        mask = torch.ones_like(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.ln_f(x))


def save(path: str | Path, seed: int = 0) -> Path:
    """Write the seeded model's weights to ``path`` (the model spec ``make`` reads)."""
    path = Path(path)
    torch.save(PlainTransformer.random(seed).state_dict(), path)
    return path


def load(model: str | None) -> PlainTransformer:
    if model and Path(str(model)).is_file():
        net = PlainTransformer()
        net.load_state_dict(torch.load(str(model), map_location="cpu", weights_only=True))
        return net.eval()
    return PlainTransformer.random()


class PlainRange(nn.Module):
    """Layers ``[start, stop)`` of a ``PlainTransformer``, holding only their weights."""

    def __init__(self, net: PlainTransformer, start: int, stop: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.first, self.last = start == 0, stop == len(net.blocks)
        self.embed = net.embed if self.first else None
        self.pos = net.pos if self.first else None
        self.blocks = nn.ModuleList(net.blocks[start:stop])
        self.ln_f = net.ln_f if self.last else None
        self.out = net.unembed if self.last else None
        self.to(device, dtype).eval()
        self.W_O = torch.stack([b.W_O() for b in self.blocks]).detach()      # [n, H, dh, d]
        self.W_out = torch.stack([b.W_out() for b in self.blocks]).detach()  # [n, d_ff, d]
        self.facts = ModelFacts(architecture="PlainTransformer", n_heads=N_HEADS, n_kv_heads=N_HEADS,
                                d_model=D_MODEL, d_head=D_MODEL // N_HEADS, d_ff=D_FF, d_vocab=net.unembed.out_features,
                                n_ctx=N_CTX, parallel=False)

    def _input(self, inputs: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(inputs) + self.pos(position_ids) if self.first else inputs

    def forward(self, inputs, attention_mask, position_ids, on_layer):
        x = self._input(inputs, position_ids)
        for i, block in enumerate(self.blocks):
            acts: dict[str, torch.Tensor] = {}
            x = block(x, attention_mask, acts)
            on_layer(i, acts)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def plain_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        T = inputs.shape[1]
        mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=device)
        x = self._input(inputs.to(device), torch.arange(T, device=device)[None])
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.final_norm(x)) if self.last else x


class PlainAdapter:
    """``ModelAdapter`` of a ``PlainTransformer`` (weights from ``model``, a ``.pt`` file, if given)."""

    n_layers = N_LAYERS

    def __init__(self, model: str | None = None):
        self.model = model
        self.name = "plain-torch-3l"
        self.tokenizer = CharTokenizer()

    def build(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> LayerRange:
        return PlainRange(load(self.model), start, stop, device, dtype)


def make(model: str | None = None) -> PlainAdapter:
    """The factory a dotted path names: ``plain_torch_model:make``."""
    return PlainAdapter(model)


class BrokenBlock(Block):
    """Reports an attention output that is not what its heads wrote (one head's share doubled)."""

    def forward(self, x, mask, record=None):
        out = super().forward(x, mask, record)
        if record is not None:
            B, T, _ = x.shape
            v, pattern = record["attn.hook_v"], record["attn.hook_pattern"]
            head0 = torch.einsum("bts,bsd->btd", pattern[:, 0], v[:, :, 0]) @ self.W_O()[0]
            record["hook_attn_out"] = record["hook_attn_out"] + head0
        return out


class BrokenAdapter(PlainAdapter):
    def build(self, start, stop, device, dtype):
        net = load(self.model)
        for block in net.blocks:
            block.__class__ = BrokenBlock
        return PlainRange(net, start, stop, device, dtype)


def make_broken(model: str | None = None) -> BrokenAdapter:
    return BrokenAdapter(model)
