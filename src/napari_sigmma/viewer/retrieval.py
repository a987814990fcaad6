"""SIGMMA retrieval widget: click an H&E tile → the tiles whose transcriptomics match it
(HE→ST), or select cells → the tiles whose histology matches them (ST→HE).

The widget is thin: embeddings, indices, queries and summaries live in
:mod:`napari_sigmma.retrieval.query`. Embeddings come from the live engine
(:class:`~napari_sigmma.live.engine.EmbeddingEngine`): the one the main dock's live view
uses (``Use live model``), or one built here from a checkpoint. ``Encode whole slide`` encodes
every tile in a worker (cached tiles cost nothing); tiles the live view encodes are picked up
as they are shown. Each slide's embeddings are saved as ``retrieval.npz`` in the engine's
disk-cache folder (next to the per-tile cache), so a second session starts with them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io import slide_name
from napari_sigmma.retrieval.index import IVF_MIN_SIZE
from napari_sigmma.retrieval.query import (
    RETRIEVAL_FILE,
    Match,
    RetrievalStore,
    SlideEmbeddings,
    cells_in_polygon,
    composition,
    format_pairs,
    tile_of_cells,
    top_genes,
)
from napari_sigmma.viewer.session import session_for
from napari_sigmma.viewer.tasks import TaskRunner

if TYPE_CHECKING:
    import napari

    from napari_sigmma.live.engine import EmbeddingEngine

RESULTS_LAYER = "SIGMMA retrieval"
#: the columns a user reads first come first; locations in napari's axis order
COLUMNS = (
    "rank",
    "similarity",
    "percentile",
    "cell types",
    "top genes",
    "slide",
    "location y, x (µm)",
)
COL = {name: i for i, name in enumerate(COLUMNS)}
QUERY_COLOUR = "#ffd400"
MATCH_COLOUR = "#00e5ff"
NO_ENGINE_TEXT = (
    "No model: turn on the live view in the SIGMMA dock and press 'Use live model', or load "
    "a checkpoint here."
)


def find_live_controller(viewer: Any) -> Any | None:
    """The :class:`~napari_sigmma.viewer.controller.LiveController` of the viewer's live
    view (from its :class:`~napari_sigmma.viewer.session.Session`), if it runs."""
    from napari_sigmma.viewer.session import session_for

    ctrl = session_for(viewer).controller
    if ctrl is None or getattr(ctrl, "engine", None) is None or getattr(ctrl, "closed", False):
        return None
    return ctrl


def _load_engine(checkpoint: str, sdata_path: str, device: str, cancel: Any = None) -> Any:
    """Worker: the run's engine on the slide at ``sdata_path`` (disk cache next to the data);
    ``cancel`` is checked between the steps."""
    from napari_sigmma.errors import check_cancel
    from napari_sigmma.io import load_any
    from napari_sigmma.live.cache import default_cache_root
    from napari_sigmma.live.run import load_live_run
    from napari_sigmma.tiles.paired import PairedSlide

    run = load_live_run(checkpoint, cancel=cancel)
    paired = PairedSlide.from_sdata(
        load_any(sdata_path, cancel=cancel), name=slide_name(sdata_path)
    )
    check_cancel(cancel)
    return run, run.engine(paired, device=device, cache_dir=default_cache_root(sdata_path))


def _reference_steps(engine: Any, path: str, cancel: threading.Event):
    """Worker generator: read the reference slide at ``path``, grid it like ``engine``'s
    slide and encode every tile with ``engine``'s model, yielding ``(text, done, total)``
    per batch; returns ``(name, paired, grid, results)``. A set ``cancel`` stops it between
    batches (raising :class:`~napari_sigmma.errors.Cancelled`)."""
    from napari_sigmma.errors import check_cancel
    from napari_sigmma.io import load_any
    from napari_sigmma.live.cache import default_cache_root
    from napari_sigmma.live.engine import EmbeddingEngine
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide

    yield f"Reading reference {path}…", 0, 0
    paired = PairedSlide.from_sdata(load_any(path, cancel=cancel), name=slide_name(path))
    g = engine.grid
    grid = make_tile_grid(paired, tile_px=g.tile_px, target_mpp=g.target_mpp)
    check_cancel(cancel)
    ref = EmbeddingEngine(
        engine.model, paired, grid, featurizer=engine.featurizer,
        graph_settings=engine.graph_settings, device=engine.device,
        cache_dir=default_cache_root(path), checkpoint_hash=engine.checkpoint_hash,
        batch_size=engine.batch_size, attention=False, run=engine.run,
    )  # fmt: skip
    ids = list(grid.tile_ids)
    results: list[Any] = []
    yield f"Encoding reference {paired.name}: 0 / {len(ids)} tiles", 0, len(ids)
    for batch in ref.encode(ids, cancel):
        results.extend(batch)
        yield (
            f"Encoding reference {paired.name}: {len(results)} / {len(ids)} tiles",
            len(results),
            len(ids),
        )
    check_cancel(cancel)
    return paired.name, paired, grid, results


def _encode_all(
    engine: Any,
    cancel: threading.Event,
    store: RetrievalStore,
    name: str,
    index_scales: list[str] | None = None,
):
    """Worker generator: every tile of ``engine``'s grid, added to ``store`` as slide
    ``name`` batch by batch, yielding ``(results, done, total)``; then, with
    ``index_scales``, the search indices of those scales are built here (in the worker) when
    due, after a ``(None, done, total)`` item, so the first query finds them built."""
    ids = list(engine.grid.tile_ids)
    done = 0
    for batch in engine.encode(ids, cancel):
        done += len(batch)
        store.add_results(name, engine.paired, engine.grid, batch)
        yield batch, done, len(ids)
    if index_scales and store.needs_build(scales=index_scales):
        yield None, done, len(ids)
        store.prepare(cancel, scales=index_scales)


class RetrievalWidget(QWidget):
    """Dock widget for HE→ST and ST→HE tile retrieval.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    ivf_min_size
        Embeddings from which the search uses an IVF (built in a worker thread, never by a
        query: until it is built, queries search exactly).
    """

    #: ``(text, done, total)`` after each batch of a whole-slide or reference encoding
    progressed = Signal(str, int, int)

    def __init__(
        self, napari_viewer: napari.viewer.Viewer, *, ivf_min_size: int | None = IVF_MIN_SIZE
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # queries never build an IVF (seconds at 1M tiles) on the GUI thread: workers do
        self._ivf_min_size = ivf_min_size
        self.store = RetrievalStore(ivf_min_size=ivf_min_size, build_in_query=False)
        self._prepare_worker: Any = None
        self.engine: EmbeddingEngine | None = None
        self.image_layer: Any = None
        self.slide_name = ""
        self.run: Any = None
        self.matches: list[Match] = []
        self.context: SimilarityContext | None = None  # all candidates of the last query
        self.last_query: dict[str, Any] = {}
        self._controller: Any = None
        self.session = session_for(napari_viewer)

        self.setObjectName("sigmma-retrieval")
        self.status = QLabel(NO_ENGINE_TEXT)
        self.status.setWordWrap(True)
        self.use_live = QPushButton("Use live model")
        self.use_live.clicked.connect(self.attach_live)
        self.load_button = QPushButton("Load checkpoint…")
        self.load_button.clicked.connect(self._choose_checkpoint)
        self.scale = QComboBox()
        self.scale.addItems(["micro", "meso", "macro"])
        self.scale.setCurrentText(self.session.scale)  # what the live view shows
        self.scale.currentTextChanged.connect(self._on_scale_box)
        self.session.events.scale.connect(self._on_session_scale)
        # following the live view: a new live view (another model) is followed too
        self._follow_live = False
        self.session.events.controller.connect(self._on_session_controller)
        self.scale.setToolTip("Embedding scale compared (the contrastive loss aligns each)")
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 100)
        self.top_k.setValue(5)
        self.encode_button = QPushButton("Encode whole slide")
        self.encode_button.setToolTip("Encode every tile so that queries search all of them")
        self.encode_button.clicked.connect(lambda: self.encode_all())
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the whole-slide or reference encoding")
        self.ref_button = QPushButton("Add reference slide…")
        self.ref_button.setToolTip(
            "A Xenium bundle or SpatialData .zarr, encoded with the same model; its tiles are "
            "searched too"
        )
        self.ref_button.clicked.connect(self._choose_reference)
        self.cells_button = QPushButton("Selected cells → matching H&&E tiles")
        self.cells_button.setToolTip(
            "Draw a polygon / lasso on a Shapes layer over the cells (or select points of the "
            "cells layer), then press: the ST embedding of the tile holding most selected "
            "cells is compared with the H&E embeddings of every tile"
        )
        self.cells_button.clicked.connect(lambda: self.query_selection())
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.cellClicked.connect(lambda row, _col: self.go_to(row))
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.horizontalHeaderItem(COL["percentile"]).setToolTip(
            "Share of all candidate tiles (every indexed tile of every slide) that are less "
            "similar to the query than this match: 99 = better than 99 % of them"
        )

        form = QFormLayout()
        form.addRow("Scale", self.scale)
        form.addRow("Top k", self.top_k)
        buttons = QHBoxLayout()
        buttons.addWidget(self.use_live)
        buttons.addWidget(self.load_button)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>SIGMMA retrieval</b> — click a tile of the H&amp;E"))
        layout.addLayout(buttons)
        layout.addLayout(form)
        layout.addWidget(self.encode_button)
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.cancel_button)
        layout.addLayout(progress_row)
        layout.addWidget(self.ref_button)
        layout.addWidget(self.cells_button)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)
        # load / encode / reference / index workers: one runner (progress, Cancel, wait)
        self.tasks = TaskRunner(
            progress_bar=self.progress, cancel_button=self.cancel_button, label=self.status
        )
        self.tasks.progressed.connect(self.progressed)
        from napari_sigmma.viewer.tasks import watch_window_close

        # closing the napari window mid-encode cancels the workers and waits for them
        self._close_filter = watch_window_close(self, self._on_window_close)

    # -- set-up ------------------------------------------------------------------------------
    @property
    def _closed(self) -> bool:
        return self.tasks.closed

    def _say(self, text: str) -> None:
        if not self._closed:
            self.status.setText(text)

    def _on_window_close(self) -> None:
        self.close_workers()

    def _on_scale_box(self, scale: str) -> None:
        self.session.scale = scale

    def _on_session_scale(self, scale: str) -> None:
        if self.scale.currentText() != scale:
            self.scale.setCurrentText(scale)

    def attach_live(self) -> bool:
        """Use the engine of the SIGMMA dock's live view (and follow its new tiles, and the
        next live view when the model changes)."""
        ctrl = find_live_controller(self.viewer)
        if ctrl is None:
            self._say(NO_ENGINE_TEXT)
            return False
        if self._controller is not None and self._controller is not ctrl:
            try:
                self._controller.shown.disconnect(self._on_live_shown)
            except (RuntimeError, TypeError):
                pass
        self.set_engine(ctrl.engine, ctrl.image_layer)
        self._controller = ctrl
        self._follow_live = True
        ctrl.shown.connect(self._on_live_shown)
        return True

    def _on_session_controller(self, ctrl: Any) -> None:
        if ctrl is not None and self._follow_live and ctrl is not self._controller:
            self.attach_live()

    def _on_live_shown(self, tile_ids: list[str]) -> None:
        """Tiles the live view drew: add their embeddings (cache lookups, no encoding)."""
        if self.engine is None:
            return
        results = [r for t in tile_ids if (r := self.engine.lookup(t)) is not None]
        if results:
            self.store.add_results(self.slide_name, self.engine.paired, self.engine.grid, results)

    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "SIGMMA checkpoint", "", "PyTorch checkpoints (*.pt *.pth)"
        )
        if path:
            self.load_checkpoint(path)

    def load_checkpoint(self, checkpoint: str, *, device: str = "auto") -> Any:
        """Build an engine for the plugin's H&E layer from ``checkpoint`` (in a worker)."""
        from napari_sigmma.viewer.dock import find_he_layer

        layer = find_he_layer(self.viewer)
        if layer is None:
            self._say("Open a slide with this plugin first (it needs the cells of the slide).")
            return None
        self._say("Loading the model and the slide…")

        def ready(out: tuple[Any, Any]) -> None:
            self.run = out[0]
            self.set_engine(out[1], layer)

        task = self.tasks.start(
            _load_engine,
            checkpoint,
            layer.metadata["sdata_path"],
            device,
            on_done=ready,
            on_error=lambda err: self._say(f"Could not load: {err}"),
        )
        return task.worker

    @property
    def busy(self) -> bool:
        """True while a load / encode / reference worker runs or its end is not yet
        handled (on the main thread)."""
        return self.tasks.busy

    def cancel(self) -> None:
        """Stop every running worker at its next batch (what the Cancel button does)."""
        self.tasks.cancel()

    def set_engine(
        self, engine: EmbeddingEngine, image_layer: Any, *, slide_name: str | None = None
    ) -> None:
        """Query with ``engine``; clicks on ``image_layer`` (the slide's H&E) start queries.

        Embeddings saved by an earlier session (``retrieval.npz`` in the engine's disk-cache
        folder) and those already in the engine's memory are loaded at once.
        """
        self._unhook_click()
        old = getattr(self.engine, "checkpoint_hash", None)
        if self.engine is not None and old != getattr(engine, "checkpoint_hash", None):
            # another model: the embeddings and the last matches describe the old one
            self.store = RetrievalStore(ivf_min_size=self._ivf_min_size, build_in_query=False)
            self.matches, self.context, self.last_query = [], None, {}
            self.table.setRowCount(0)
        self.engine = engine
        self.image_layer = image_layer
        self.slide_name = slide_name or engine.paired.name
        se = self.store.ensure_slide(self.slide_name, engine.paired, engine.grid)
        saved = self._saved_path()
        if saved is not None and saved.is_file():
            try:
                old = SlideEmbeddings.load(saved, engine.paired, engine.grid)
                for s in old.he:
                    se.he[s].update({k: v for k, v in old.he[s].items() if k not in se.he[s]})
                    se.st[s].update({k: v for k, v in old.st[s].items() if k not in se.st[s]})
            except SigmmaError:
                pass  # a damaged file: re-encode
        self.store.add_results(self.slide_name, engine.paired, engine.grid, engine.memory_results())
        # a viewer-level callback: clicks work whatever layer is selected
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        self._say(
            f"Model ready; {len(se)} of {len(engine.grid)} tiles of {self.slide_name} encoded. "
            "Click a tile of the H&E."
        )
        self.prepare_index()  # saved embeddings may be many

    def _saved_path(self) -> Path | None:
        disk = getattr(self.engine, "disk", None)
        return None if disk is None else Path(disk.folder) / RETRIEVAL_FILE

    def save(self) -> Path | None:
        """Write the loaded slide's embeddings next to the engine's disk cache."""
        path = self._saved_path()
        if path is None or self.slide_name not in self.store.slides:
            return None
        return self.store.slide(self.slide_name).save(path)

    # -- encoding ------------------------------------------------------------------------------
    def encode_all(self, *, blocking: bool = False) -> Any:
        """Encode every tile of the slide (worker with progress; ``blocking``: here, now)."""
        if self.engine is None:
            self._say(NO_ENGINE_TEXT)
            return None
        eng = self.engine
        if blocking:  # the index is built by the worker the next query starts
            for item in _encode_all(eng, threading.Event(), self.store, self.slide_name):
                self._on_encoded(item)
            self._encoded_done()
            return None
        store, name, scales = self.store, self.slide_name, self._scale_order()

        def job(cancel: threading.Event):
            yield from _encode_all(eng, cancel, store, name, scales)

        self.encode_button.setEnabled(False)
        task = self.tasks.start(
            job,
            on_yield=self._on_encoded,
            on_error=lambda err: self._say(f"Encoding failed: {err}"),
            on_finished=self._encoded_done,
        )
        self.progress.setRange(0, len(eng.grid))  # (progressed: from the first batch on)
        self.progress.setValue(0)
        self._say("Encoding the whole slide…")
        return task.worker

    def _on_encoded(self, item: tuple[list[Any] | None, int, int]) -> None:
        """Progress of an encoding worker (it adds the results to the store itself)."""
        if self._closed:
            return
        batch, done, total = item
        if batch is None:  # all encoded; the worker builds the search index now
            self.tasks.report(f"Encoded {done} / {total} tiles; building the search index…",
                              0, 0)  # fmt: skip
            return
        self.tasks.report(f"Encoded {done} / {total} tiles", done, total)

    def _encoded_done(self) -> None:
        if self._closed:
            return
        self.encode_button.setEnabled(True)
        self.save()
        n = len(self.store.slide(self.slide_name)) if self.slide_name in self.store.slides else 0
        self._say(f"{n} tiles of {self.slide_name} encoded and indexed.")

    def _choose_reference(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Reference Xenium bundle or .zarr")
        if path:
            self.add_reference(path)

    def add_reference(self, path: str, *, blocking: bool = False) -> Any:
        """Encode a reference slide with the same model (worker with progress; Cancel stops
        it between batches and nothing is added) and add it to the search.

        Returns the worker, or (``blocking``) the name the slide is indexed under.
        """
        if self.engine is None:
            self._say(NO_ENGINE_TEXT)
            return None
        eng = self.engine

        def done(out: tuple[str, Any, Any, list[Any]]) -> str:
            name, paired, grid, results = out
            if name == self.slide_name:
                name = f"{name} (reference)"
            self.store.add_results(name, paired, grid, results)
            self._say(f"Reference slide {name}: {len(results)} tiles indexed.")
            self.prepare_index()
            return name

        if blocking:
            steps = _reference_steps(eng, path, threading.Event())
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    return done(stop.value)
        self._say(f"Encoding reference {path}…")
        task = self.tasks.start(
            _reference_steps,
            eng,
            path,
            on_done=done,
            on_error=lambda err: self._say(f"Reference failed: {err}"),
        )
        return task.worker

    def _scale_order(self) -> list[str]:
        """Scales, the one queried now first (its indices are built first)."""
        cur = self.scale.currentText()
        return [cur, *(s for s in ("micro", "meso", "macro") if s != cur)]

    def prepare_index(self) -> Any:
        """Build the search indices that are due (an IVF from ``ivf_min_size`` embeddings on,
        or after the index doubled) in a worker thread, the queried scale first; Cancel
        stops it. Returns the worker, or ``None`` when nothing is due or one already runs.
        Queries meanwhile search exactly (or the previous IVF); none waits for it."""
        if self._closed or self._prepare_worker is not None or not self.store.needs_build():
            return None
        store, scales = self.store, self._scale_order()

        def build(cancel: threading.Event) -> float:
            return store.prepare(cancel, scales=scales)

        def ended() -> None:
            self._prepare_worker = None

        task = self.tasks.start(
            build,
            on_error=lambda err: self._say(f"Indexing failed: {err}"),
            on_finished=ended,
            show=False,
        )
        self._prepare_worker = task.worker
        return task.worker

    # -- queries -------------------------------------------------------------------------------
    def _on_click(self, viewer: Any, event: Any):
        """Viewer mouse callback: a click (press and release without a drag) queries the
        tile under the cursor, whatever layer is selected, unless the selected layer is in
        an editing mode (drawing, adding points) where a click means something else. The
        layer selection is left as it was."""
        active = viewer.layers.selection.active
        if active is not None and str(getattr(active, "mode", "pan_zoom")) not in (
            "pan_zoom", "transform", "Mode.PAN_ZOOM",
        ):  # fmt: skip
            return
        if getattr(event, "button", 1) != 1 or getattr(event, "modifiers", ()):
            return
        position = tuple(event.position)
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            try:
                self.query_at_world(position)
            except SigmmaError as err:
                self._say(str(err))

    def world_to_px(self, position: Any) -> tuple[float, float]:
        """A world position → level-0 H&E pixel ``(x, y)``."""
        data = np.asarray(self.image_layer.world_to_data(position), dtype=float)
        return float(data[-1]), float(data[-2])

    def query_at_world(self, position: Any) -> list[Match]:
        """HE→ST for the tile under a world ``position`` (µm of the H&E)."""
        if self.engine is None:
            raise SigmmaError(NO_ENGINE_TEXT)
        x, y = self.world_to_px(position)
        idx = int(self.engine.grid.locate(np.array([[x, y]]))[0])
        if idx < 0:
            raise SigmmaError("no tile there (outside the tissue grid)")
        return self.query_tile(idx)

    def _ensure_encoded(self, tile_indices: list[int]) -> None:
        """Encode (now, on this thread) the few tiles a query needs that are not indexed."""
        se = self.store.slide(self.slide_name)
        scale = self.scale.currentText()
        todo = [self.engine.grid.tile_ids[i] for i in tile_indices if i not in se.he[scale]]
        eng = self.engine
        for batch in eng.encode(todo):
            self.store.add_results(self.slide_name, eng.paired, eng.grid, batch)

    def query_tile(self, tile_index: int) -> list[Match]:
        """HE→ST: the clicked tile's HE embedding against the ST embeddings of every
        indexed tile (all slides)."""
        self._ensure_encoded([tile_index])
        scale, k = self.scale.currentText(), int(self.top_k.value())
        matches = self.store.query_he_to_st(self.slide_name, tile_index, scale, k=k)
        self.last_query = {"direction": "he→st", "tile_index": int(tile_index), "scale": scale}
        query = self.store.slide(self.slide_name).vector("he", scale, tile_index)
        ctx = self.context = SimilarityContext.of(
            self.store, query, "st", scale, partner=(self.slide_name, int(tile_index))
        )
        self.show_matches(matches, query_tiles=[tile_index])
        self.prepare_index()  # the query searched exactly if the IVF was due: build it now
        self._say(
            f"H&E tile {self.engine.grid.tile_ids[tile_index]} → top {len(matches)} of "
            f"{ctx.n} ST tiles ({scale}). {ctx.partner_text('ST')}"
        )
        return matches

    def selected_cells(self) -> np.ndarray:
        """Cells (table rows) selected in the viewer: inside the shapes of the selected
        Shapes layer (its selected shapes, else all), or the selected points of a cells layer."""
        from napari.layers import Points, Shapes

        layers = [ly for ly in self.viewer.layers.selection] or [self.viewer.layers[-1]]
        for layer in layers:
            if isinstance(layer, Shapes) and layer.name != RESULTS_LAYER and len(layer.data):
                which = sorted(layer.selected_data) or range(len(layer.data))
                rows = [self._cells_in_shape(layer, layer.data[i]) for i in which]
                return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
            if isinstance(layer, Points) and layer.selected_data:
                sel = np.array(sorted(layer.selected_data), dtype=np.int64)
                index = layer.metadata.get("obs_index")
                return np.asarray(index)[sel] if index is not None else sel
        return np.zeros(0, np.int64)

    def _cells_in_shape(self, layer: Any, verts: np.ndarray) -> np.ndarray:
        world = np.array([layer.data_to_world(v) for v in np.asarray(verts)])
        px = np.array([self.world_to_px(w) for w in world])
        return cells_in_polygon(self.engine.paired, px)

    def query_cells(self, cells: np.ndarray) -> list[Match]:
        """ST→HE: the ST embedding of the tile holding most of ``cells`` against the HE
        embeddings of every indexed tile."""
        if self.engine is None:
            raise SigmmaError(NO_ENGINE_TEXT)
        cells = np.asarray(cells, dtype=np.int64)
        if cells.size == 0:
            raise SigmmaError("no cells selected: draw a shape over cells, or select points")
        from napari_sigmma.retrieval.query import cell_tiles

        loc = cell_tiles(self.engine.paired, self.engine.grid)[cells]
        self._ensure_encoded(sorted({int(t) for t in loc if t >= 0}))
        scale, k = self.scale.currentText(), int(self.top_k.value())
        se = self.store.slide(self.slide_name)
        tile = tile_of_cells(self.engine.paired, self.engine.grid, cells, has_st=se.st[scale])
        matches = self.store.query_st_to_he(self.slide_name, tile, scale, k=k)
        self.last_query = {
            "direction": "st→he", "tile_index": tile, "scale": scale, "n_cells": int(cells.size)
        }  # fmt: skip
        query = se.vector("st", scale, tile)
        ctx = self.context = SimilarityContext.of(
            self.store, query, "he", scale, partner=(self.slide_name, int(tile))
        )
        self.show_matches(matches, query_tiles=[tile])
        self.prepare_index()
        self._say(
            f"{cells.size} cells → ST of tile {self.engine.grid.tile_ids[tile]} → top "
            f"{len(matches)} of {ctx.n} H&E tiles ({scale}). {ctx.partner_text('H&E')}"
        )
        return matches

    def query_selection(self) -> list[Match]:
        """ST→HE for the current selection (button)."""
        try:
            return self.query_cells(self.selected_cells())
        except SigmmaError as err:
            self._say(str(err))
            return []

    # -- display ---------------------------------------------------------------------------------
    def _results_layer(self) -> Any:
        from napari.layers import Shapes

        for layer in self.viewer.layers:
            if layer.name == RESULTS_LAYER:
                return layer
        il = self.image_layer
        layer = Shapes(
            name=RESULTS_LAYER,
            scale=tuple(il.scale[-2:]),
            translate=tuple(il.translate[-2:]),
            units=tuple(il.units[-2:]),
            metadata={
                "sigmma_kind": "retrieval",
                **self._provenance(),
                "slide": self.slide_name,
            },
        )
        with keep_selection(self.viewer):
            self.viewer.add_layer(layer)
        return layer

    def _provenance(self) -> dict[str, str]:
        """The run and checkpoint hash of the model the matches come from."""
        prov = getattr(self.engine, "provenance", None)
        if not callable(prov):
            return {}
        return {k: v for k, v in prov().items() if k != "slide"}  # slide: the widget's name

    def show_matches(self, matches: list[Match], *, query_tiles: list[int]) -> None:
        """Outline the query tile(s) and the matches on this slide; fill the table."""
        self.matches = list(matches)
        layer = self._results_layer()
        grid = self.engine.grid
        rects, edge, text = [], [], []
        for t in query_tiles:
            x0, y0, x1, y1 = (float(v) for v in grid.bounds[t])
            rects.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]))
            edge.append(QUERY_COLOUR)
            text.append("query")
        for m in matches:
            if m.slide != self.slide_name:
                continue
            x0, y0, x1, y1 = m.box_px
            pad = 0.04 * (x1 - x0)  # inset, so that a match on the query tile stays visible
            rects.append(
                np.array([[y0 + pad, x0 + pad], [y0 + pad, x1 - pad], [y1 - pad, x1 - pad],
                          [y1 - pad, x0 + pad]])
            )  # fmt: skip
            edge.append(MATCH_COLOUR)
            pct = self.context.percentile(m.similarity) if self.context else None
            text.append(
                f"{m.rank}: {m.similarity:.2f}" + (f" ({pct:.0f}th pct)" if pct is not None else "")
            )
        layer.data = []
        if rects:
            layer.add_rectangles(
                rects, edge_color=edge, face_color="transparent",
                edge_width=max(grid.tile_size * 0.02, 1.0),
            )  # fmt: skip
            layer.features = {"label": text}
            layer.text = {"string": "{label}", "color": "white", "size": 10, "anchor": "upper_left"}
        layer.metadata["matches"] = [(m.slide, m.tile_id, m.similarity) for m in matches]
        layer.metadata.update(self._provenance())  # a reused layer: the model of these
        self._fill_table(matches)

    def _fill_table(self, matches: list[Match]) -> None:
        self.table.setRowCount(len(matches))
        for row, m in enumerate(matches):
            se = self.store.slides[m.slide]
            comp = genes = "—"
            if se.paired is not None and se.grid is not None:
                comp = format_pairs(composition(se.paired, se.grid, m.tile_index), percent=True)
                genes = format_pairs(top_genes(se.paired, se.grid, m.tile_index, n=5))
            pct = self.context.percentile(m.similarity) if self.context else None
            values = (
                str(m.rank),
                f"{m.similarity:.3f}",
                "—" if pct is None else f"{pct:.1f}",
                comp,
                genes,
                m.slide,
                f"{m.center_um[1]:.0f}, {m.center_um[0]:.0f}",  # (y, x) as napari shows it
            )
            for col, v in enumerate(values):
                item = QTableWidgetItem(v)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                self.table.setItem(row, col, item)
        self.table.resizeColumnsToContents()

    def go_to(self, row: int) -> None:
        """Centre the camera on the match of table ``row`` (this slide only)."""
        if not 0 <= row < len(self.matches):
            return
        m = self.matches[row]
        if m.slide != self.slide_name:
            self._say(f"{m.tile_id} is on reference slide {m.slide}: open it to look there.")
            return
        x0, y0, x1, y1 = m.box_px
        centre = np.array([(y0 + y1) / 2, (x0 + x1) / 2])
        world = np.asarray(self.image_layer.data_to_world(centre), dtype=float)
        cam = self.viewer.camera
        cam.center = (*tuple(cam.center)[: len(cam.center) - 2], *world[-2:])

    # -- shutdown ------------------------------------------------------------------------------
    def close_workers(self, timeout: float = 30.0) -> None:
        """Cancel running workers and wait for them (at most ``timeout`` s in all), and
        stop listening to clicks (the viewer must not keep this widget alive)."""
        self.tasks.close(timeout)
        self._unhook_click()
        self._prepare_worker = None
        if self._controller is not None:
            try:
                self._controller.shown.disconnect(self._on_live_shown)
            except (RuntimeError, TypeError):
                pass
            self._controller = None
        self.session.events.scale.disconnect(self._on_session_scale)
        self.session.events.controller.disconnect(self._on_session_controller)
        self._follow_live = False

    def closeEvent(self, event: Any) -> None:
        self.close_workers()
        self._unhook_click()
        super().closeEvent(event)

    def _unhook_click(self) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if self._on_click in callbacks:
            callbacks.remove(self._on_click)


