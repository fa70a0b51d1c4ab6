"""The toy LM's training loss in fewer, larger kernels: HookedTransformer's own function of
its own parameters, written for speed (`models.<name>.train.engine: fused`).

HookedTransformer runs every head's projection as its own einsum, masks attention
scores with `torch.where` and goes through a hook point at every step. On this machine's
toy shape (4 layers, d_model 64, 16 × 128 tokens a step, one thread) that costs
~175 ms a training step against ~115 ms for the same mathematics as

- one fused QKV matrix product per layer (W_Q, W_K, W_V concatenated, biases included);
- RoPE with the attention layer's own `rotary_sin` / `rotary_cos` tables, in the GPT-NeoX
  half-rotation TransformerLens uses (`rotary_adjacent_pairs` False);
- `torch.nn.functional.scaled_dot_product_attention` with a causal mask and
  TransformerLens' scale 1 / `attn_scale`;
- `layer_norm`, the MLP and the unembedding as `addmm`s, and `cross_entropy` on the
  positions that predict a next token (TransformerLens' `lm_cross_entropy_loss`).

The parameters, optimizer, checkpoints and saved weights stay the HookedTransformer's:
only the forward used for the gradient differs, so a fused-trained model loads, hooks and
caches exactly like any other. It equals HookedTransformer's loss up to float rounding
(the tests compare loss and every gradient), so two engines train the same model up to
rounding, which compounds over training like any last-bit change: a model trained with
one engine is not byte-identical to one trained with the other.

    loss = fused_loss(model, tokens)   # tokens [batch, pos]; == model(tokens, return_type="loss")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACT = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}

# HookedTransformerConfig switches that change the forward (all off for the toy models)
_EXTRAS = ("use_qk_norm", "clip_qkv", "use_logn_attn", "use_local_attn", "post_embedding_ln",
           "use_normalization_before_and_after", "final_rms", "use_attention_sinks")  # fmt: skip


def unsupported(cfg) -> str | None:
    """Why `fused_loss` cannot compute this HookedTransformerConfig's loss, or None. The
    toy models' configs (`stages.models.toy_config`) are always supported."""
    checks = [
        (cfg.normalization_type == "LN", f"normalization_type {cfg.normalization_type!r}, expected 'LN'"),
        (cfg.positional_embedding_type in ("standard", "rotary"),
         f"positional_embedding_type {cfg.positional_embedding_type!r}, expected standard or rotary"),
        (cfg.act_fn in _ACT, f"act_fn {cfg.act_fn!r}, expected one of {', '.join(_ACT)}"),
        (not cfg.attn_only and not cfg.gated_mlp and not cfg.parallel_attn_mlp,
         "attention-only, gated-MLP or parallel attention/MLP blocks"),
        (cfg.n_key_value_heads is None and not cfg.num_experts,
         "grouped-query attention or mixture-of-experts MLPs"),
        (not any(getattr(cfg, f) for f in _EXTRAS), f"any of {', '.join(_EXTRAS)}"),
        (cfg.attn_scores_soft_cap <= 0 and cfg.output_logits_soft_cap <= 0, "soft caps"),
        (cfg.attention_dir == "causal", f"attention_dir {cfg.attention_dir!r}, expected causal"),
        (not cfg.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx"),
        (cfg.positional_embedding_type != "rotary"
         or (cfg.rotary_dim == cfg.d_head and not cfg.rotary_adjacent_pairs),
         "rotary on part of each head or on adjacent pairs"),
    ]  # fmt: skip
    return next((why for ok, why in checks if not ok), None)


def _layer_norm(x: torch.Tensor, ln, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], ln.w, ln.b, eps)


def _rotate(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as TransformerLens applies it: z·cos + (−z₂, z₁)·sin over the head's halves."""
    half = z.shape[-1] // 2
    return z * cos + torch.cat([-z[..., half:], z[..., :half]], -1) * sin


def fused_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (a HookedTransformer) on `tokens`
    [batch, pos]: `model(tokens, return_type="loss")`, in fewer kernels (module doc)."""
    cfg = model.cfg
    why = unsupported(cfg)
    if why is not None:
        raise ValueError(f"the fused LM engine does not support {why} (train.engine: hooked does)")
    b, t = tokens.shape
    h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    act = _ACT[cfg.act_fn]
    x = model.embed.W_E[tokens]
    if cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed.W_pos[:t]
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        w = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d, 3 * h * dh)
        bias = torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(-1)
        flat = _layer_norm(x, block.ln1, cfg.eps).reshape(b * t, d)
        q, k, v = torch.addmm(bias, flat, w).view(b, t, 3, h, dh).unbind(2)
        if cfg.positional_embedding_type == "rotary":
            cos, sin = attn.rotary_cos[None, :t, None, :], attn.rotary_sin[None, :t, None, :]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=1.0 / attn.attn_scale,
        )  # fmt: skip
        z = z.transpose(1, 2).reshape(b * t, h * dh)
        x = x + torch.addmm(attn.b_O, z, attn.W_O.reshape(h * dh, d)).view(b, t, d)
        flat = _layer_norm(x, block.ln2, cfg.eps).reshape(b * t, d)
        hidden = act(torch.addmm(mlp.b_in, flat, mlp.W_in))
        x = x + torch.addmm(mlp.b_out, hidden, mlp.W_out).view(b, t, d)
    final = _layer_norm(x[:, :-1], model.ln_final, cfg.eps).reshape(-1, d)
    logits = torch.addmm(model.unembed.b_U, final, model.unembed.W_U)
    return F.cross_entropy(logits, tokens[:, 1:].reshape(-1))
