"""Which models a stage can decompose exactly, decided at load time.

Two gates, both before anything is traced:

* ``check_architecture(config, model)``: families whose blocks are known not to decompose into the
  parts of SPEC 3-4 as the stage reads them (post-LN blocks, Falcon's new decoder layout) are
  refused with the architecture and the reason.
* ``check_decomposition(...)``: on a short probe forward, the stage's own readings must add up:
  the attention parts ``pattern * (v @ W_O)`` sum to the attention output up to one constant (the
  bias) at every position, the FFN's neurons (an MoE block's experts) sum to its output up to one
  constant, and the residual nodes are the sums the graph says they are. Anything that does not is refused too, so
  a family nobody has listed never traces silently wrong numbers.
"""

from __future__ import annotations

from typing import Any

import torch


class UnsupportedModelError(NotImplementedError):
    """The model cannot be decomposed exactly by routescope (yet)."""


def _refuse(arch: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{arch}: {reason}; routescope refuses it rather than trace contributions "
                                 "that do not add up (see the supported-architectures table in the README)")


def check_architecture(config: Any, model: torch.nn.Module) -> None:
    """Refuse families whose blocks routescope does not decompose exactly (``UnsupportedModelError``)."""
    arch = type(model).__name__
    if getattr(config, "do_layer_norm_before", True) is False:
        raise _refuse(arch, "post-LN blocks (do_layer_norm_before=False, SPEC 4a) are not supported yet")
    if getattr(config, "new_decoder_architecture", False):
        raise _refuse(arch, "Falcon's new decoder layout (new_decoder_architecture=True) is not read correctly "
                            "by TransformerLens' Falcon adapter")


def probe_inputs(vocab: int, d_model: int, first: bool, device: torch.device, dtype: torch.dtype,
                 n_tokens: int = 6) -> torch.Tensor:
    """A short deterministic probe: token ids for the first stage, else a residual."""
    gen = torch.Generator().manual_seed(0)
    if first:
        return torch.randint(0, vocab, (1, n_tokens), generator=gen)
    return torch.randn(1, n_tokens, d_model, generator=gen).to(device, dtype)


def check_moe(arch: str, layer: int, acts: dict[str, torch.Tensor], block: torch.nn.Module,
              dtype: torch.dtype) -> None:
    """Refuse an MoE block whose routed and shared experts (``workers.moe``) do not add up to its output."""
    from .moe import expert_parts

    tol = 2e-3 if dtype == torch.float32 else 5e-2
    x, out = acts["mlp.hook_in"], acts["hook_mlp_out"]
    total = torch.stack([expert_parts(block, x[t]).total() for t in range(x.shape[0])])
    err = float((total.double() - out.double()).abs().max())
    if err > tol * max(float(out.abs().max()), 1e-6):
        raise _refuse(arch, f"layer {layer}: the routed and shared experts' outputs do not add up to the "
                            f"mixture-of-experts block's output (off by {err:.3g}, SPEC 4b)")


def check_decomposition(arch: str, layer: int, acts: dict[str, torch.Tensor], W_O: torch.Tensor,
                        W_out: torch.Tensor | None, parallel: bool, dtype: torch.dtype,
                        attn_scale: torch.Tensor | None = None, ffn_scale: torch.Tensor | None = None) -> None:
    """Refuse a layer whose captured activations do not add up as SPEC 3-4 reads them."""
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    f = {k: v.double() for k, v in acts.items()}
    pre, post, attn, mlp = f["hook_resid_pre"], f["hook_resid_post"], f["hook_attn_out"], f["hook_mlp_out"]
    v, pattern = f["attn.hook_v"], f["attn.hook_pattern"]  # [T, H_kv, dh], [H, T, T]
    H = W_O.shape[0]
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    parts = torch.einsum("hts,shd,hde->te", pattern, v, W_O.double())
    if attn_scale is not None:  # a norm on the attention output, linearised (SPEC 4a)
        parts = parts * attn_scale.double()
    scale = max(float(attn.abs().max()), float(pre.abs().max()), 1e-6)

    def same_offset(what: str, whole: torch.Tensor, summed: torch.Tensor) -> None:
        offset = whole - summed  # a bias: the same vector at every position
        err = float((offset - offset[:1]).abs().max())
        if err > tol * max(float(whole.abs().max()), 1e-6):
            raise _refuse(arch, f"layer {layer}: {what} (off by {err:.3g}, SPEC 3-4 invariant)")

    same_offset("the attention parts pattern * (v @ W_O) do not add up to the attention output", attn, parts)
    if W_out is not None:  # MoE blocks are checked expert by expert (check_moe)
        neurons = f["mlp.hook_post"] @ W_out.double()
        same_offset("the FFN neurons (mlp.hook_post @ W_out) do not add up to the FFN output", mlp,
                    neurons if ffn_scale is None else neurons * ffn_scale.double())
    if parallel:
        err = float((post - pre - attn - mlp).abs().max())
        what = "the layer's output is not its input plus the attention and FFN outputs"
    else:
        mid = f["hook_resid_mid"]
        err = max(float((mid - pre - attn).abs().max()), float((post - mid - mlp).abs().max()))
        what = "the residual after attention / after the layer is not the sum of its parts"
    if err > tol * scale:
        raise _refuse(arch, f"layer {layer}: {what} (off by {err:.3g})")
