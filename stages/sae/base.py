"""The shared base every SAE architecture builds on.

An SAE maps an activation x ∈ R^d_in to latents f = encode(x) ∈ R^d_sae and back to
x̂ = decode(f) = f @ W_dec + b_dec. Parameter names and shapes follow SAELens:
`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`.

`forward(x)` is the training pass: it returns the reconstruction, the total loss and its
named terms (`mse` plus the architecture's sparsity / auxiliary terms), which latents fired
and the batch L0. The trainer knows nothing else about an architecture; everything
architecture-specific lives in one file next to this one.

Layout note: `W_enc` is stored column-major (it is the transpose of a contiguous
[d_sae, d_in] tensor). Its shape and maths are unchanged, but the sparse gradient of a
TopK encoder, `S^T @ x`, comes out in exactly that layout, so no transpose copy is needed.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from stages.sae import sparse_ops
from stages.sae.config import SAEConfig


class SAEOutput(NamedTuple):
    """Result of one training forward pass on a batch [B, d_in]."""

    x_hat: Tensor  # [B, d_in] reconstruction
    loss: Tensor  # scalar to minimise (sum of `terms`)
    terms: dict[str, Tensor]  # named scalar loss terms, already weighted
    fire_counts: Tensor  # int64 [d_sae]: rows on which each latent was active
    l0: Tensor  # scalar: mean number of active latents per row

    @property
    def fired(self) -> Tensor:
        return self.fire_counts > 0


def share_cutoffs(scores: Tensor, counts: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Per latent (column of `scores` [rows, latents]): keep_i = ⌊counts_i · ratio⌋, and
    the cutoff that exactly its keep_i largest scores exceed (its (keep_i + 1)-th largest,
    the smallest score when keep_i covers every row). The retargets of an SAE onto a
    target L0 (`retarget_l0`) move each latent's threshold there: every latent keeps its
    share of the batch's firings, scaled by `ratio` = target / L0."""
    keep = (counts.double() * ratio).floor().long()
    ranked = scores.sort(0, descending=True).values
    at = ranked.gather(0, keep.clamp(max=scores.shape[0] - 1)[None]).squeeze(0)
    return at, keep


