"""Checkpoints and run folders: write, validate, load, resume; the one lookup rule.

A checkpoint is a dict of tensors and plain Python values only (``torch.load`` with
``weights_only=True`` reads it: nothing is unpickled that could run code). It holds the
model weights, the training configuration, the node-feature transform, the genes, and —
for an exact resume — optimiser, scheduler, RNG states and the position in the epoch.

Exactness of resume. The data order of an epoch is a permutation drawn from a dedicated
``torch.Generator``; a checkpoint holds that generator's state at the start of the epoch
and the position (micro-batch) inside it, plus the torch / CUDA / numpy / python RNG states
at that position. Checkpoints are only taken at optimiser-step boundaries, so a resumed run
replays exactly the same steps as an uninterrupted one.

Run folders are guarded: a lock file (``<run>/.lock``: pid and host) keeps a second
training process out, a run folder inside a data set is refused, and a full disk is
reported as such, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError, foreign_reason

if TYPE_CHECKING:
    from napari_sigmma.train.config import TrainConfig

CKPT_FORMAT = "napari-sigmma-checkpoint"
CKPT_VERSION = 1
#: File names of a run's checkpoints, in the order a lookup prefers them.
CHECKPOINT_NAMES = ("best.pt", "last.pt")
# Settings that must not change when resuming (they change the data or the model).
RESUME_LOCKED = (
    "data",
    "tile_px",
    "target_mpp",
    "min_tissue",
    "min_cells",
    "graph_method",
    "graph_k",
    "graph_radius_um",
    "graph_micro_blocks",
    "graph_max_dist_um",
    "node_obsm",
    "n_pca",
    "split_block",
    "split_fractions",
    "split_seed",
    "split_by_slide",
    "batch_size",
    "grad_accum",
    "seed",
    "model",
)
# Metadata entries and the types they must have (checked before a checkpoint is used).
_REQUIRED_META: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "config": dict,
    "features": dict,
    "genes": list,
    "n_node_features": int,
    "n_genes": int,
}
_OPTIONAL_META: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "epoch": int,
    "batch": int,
    "global_step": int,
    "steps_per_epoch": int,
    "world_size": int,
    "best": dict,
    "slides": list,
}
# Integer tensors a model state dict may legitimately hold (BatchNorm's step counter,
# index buffers); every other entry must be a finite floating-point tensor.
_INTEGER_SUFFIXES = ("num_batches_tracked", "_index")


# ----------------------------------------------------------------------------- lookup


def resolve_checkpoint(
    path: str | os.PathLike[str],
    *,
    names: tuple[str, ...] = CHECKPOINT_NAMES,
    missing_ok: bool = False,
) -> Path | None:
    """The one rule from a path to a checkpoint file.

    A file is returned as is. A folder is a run folder: the first of ``names`` found in
    ``<folder>/checkpoints/``, then directly in ``<folder>`` (a folder of checkpoints
    copied out of a run). With ``missing_ok`` a folder without one gives ``None``;
    otherwise (and for a missing file) :class:`SigmmaError`.
    """
    p = Path(path)
    if p.is_dir():
        for cand in [p / "checkpoints" / n for n in names] + [p / n for n in names]:
            if cand.is_file():
                return cand
        if missing_ok:
            return None
        which = " or ".join(names)
        raise SigmmaError(f"no checkpoints/{which} in this run folder", path=p)
    if not p.is_file():
        if missing_ok:
            return None
        raise SigmmaError("checkpoint not found", path=p)
    return p


# ----------------------------------------------------------------------------- writing


def _disk_full(err: BaseException) -> bool:
    """True when ``err`` or an exception it came from is ENOSPC / EDQUOT (torch reports a
    full disk as ``RuntimeError: unexpected pos``, with the ``OSError`` as its context)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _short_of_space(err: BaseException, path: str | os.PathLike[str]) -> bool:
    """A write that failed without ENOSPC but on a full disk: numpy reports a short write
    as ``OSError("N requested and M written")`` with no errno; else the file system of
    ``path`` has under 1 MiB free."""
    if isinstance(err, OSError) and err.errno is None and "requested and" in str(err):
        return True
    anc = Path(path).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        return shutil.disk_usage(anc).free < 2**20
    except OSError:
        return False


def write_error(err: BaseException, path: str | os.PathLike[str], what: str) -> SigmmaError:
    """A one-line :class:`SigmmaError` for a failed write of ``what`` to ``path``
    ("disk full" when it was)."""
    if _disk_full(err) or _short_of_space(err, path):
        why = "disk full (no space left on the device)"
    else:
        why = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [""])[0]
        why = why or type(err).__name__
    return SigmmaError(f"cannot write {what}: {why}", path=path)


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into :func:`write_error`'s SigmmaError."""
    try:
        yield
    except OSError as err:
        raise write_error(err, path, what) from err


