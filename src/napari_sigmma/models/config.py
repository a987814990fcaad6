"""The SIGMMA model's configuration: plain Python (no torch), so forms, configs and the
command line can read and check it without importing the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import SigmmaError

FINETUNE_CHOICES = ("frozen", "last_k", "full")


@dataclass
class ModelConfig:
    """Everything that defines a SIGMMA model; plain types only (checkpoints hold
    ``asdict(cfg)``).

    Attributes
    ----------
    backbone
        Registry name (:func:`napari_sigmma.models.backbones.available_backbones`). The
        default ``efficientnet_lite0`` is the only backbone with offline pretrained weights;
        the paper's is ``uni`` (needs ``checkpoint``).
    checkpoint
        Backbone weights file (or ``"hf-hub:…"`` for UNI).
    pretrained
        Load the backbone's default weights when no checkpoint is given.
    img_size
        Backbone input side crops are resized to (None = the backbone's own, 224). Smaller
        is faster but leaves the size the weights were trained at.
    embed_dim
        Shared embedding dimension D of both modalities.
    hidden
        Node embedding width of the GNN (and of the gene-vector MLP).
    head, head_hidden
        Image projection heads: ``"mlp"`` (Linear–GELU–Linear, ``head_hidden`` units) or
        ``"linear"``.
    gnn_layers
        GNN layers on G_micro, G_meso, G_macro.
    candidate_k
        Nearest candidates each node proposes per edge-addition layer; None (default) =
        every pair of the block, as the paper (runs made before kept their 8).
    candidate_cap
        Memory guard when ``candidate_k`` is None: a node with more allowed partners in a
        block proposes only this many nearest (None = no guard). See
        :mod:`napari_sigmma.models.edges`.
    dense_k
        Candidate cap for ``sparsify=False`` (None = every pair of the block, up to
        ``candidate_cap``).
    scales
        Scales in the loss; ``("macro",)`` = the single-scale ablation.
    use_graph
        False = gene-vector MLP instead of the cell graph (ablation).
    sparsify
        False = add all candidate edges (ablation).
    edge_temperature
        Relaxed-Bernoulli temperature of the edge sampler.
    init_temperature, learn_temperature
        InfoNCE temperature τ (initial value) and whether it is learnt.
    finetune, last_k
        Backbone policy: ``"frozen"``, ``"last_k"`` (last k ViT blocks / CNN stages) or
        ``"full"``.
    fast_multicrop
        One backbone pass per tile + region pooling instead of 21 crops (beyond the paper).
    fast_region_map
        Fast mode: the shared non-linear region map before each scale's grid mean, which
        keeps the scales' inputs distinct (:mod:`napari_sigmma.models.multicrop`). False only
        for checkpoints saved before it (their config lacks the key); such a model warns.
    crop_chunk
        Backbone forward in chunks of this many crops (None = one batch).
    """

    backbone: str = "efficientnet_lite0"
    checkpoint: str | None = None
    pretrained: bool = True
    img_size: int | None = None
    embed_dim: int = 128
    hidden: int = 128
    head: str = "mlp"
    head_hidden: int = 512
    gnn_layers: tuple[int, int, int] = (2, 1, 1)
    candidate_k: int | None = None
    candidate_cap: int | None = 256
    dense_k: int | None = None
    scales: tuple[str, ...] = SCALES
    use_graph: bool = True
    sparsify: bool = True
    edge_temperature: float = 0.5
    init_temperature: float = 0.07
    learn_temperature: bool = True
    finetune: str = "frozen"
    last_k: int = 2
    fast_multicrop: bool = False
    fast_region_map: bool = True
    crop_chunk: int | None = None

    def __post_init__(self) -> None:
        # YAML / JSON give lists; keep tuples so configs compare equal after a round trip
        self.gnn_layers = tuple(int(n) for n in self.gnn_layers)  # type: ignore[assignment]
        self.scales = tuple(str(s) for s in self.scales)
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
        bad = [s for s in self.scales if s not in SCALES]
        if bad or not self.scales:
            raise SigmmaError(f"scales must be a non-empty subset of {SCALES}, got {self.scales}")
        if self.finetune not in FINETUNE_CHOICES:
            raise SigmmaError(
                f"finetune must be one of {', '.join(FINETUNE_CHOICES)}, got {self.finetune!r}"
            )
        if self.finetune == "last_k" and self.last_k < 1:
            raise SigmmaError(f"last_k must be ≥ 1, got {self.last_k}")
        if not self.init_temperature > 0:
            raise SigmmaError(f"init_temperature must be > 0, got {self.init_temperature}")
        if not self.edge_temperature > 0:
            raise SigmmaError(f"edge_temperature must be > 0, got {self.edge_temperature}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (``dataclasses.asdict``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a SigmmaError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SigmmaError(f"unknown model config keys: {', '.join(unknown)}")
        if d.get("fast_multicrop") and "fast_region_map" not in d and set(d) >= _V1_KEYS:
            # a complete dump saved before the region map existed (a checkpoint): rebuild
            # the model it was trained as. Partial dicts (YAML recipes) get the default.
            d = {**d, "fast_region_map": False}
        return cls(**d)


#: Keys of every ModelConfig saved before ``fast_region_map`` and ``candidate_cap`` existed.
_V1_KEYS = frozenset(f.name for f in fields(ModelConfig)) - {"fast_region_map", "candidate_cap"}