class BaseSAE(nn.Module):
    """Linear encoder, architecture-specific nonlinearity, linear decoder."""

    architecture: ClassVar[str]  # our registry name
    config_class: ClassVar[type[SAEConfig]]
    saelens_architecture: ClassVar[str]  # the `architecture` written to cfg.json
    # `load_sae` reads a folder of `saelens_architecture` into this class unless its
    # metadata's `training_architecture` names another class of that format (BatchTopK
    # is written in JumpReLU's format and read back by its name)
    reads_saelens_by_default: ClassVar[bool] = True
    # the report: a stable colour and marker per architecture across every figure, and
    # whether its SAEs are the default dashboards (the one with the smallest k per hook)
    plot_style: ClassVar[tuple[str, str]] = ("#555555", "x")
    dashboard_default: ClassVar[bool] = False
    unit_norm_decoder: ClassVar[bool] = True  # keep decoder rows at norm 1 while training
    # encode (x - b_dec) rather than x; an instance attribute too, since SAELens folders
    # may set it either way
    default_apply_b_dec_to_input: ClassVar[bool] = True
    has_b_enc: ClassVar[bool] = True
    # with `target_l0` set, the loss itself pulls L0 to the target (no L0 controller)
    loss_targets_l0: ClassVar[bool] = False

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.d_in is None:
            raise ValueError(
                f"SAE config '{cfg.display_name}': d_in is not set; call "
                "cfg.with_d_in(source.d_in) before building the SAE"
            )
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.d_sae = cfg.width
        self.metadata: dict[str, Any] = {}
        self.apply_b_dec_to_input = self.default_apply_b_dec_to_input
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(self.d_sae, self.d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True) * self.decoder_init_norm()
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.clone().t())  # column-major [d_in, d_sae], = W_dec^T
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    # ---- the maths ------------------------------------------------------------------
    def decoder_init_norm(self) -> float:
        return 1.0

    def sae_in(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations W_enc^T (x - b_dec) + b_enc."""
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents f [..., d_sae] (inference behaviour)."""
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        """Training pass. `sparsity_scale` ∈ [0, 1] multiplies the sparsity coefficient
        (warm-up); `dead_mask` [d_sae] marks latents the trainer considers dead."""
        raise NotImplementedError

    @staticmethod
    def mse(x_hat: Tensor, x: Tensor) -> Tensor:
        """Squared error summed over d_in, mean over the batch."""
        return (x_hat - x).pow(2).sum(-1).mean()

    def fused_pre_acts(self, x: Tensor, bias: Tensor) -> Tensor:
        """(x − b_dec) W_enc + `bias` in one GEMM (the training passes of the L1 family;
        `pre_acts` adds the bias after the product, as inference always has)."""
        return torch.addmm(bias, self.sae_in(x), self.W_enc)

    def sparse_code(self, pre: Tensor, floor: Tensor | float = 0.0) -> sparse_ops.Code | None:
        """For an architecture whose gradients vanish off the entries where its encoder
        pre-activations `pre` (computed for the dense path) exceed `floor`: those entries
        as a sparse code, when sparse kernels apply (a CPU batch, `use_sparse_kernels`)
        and the code is sparse enough to pay (`sparse_ops.active_set`); None means train
        dense, on `pre` as it is. The sparse path recomputes the code's values with
        their own gradient path, so the dense GEMM's graph is simply dropped."""
        if not (self.cfg.use_sparse_kernels and pre.device.type == "cpu"):
            return None
        with torch.no_grad():
            return sparse_ops.active_set(pre.detach(), floor)

    def sparse_output(
        self, x: Tensor, x_hat: Tensor, fired: Tensor, terms: dict[str, Tensor]
    ) -> SAEOutput:
        """`dense_output` for a sparse code: `fired` holds the latent id of every active
        entry."""
        counts = torch.bincount(fired, minlength=self.d_sae)
        l0 = torch.tensor(fired.numel() / x.shape[0], dtype=x.dtype, device=x.device)
        loss = sum(terms.values(), torch.zeros((), dtype=x.dtype, device=x.device))
        return SAEOutput(x_hat, loss, terms, counts, l0)

    @staticmethod
    def dense_output(x: Tensor, x_hat: Tensor, f: Tensor, terms: dict[str, Tensor]) -> SAEOutput:
        with torch.no_grad():
            # summed as float32, exact below 2^24 rows: 4x faster than bool sums on CPU
            counts = (f > 0).to(torch.float32).sum(0)
            l0 = counts.sum() / f.shape[0]
            counts = counts.long()
        loss = sum(terms.values(), torch.zeros((), dtype=x.dtype, device=x.device))
        return SAEOutput(x_hat, loss, terms, counts, l0)

    # ---- training hooks ---------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (unit-norm SAEs)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    # ---- normalisation and interop ----------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on s·x act on raw x: the latents are unchanged and the
        reconstruction is divided by s (W_enc·s, W_dec/s, b_dec/s)."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factors per parameter name (absent: 1); none by default."""
        return {}

    def init_for_target_l0(self, x: Tensor, target_l0: float) -> None:
        """Before training towards `target_l0` (`SAEConfig.target_l0`), on training rows
        `x` as the SAE sees them: set what the L0 starts from where an architecture's
        own initialisation would leave it out of reach. Most need nothing."""

    def retarget_l0(self, x: Tensor, target_l0: float, coefficient: float) -> float | None:
        """Called once in a run towards `target_l0`, when its L0's first fast fall has
        ended (`L0Controller.fall_over`), on the batch `x` just trained on, with the
        sparsity coefficient λ in force: an architecture whose L0 answers λ too slowly
        to reach the target in the run may move itself onto the target here, and returns
        the λ at which its new state is stationary (the controller continues from it).
        None: nothing moved (the default)."""
        return None

    def calibrate(self, x: Tensor) -> dict[str, Any] | None:
        """Set inference-only parameters from raw training rows `x` once training ends
        (the trainer calls it after folding the input scale); returns what it set, for the
        SAE's metadata. Most architectures have none."""
        return None

    def saelens_config(self) -> dict[str, Any]:
        """Architecture-specific fields of SAELens' cfg.json."""
        return {}

    @classmethod
    def from_saelens(
        cls, cfg: dict[str, Any], meta: dict[str, Any], state: dict[str, Tensor], where: str
    ) -> dict[str, Any]:
        """Inverse of `saelens_config` for a SAELens folder (`where`) being loaded: this
        architecture's config fields read from its cfg.json / metadata, with `state` (its
        weights under SAELens' names) put into this class's form in place."""
        return {}

    def saelens_state_dict(self) -> dict[str, Tensor]:
        """Inference weights under SAELens' names, contiguous float32."""
        return {
            name: t.detach().to(torch.float32).contiguous() for name, t in self.state_dict().items()
        }

    @torch.no_grad()
    def load_saelens_state_dict(self, state: dict[str, Tensor], where: str = "state dict") -> None:
        """Inverse of `saelens_state_dict`; names the missing / mis-shaped key."""
        own = self.state_dict()
        for name, target in own.items():
            if name not in state:
                raise KeyError(
                    f"{where}: missing tensor '{name}' for a {self.architecture} SAE "
                    f"(has {sorted(state)})"
                )
            src = state[name]
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(
                    f"{where}: tensor '{name}' has shape {tuple(src.shape)}, expected "
                    f"{tuple(target.shape)}"
                )
            target.copy_(src.to(target.dtype))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}"