def fsync_dir(path: Path) -> None:
    """fsync a folder (so a rename inside it survives a power cut)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``.

    A failed write (disk full, read-only or vanished folder) leaves the previous file
    untouched and no temp file, and raises :class:`SigmmaError` naming ``path``.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(err, path, "checkpoint") from err
    fsync_dir(path.parent)
    return path


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temp file and ``os.replace``."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(err, dst, "checkpoint") from err
    fsync_dir(dst.parent)


# ----------------------------------------------------------------------------- run folders


def check_writable_dir(path: str | os.PathLike[str]) -> None:
    """Raise :class:`SigmmaError` unless ``path`` is (or can be created as) a writable folder.

    Nothing is created: the nearest existing ancestor must be a folder that accepts a file
    (a probe temp file, removed at once; ``os.access`` is not enough when running as root).
    """
    import tempfile

    p = Path(path).absolute()
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SigmmaError(f"cannot write here: {anc} is a file, not a folder", path=p)
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as err:
        if _disk_full(err):
            raise write_error(err, p, "the run folder") from err
        raise SigmmaError(f"cannot write here: {err.strerror or err}", path=p) from err


def check_run_dir_outside_data(run: str | os.PathLike[str], data: list[str]) -> None:
    """Refuse a run folder that is a data set given as a folder (a Xenium bundle, a HEST
    folder, a ``.zarr``) or lies inside one: run files would be written into the raw
    data, and a later read of the bundle would see them."""
    r = Path(run).resolve()
    for d in data:
        dp = Path(d).resolve()
        if not dp.is_dir():
            continue  # a single file (a slide, an .h5ad): its folder may hold other things
        if r == dp or dp in r.parents:
            raise SigmmaError(
                f"the run folder is inside the data set {dp}; choose a folder outside it (--out)",
                path=r,
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """``<run>/.lock`` held while a training process works in a run folder.

    The file holds ``{"pid", "host"}``. A second process (or a second run in the same
    process) is refused with a :class:`SigmmaError` naming the holder. A lock left by a
    crash (its pid is not alive on this host) is taken over. A lock from another host
    cannot be checked and is refused; the message says to delete it if no run is active.
    A run folder this lock created and that stays empty is removed on release.
    """

    def __init__(self, run: str | os.PathLike[str]) -> None:
        self.run = Path(run)
        self.path = self.run / ".lock"
        self._created_dir = False
        self._held = False

    def acquire(self) -> RunLock:
        """Take the lock (creating the run folder if needed)."""
        if not self.run.exists():
            with disk_errors(self.run, "the run folder"):
                self.run.mkdir(parents=True)
            self._created_dir = True
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_holder()
                continue  # the holder was stale and its lock removed: try again
            except OSError as err:
                raise write_error(err, self.path, "the run folder's lock") from err
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            self._held = True
            return self
        raise SigmmaError("cannot take the run folder's lock", path=self.path)

    def _check_holder(self) -> None:
        try:
            info = json.loads(self.path.read_text())
            pid, host = int(info["pid"]), str(info["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            # A torn lock file (a crash while writing it): stale.
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        if host == socket.gethostname() and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                self.path.unlink()  # stale: its process is gone
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise SigmmaError(
            f"another training process (pid {pid} on {where}) is using this run folder; "
            f"wait for it or choose another folder (delete {self.path.name} only if no run "
            "is active)",
            path=self.run,
        )

    def release(self) -> None:
        """Remove the lock (and the run folder if this lock created it and it is empty)."""
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run.rmdir()  # only succeeds when empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- reading


def _check_tensor_dict(d: dict, where: str, path: Path, *, integer_ok: bool) -> None:
    import torch

    for k, v in d.items():
        if not isinstance(v, torch.Tensor):
            raise SigmmaError(
                f"invalid checkpoint: {where}[{k!r}] is a {type(v).__name__}, not a tensor",
                path=path,
            )
        if v.is_floating_point():
            if not bool(torch.isfinite(v).all()):
                raise SigmmaError(
                    f"invalid checkpoint: {where}[{k!r}] holds NaN or infinite values",
                    path=path,
                )
        elif not (integer_ok and str(k).endswith(_INTEGER_SUFFIXES)):
            raise SigmmaError(
                f"invalid checkpoint: {where}[{k!r}] is {str(v.dtype).removeprefix('torch.')}, "
                "expected a floating-point tensor",
                path=path,
            )


def validate_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Check a loaded checkpoint before use: metadata of the expected types, model weights
    finite floating-point tensors (integers only for step counters and index buffers),
    node-feature arrays finite. Raises a one-line :class:`SigmmaError` naming ``path``."""
    import torch

    path = Path(path)
    for table, required in ((_REQUIRED_META, True), (_OPTIONAL_META, False)):
        for key, typ in table.items():
            if key not in ckpt:
                if required:
                    raise SigmmaError(f"invalid checkpoint: no {key!r} entry", path=path)
                continue
            v = ckpt[key]
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise SigmmaError(
                    f"invalid checkpoint: {key!r} is a {type(v).__name__}, expected "
                    f"{getattr(typ, '__name__', typ)}",
                    path=path,
                )
    if not all(isinstance(g, str) for g in ckpt["genes"]):
        raise SigmmaError("invalid checkpoint: 'genes' must be names (strings)", path=path)
    if ckpt["n_genes"] != len(ckpt["genes"]) or ckpt["n_node_features"] < 1:
        raise SigmmaError(
            "invalid checkpoint: n_genes / n_node_features do not match the gene list",
            path=path,
        )
    _check_tensor_dict(ckpt["model"], "model", path, integer_ok=True)
    for k, v in ckpt["features"].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if not bool(torch.isfinite(v).all()):
                raise SigmmaError(
                    f"invalid checkpoint: features[{k!r}] holds NaN or infinite values",
                    path=path,
                )
        elif isinstance(v, float) and not math.isfinite(v):
            raise SigmmaError(f"invalid checkpoint: features[{k!r}] is not finite", path=path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary pickles) and
    validate it (:func:`validate_checkpoint`)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SigmmaError("checkpoint not found", path=path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / foreign files
        raise SigmmaError(
            f"cannot load checkpoint ({foreign_reason(err)}); the file is corrupt, "
            "truncated or holds more than plain tensors (refused without running it)",
            path=path,
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise SigmmaError("not a napari-sigmma checkpoint", path=path)
    validate_checkpoint(ckpt, path)
    return ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any] | str | os.PathLike[str], *, path: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """Rebuild ``(SigmmaModel, NodeFeaturizer)`` from a checkpoint (dict or path).

    The backbone is built without downloading weights (its trained/frozen weights are in
    the checkpoint). Weights that do not fit the checkpoint's own model config (another
    backbone's, edited files) raise :class:`SigmmaError` naming ``path``.
    """
    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.models.sigmma import SigmmaModel
    from napari_sigmma.tiles.features import NodeFeaturizer

    if not isinstance(ckpt, dict):
        path = ckpt if path is None else path
        ckpt = load_checkpoint(ckpt)
    try:
        mcfg = ModelConfig.from_dict(dict(ckpt["config"]["model"]))
        # The state dict carries every backbone weight: skip the pretrained load.
        build_cfg = ModelConfig.from_dict(
            {**mcfg.to_dict(), "pretrained": False, "checkpoint": None}
        )
        model = SigmmaModel(build_cfg, int(ckpt["n_node_features"]), int(ckpt["n_genes"]))
        model.cfg = mcfg
        missing, unexpected = _key_mismatch(model.state_dict(), ckpt["model"])
        if missing or unexpected:  # torch would list every key: say how many, show a few
            raise SigmmaError(
                f"checkpoint does not match its model: {len(missing)} weights missing "
                f"(e.g. {missing[0] if missing else '–'}), {len(unexpected)} not expected "
                f"(e.g. {unexpected[0] if unexpected else '–'}); the file was edited or mixes "
                "two models"
            )
        model.load_state_dict(ckpt["model"])
        model.apply_finetune_policy()
        feat = NodeFeaturizer.from_arrays(ckpt["features"])
    except SigmmaError as err:
        raise SigmmaError(err.problem, path=err.path or path) from err
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        why = "; ".join(lines[:2])[:300] or type(err).__name__
        raise SigmmaError(
            f"checkpoint does not match its model ({type(err).__name__}: {why})", path=path
        ) from err
    return model, feat


def graph_settings(cfg: TrainConfig) -> Any:
    """The :class:`~napari_sigmma.tiles.dataset.GraphSettings` of a (checkpoint's) config."""
    from napari_sigmma.tiles.dataset import GraphSettings

    return GraphSettings(
        method=cfg.graph_method,
        k=int(cfg.graph_k),
        radius_um=float(cfg.graph_radius_um),
        max_dist_um=cfg.graph_max_dist_um,
        min_cells=int(cfg.min_cells),
        micro_blocks=bool(cfg.graph_micro_blocks),
    )


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Refuse to resume when a setting of :data:`RESUME_LOCKED` changed (the saved config
    read through :meth:`TrainConfig.from_dict`, so settings added since it was written take
    the values that describe that run)."""
    now = cfg.to_dict()
    try:
        saved = type(cfg).from_dict(dict(saved)).to_dict()
    except SigmmaError:
        pass  # compare the raw dict: any difference refuses the resume below
    diff = [k for k in RESUME_LOCKED if now.get(k) != saved.get(k)]
    if diff:
        raise SigmmaError(
            "cannot resume: the config differs from the checkpoint's in "
            + ", ".join(diff)
            + " (start a new run folder instead)",
            path=path,
        )


# ----------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global state third-party code uses)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a resume must restore, as tensors and plain values."""
    import torch

    np_state = np.random.get_state()  # noqa: NPY002
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [int(py[0]), [int(v) for v in py[1]], py[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _key_mismatch(want: dict[str, Any], have: Any) -> tuple[list[str], list[str]]:
    """Weight names the model needs but the file lacks, and names it has but the model
    does not need (both sorted)."""
    have_keys = set(have) if isinstance(have, dict) else set()
    return sorted(set(want) - have_keys), sorted(have_keys - set(want))
