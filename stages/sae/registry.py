"""The SAE architectures by name: `ARCHITECTURES`, `sae_class`, `build_sae`.

Adding an architecture: a file defining its `BaseSAE` subclass (with `architecture`,
`config_class` and `saelens_architecture` set; `from_saelens` when its SAELens folders
carry fields of its own, `plot_style` for the report), its config class in
`stages/sae/config.py`, and one import line below. Nothing else branches on an
architecture's name: the SAELens loader (`io.py`) asks `saelens_reader`, the report asks
`plot_style` and `dashboard_default`.
"""

from __future__ import annotations

from typing import Any

from stages.sae.base import BaseSAE
from stages.sae.batchtopk import BatchTopKSAE
from stages.sae.config import CONFIGS, SAEConfig, parse_sae_config
from stages.sae.gated import GatedSAE
from stages.sae.jumprelu import JumpReLUSAE
from stages.sae.relu import ReLUSAE
from stages.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[BaseSAE]] = {
    cls.architecture: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE)
}
if set(ARCHITECTURES) != set(CONFIGS):
    raise ImportError(
        f"stages/sae: SAE modules {sorted(ARCHITECTURES)} and configs {sorted(CONFIGS)} differ"
    )


# SAELens inference architecture -> the class `load_sae` reads it into by default
SAELENS_READERS: dict[str, type[BaseSAE]] = {
    cls.saelens_architecture: cls for cls in ARCHITECTURES.values() if cls.reads_saelens_by_default
}


def saelens_reader(saelens_architecture: str, training_architecture: Any = None) -> type[BaseSAE]:
    """The class for a SAELens folder of `saelens_architecture`: the one its metadata's
    `training_architecture` names when that class writes this format, else the default
    reader. KeyError for a format none of ours reads."""
    named = (
        ARCHITECTURES.get(training_architecture) if isinstance(training_architecture, str) else None
    )
    if named is not None and named.saelens_architecture == saelens_architecture:
        return named
    return SAELENS_READERS[saelens_architecture]


def plot_style(architecture: str) -> tuple[str, str]:
    """(colour, marker) of an architecture in the report's figures (grey for unknown)."""
    return (ARCHITECTURES[architecture] if architecture in ARCHITECTURES else BaseSAE).plot_style


def sae_class(architecture: str) -> type[BaseSAE]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture '{architecture}', expected one of {sorted(ARCHITECTURES)}"
        ) from None


def build_sae(cfg: SAEConfig | dict[str, Any]) -> BaseSAE:
    """Instantiate an (untrained, seeded) SAE from a config with d_in set."""
    cfg = parse_sae_config(cfg)
    return sae_class(cfg.architecture)(cfg)
