"""The bundled ``default`` model: a CA-MAE of our own, small enough for a 2-core CPU.

Importing this module registers it. Its options are those of every CA-MAE
(:class:`DefaultConfig`, a :class:`~.camae.CAMAEConfig` with the bundled model's defaults); its
weights travel with the package, their config in the file's ``maeprobe_config`` metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from napari_maeprobe.models import camae
from napari_maeprobe.models.camae import CAMAE, CAMAEConfig
from napari_maeprobe.models.registry import ModelSpec, register_model

BUNDLED = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = BUNDLED / "maeprobe-default.safetensors"


@dataclass
class DefaultConfig(CAMAEConfig):
    """The architecture of the bundled default model (standard pre-norm blocks, a decoder)."""

    input_size: int = 96
    patch_size: int = 12
    embed_dim: int = 144
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    max_channels: int = 11
    block: str = "standard"
    init_values: float | None = None
    legacy_bias: bool = False
    decoder_embed_dim: int = 96
    decoder_depth: int = 1
    decoder_num_heads: int = 4


#: the architecture of the bundled default model
DEFAULT_CONFIG = DefaultConfig()


def checkpoint_filter(state: dict, metadata: dict | None = None, **options):
    """:func:`.camae.checkpoint_filter` with the default model's defaults."""
    return camae.checkpoint_filter(state, metadata, config_cls=DefaultConfig, **options)


register_model(
    ModelSpec(
        name="default",
        summary="small CA-MAE of our own, trained on the bundled real images (runs offline)",
        channels="1+",  # any number: the position table is repeated per channel
        input_size=f"{DEFAULT_CONFIG.input_size}x{DEFAULT_CONFIG.input_size}",
        embed_dim=DEFAULT_CONFIG.embed_dim,
        licence="BSD-3-Clause (this package)",
        config=DefaultConfig,
        model=CAMAE,
        checkpoint_filter=checkpoint_filter,
        bundled=DEFAULT_WEIGHTS,
        has_decoder=True,
    )
)
