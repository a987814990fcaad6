"""One SIGMMA session per napari viewer: the state every widget shares.

The dock, Explore, the legend and the retrieval widget read and write one :class:`Session`
(looked up with :func:`session_for`) instead of finding each other among napari's dock
widgets, so they never disagree: the number of clusters ``k``, the scale, the genes, the
attention head, which scales' overlays are shown and what the cells are coloured by live
here, with an event per field (psygnal's evented dataclass:
``session.events.k.connect(...)``). Plain Python, no Qt.

The session also carries the live view's controller (set by the dock when the live view
starts, ``None`` when it stops): widgets that follow it connect to
``session.events.controller``. Changing ``k``, ``genes`` or ``colour_by`` reaches the
controller here, once, whichever widget changed it. Nothing here changes a layer: a widget
that opens only reads the session.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from psygnal import evented

from napari_sigmma.constants import SCALES

GENE_VIEWS = ("predicted", "measured", "both", "none")


@evented
@dataclass(eq=False)
class Session:
    """Shared state of the SIGMMA widgets of one viewer.

    Attributes
    ----------
    k
        Clusters per scale (k-means).
    scale
        The scale retrieval compares and the legend lists first.
    genes
        Genes mapped by the gene head (predicted and measured).
    gene_view
        Which gene maps are shown: ``predicted``, ``measured``, ``both`` or ``none``.
    head
        Attention head shown.
    scales_shown
        Scales whose cluster / cell / edge overlays are shown.
    colour_by
        The table column or gene the live view's cells and tiles are coloured by (``""``:
        their clusters).
    checkpoint, run
        The model loaded in the dock (path and :class:`~napari_sigmma.live.run.LiveRun`).
    controller
        The running :class:`~napari_sigmma.viewer.controller.LiveController`, or ``None``.
    """

    k: int = 8
    scale: str = "micro"
    genes: tuple[str, ...] = ()
    gene_view: str = "predicted"
    head: int = 0
    scales_shown: tuple[str, ...] = ("micro",)
    colour_by: str = ""
    checkpoint: str | None = None
    run: Any = None
    controller: Any = None

    @property
    def engine(self) -> Any:
        """The live view's engine (``None`` without a running live view)."""
        ctrl = self.controller
        return None if ctrl is None else getattr(ctrl, "engine", None)

    def model_name(self) -> str:
        """``"<run> · epoch N"`` (or the checkpoint's file name) for labels."""
        return model_label(self.run, self.checkpoint)


def model_label(run: Any, checkpoint: str | None) -> str:
    """How a model is named in the widgets: its run folder and epoch (the path goes in a
    tooltip)."""
    from pathlib import Path

    if checkpoint is None:
        return "no model"
    path = Path(checkpoint)
    run_dir = getattr(run, "run_dir", None)
    name = Path(run_dir).name if run_dir else path.parent.name or path.stem
    epoch = getattr(run, "epoch", None)
    stem = path.stem
    parts = [name]
    if epoch is not None:
        parts.append(f"epoch {int(epoch)}")
    if stem not in ("last", "best") or epoch is None:
        parts.append(stem)
    elif stem == "best":
        parts.append("best")
    return " · ".join(parts)


def show_scale_bar(viewer: Any) -> None:
    """Turn on the viewer's scale bar (it shows the layers' units: µm for the plugin's)."""
    overlays = getattr(getattr(_real(viewer), "canvas", None), "overlays", None)
    bar = getattr(overlays, "scale_bar", None)
    if bar is not None:
        bar.visible = True


_SESSIONS: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()


def _real(viewer: Any) -> Any:
    # plugin widgets get napari's public-only proxy of the viewer: key by the real one
    return getattr(viewer, "__wrapped__", viewer)


def session_for(viewer: Any) -> Session:
    """The viewer's session (created on first use, dropped with the viewer)."""
    key = _real(viewer)
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = Session()
        _wire(session)
    return session


def _wire(session: Session) -> None:
    """Forward ``k``, ``genes`` and ``colour_by`` to the live controller, whoever changed
    them."""

    def on_k(k: int) -> None:
        ctrl = session.controller
        if ctrl is not None and not getattr(ctrl, "closed", False):
            ctrl.set_k(int(k))

    def on_genes(genes: tuple[str, ...]) -> None:
        ctrl = session.controller
        if ctrl is not None and genes and not getattr(ctrl, "closed", False):
            ctrl.set_genes(list(genes))

    def on_colour_by(name: str) -> None:
        ctrl = session.controller
        if ctrl is not None and not getattr(ctrl, "closed", False):
            ctrl.set_colour_by(name)

    def on_scales(scales: tuple[str, ...]) -> None:
        bad = [s for s in scales if s not in SCALES]
        if bad:
            raise ValueError(f"unknown scales {bad}; expected some of {SCALES}")

    def on_controller(ctrl: Any) -> None:
        # a closed controller leaves the session (nothing keeps it, nor what it drew, alive)
        closing = getattr(ctrl, "closing", None)
        if closing is not None:
            ref = weakref.ref(ctrl)

            def drop() -> None:
                if session.controller is not None and session.controller is ref():
                    session.controller = None

            closing.connect(drop)

    session.events.controller.connect(on_controller)
    session.events.k.connect(on_k)
    session.events.genes.connect(on_genes)
    session.events.colour_by.connect(on_colour_by)
    session.events.scales_shown.connect(on_scales)


def opened_data_path(viewer: Any) -> str:
    """The data folder of the first layer the plugin's readers opened (its ``sdata_path``
    metadata), or ``""``: the default data of the training and check docks."""
    for layer in viewer.layers:
        path = layer.metadata.get("sdata_path") if hasattr(layer, "metadata") else None
        if path:
            return str(path)
    return ""
