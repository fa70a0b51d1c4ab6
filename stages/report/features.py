"""Which features fire here? Token by token, the top active SAE latents of a text.

    from stages.report import features_of_text, format_token_features
    rows = features_of_text("Mia feels calm.", model, "blocks.1.hook_resid_post", sae,
                            dashboard_data, k=5)
    print(format_token_features(rows))

The text is run through the model up to the hook (`stop_at_layer`), in consecutive
windows of the model's context length when it is longer (each window starts again from
BOS, as the pipeline caches; every token is covered), the hook's activations go through
`sae.encode`, and each latent is described from the dashboard
data (`dashboard_data.json`: top tokens, best concept, logit-lens tokens).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.report.dashboards import describe


@dataclass
class ActiveFeature:
    feature: int
    activation: float
    description: str


@dataclass
class TokenFeatures:
    """One token of the text and its top active latents (strongest first)."""

    position: int
    token: str
    features: list[ActiveFeature]


def load_dashboard_data(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "dashboard_data.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing; expected the report stage's dashboard data for this SAE "
            "(build the report first: `dvc repro report`)"
        )
    return json.loads(path.read_text())


@torch.no_grad()
def features_of_text(
    text: str,
    model,
    hook: str,
    sae,
    dashboard_data: Mapping[str, Any] | str | Path | None = None,
    k: int = 5,
    prepend_bos: bool = True,
) -> list[TokenFeatures]:
    """The top-k active latents of `sae` at `hook` for every token of `text` (BOS left
    out), with a short description of each from the dashboard data when given."""
    from stages.activations import stop_layer

    if k < 1:
        raise ValueError(f"k = {k}, expected an integer ≥ 1")
    if hook not in model.hook_dict:
        raise ValueError(
            f"hook {hook!r} is not a hook of this model (e.g. blocks.0.hook_resid_post)"
        )
    if isinstance(dashboard_data, str | Path):
        dashboard_data = load_dashboard_data(dashboard_data)
    if dashboard_data and dashboard_data.get("hook") not in (None, hook):
        raise ValueError(f"dashboard data is for hook {dashboard_data.get('hook')!r}, not {hook!r}")
    descs = (dashboard_data or {}).get("features", {})
    out = []
    start = 1 if prepend_bos else 0
    for offset, window in text_windows(model, text, prepend_bos):
        strs = model.to_str_tokens(window[0])
        _, cache = model.run_with_cache(
            window, names_filter=[hook], stop_at_layer=stop_layer(model, [hook])
        )
        x = cache[hook][0].float()
        if x.shape[-1] != sae.d_in:
            raise ValueError(f"{hook}: width {x.shape[-1]}, but the SAE expects d_in = {sae.d_in}")
        f = sae.encode(x)
        vals, ids = torch.topk(f, min(k, f.shape[-1]), dim=-1)
        for p in range(start, len(strs)):
            feats = [
                ActiveFeature(int(i), float(v), _describe(descs, int(i)))
                for v, i in zip(vals[p].tolist(), ids[p].tolist(), strict=True)
                if v > 0
            ]
            out.append(TokenFeatures(offset + p, strs[p], feats))
    return out


def text_windows(model, text: str, prepend_bos: bool = True) -> list[tuple[int, torch.Tensor]]:
    """The whole text as model windows [1, <= n_ctx], each with its offset: a text longer
    than the context is cut into consecutive windows that each start again from BOS, the
    rule the pipeline caches by (`stages/tokens.py`), so no token is dropped. A token's
    position in the text is offset + its position in its window (BOS = 0)."""
    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    n_ctx = int(model.cfg.n_ctx)
    if not prepend_bos:
        return [(i, ids[i : i + n_ctx][None]) for i in range(0, max(len(ids), 1), n_ctx)]
    bos = torch.tensor([model.tokenizer.bos_token_id], dtype=ids.dtype, device=ids.device)
    body = n_ctx - 1
    return [
        (i, torch.cat([bos, ids[i : i + body]])[None]) for i in range(0, max(len(ids), 1), body)
    ]


def _describe(descs: Mapping[str, Any], feature: int) -> str:
    d = descs.get(str(feature))
    if d is None:
        return "not in dashboard data" if descs else ""
    return describe(d)


def format_token_features(rows: list[TokenFeatures], width: int = 100) -> str:
    """A plain-text table: one block per token, one line per active latent."""
    lines = [f"{'pos':>4}  {'token':<14} {'feature':>8} {'act':>8}  description"]
    for r in rows:
        tok = repr(r.token)[:14]
        if not r.features:
            lines.append(f"{r.position:>4}  {tok:<14} {'-':>8} {'':>8}  (no active latent)")
        for j, a in enumerate(r.features):
            head = f"{r.position:>4}  {tok:<14}" if j == 0 else " " * 20
            desc = (
                a.description if len(a.description) <= width else a.description[: width - 1] + "…"
            )
            lines.append(f"{head} {a.feature:>8} {a.activation:>8.3f}  {desc}")
    return "\n".join(lines)