class keep_selection:
    """Restore the viewer's layer selection (and active layer) on exit: adding a layer
    selects it, and the plugin must not change what the user selected."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer

    def __enter__(self) -> None:
        sel = self.viewer.layers.selection
        self.before, self.active = set(sel), sel.active

    def __exit__(self, *exc: Any) -> None:
        sel = self.viewer.layers.selection
        layers = set(self.viewer.layers)
        keep = {ly for ly in self.before if ly in layers}
        if self.active is not None and self.active in layers:
            sel.active = self.active
        else:
            sel.clear()
        sel.update(keep)


class SimilarityContext:
    """Every candidate's similarity to one query, so that a match's similarity can be
    judged: its percentile among all candidates and where the query tile's own partner
    (the other modality of the same tile) ranks.

    Parameters
    ----------
    sims
        Cosine similarity of every candidate (sorted ascending).
    partner_sim
        Similarity of the query tile's own partner (``None`` when it has none).
    """

    #: above this many candidates a random sample estimates the percentiles
    MAX_CANDIDATES = 200_000

    def __init__(self, sims: np.ndarray, partner_sim: float | None) -> None:
        self.sims = np.sort(np.asarray(sims, dtype=np.float64))
        self.partner_sim = partner_sim

    @property
    def n(self) -> int:
        return int(self.sims.size)

    @classmethod
    def of(
        cls,
        store: RetrievalStore,
        query: np.ndarray | None,
        target: str,
        scale: str,
        *,
        partner: tuple[str, int] | None = None,
    ) -> SimilarityContext | None:
        """The context of ``query`` against every ``target`` embedding at ``scale``."""
        if query is None:
            return None
        vecs, partner_vec = [], None
        for name, se in list(store.slides.items()):
            table = (se.he if target == "he" else se.st).get(scale, {})
            if table:
                vecs.append(np.stack(list(table.copy().values())))
            if partner is not None and name == partner[0]:
                partner_vec = table.get(partner[1])
        if not vecs:
            return None
        m = np.concatenate(vecs).astype(np.float32, copy=False)
        if len(m) > cls.MAX_CANDIDATES:
            rng = np.random.default_rng(0)
            m = m[rng.choice(len(m), cls.MAX_CANDIDATES, replace=False)]
        q = np.asarray(query, np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        sims = (m @ q) / np.maximum(np.linalg.norm(m, axis=1), 1e-12)
        psim = None
        if partner_vec is not None:
            pv = np.asarray(partner_vec, np.float32)
            psim = float(pv @ q / max(float(np.linalg.norm(pv)), 1e-12))
        return cls(sims, psim)

    def percentile(self, sim: float) -> float:
        """Percent of the candidates less similar than ``sim``."""
        if not self.n:
            return float("nan")
        return 100.0 * float(np.searchsorted(self.sims, sim - 1e-6, side="left")) / self.n

    def rank(self, sim: float) -> int:
        """1-based rank ``sim`` would have among the candidates."""
        return 1 + int(self.n - np.searchsorted(self.sims, sim + 1e-6, side="right"))

    def partner_text(self, modality: str) -> str:
        if self.partner_sim is None:
            return ""
        s = self.partner_sim
        return (
            f"The tile's own {modality} partner ranks {self.rank(s)} of {self.n} "
            f"(similarity {s:.3f}, {self.percentile(s):.1f}th percentile)."
        )


def save_retrieval_screenshot(viewer: Any, path: str, *, canvas_only: bool = True) -> Path:
    """Save a screenshot of the viewer showing the retrieval results (zoomed to the query
    and its matches on this slide when there is a ``SIGMMA retrieval`` layer)."""
    layer = next((ly for ly in viewer.layers if ly.name == RESULTS_LAYER), None)
    if layer is not None and len(layer.data):
        pts = np.concatenate([np.asarray(d) for d in layer.data])
        world = np.array([layer.data_to_world(p) for p in pts])[:, -2:]
        lo, hi = world.min(axis=0), world.max(axis=0)
        cam = viewer.camera
        cam.center = (*tuple(cam.center)[: len(cam.center) - 2], *((lo + hi) / 2))
        size = np.asarray(viewer.canvas.size if hasattr(viewer, "canvas") else (600, 800), float)
        span = np.maximum(hi - lo, 1e-6) * 1.15
        cam.zoom = float(np.min(size / span))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=canvas_only)
    return out
