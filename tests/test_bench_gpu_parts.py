"""Pieces of ``bench --gpu`` that run anywhere: the in-memory slide, the device helpers,
the peak table and the parity comparisons."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sigmma.errors import SigmmaError


def test_paired_from_arrays_reads_tiles_without_spatialdata() -> None:
    from napari_sigmma.tiles.grid import make_tile_grid, read_tile
    from napari_sigmma.tiles.paired import ArrayImage, PairedSlide

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    cells = np.array([[10.0, 20.0], [300.0, 400.0], [700.0, 100.0]])
    counts = np.array([[1, 0], [0, 2], [3, 1]], np.float32)
    p = PairedSlide.from_arrays(img, 0.5, cells, counts, ["A", "B"], name="mem")
    assert isinstance(p.image, ArrayImage)
    assert p.image.shape == (512, 768) and p.n_cells == 3 and p.genes == ["A", "B"]
    grid = make_tile_grid(p, tile_px=256, target_mpp=0.5, min_tissue=0.0)
    assert len(grid) == 6  # 2 rows × 3 columns of whole 256 px tiles
    i = 4  # row 1, column 1
    x0, y0 = (int(v) for v in grid.bounds[i][:2])
    np.testing.assert_array_equal(read_tile(p, grid, i), img[y0 : y0 + 256, x0 : x0 + 256])
    h = p.content_hash()
    assert h == PairedSlide.from_arrays(img, 0.5, cells, counts, ["A", "B"]).content_hash()
    img2 = img.copy()
    img2[::2, ::2] = 0
    assert h != PairedSlide.from_arrays(img2, 0.5, cells, counts, ["A", "B"]).content_hash()
    with pytest.raises(SigmmaError):
        PairedSlide.from_arrays(img, 0.5, cells, counts, ["A"])  # 2 columns, 1 gene
    with pytest.raises(SigmmaError):
        PairedSlide.from_arrays(img[..., 0], 0.5, cells, counts, ["A", "B"])


def test_device_helpers_on_cpu() -> None:
    import torch

    from napari_sigmma.device import float32_region, pinned, to_device

    cpu = torch.device("cpu")
    x = torch.arange(6.0)
    assert to_device(x, cpu) is x or torch.equal(to_device(x, cpu), x)
    assert pinned(x) is x or not torch.cuda.is_available()
    lin = torch.nn.Linear(4, 4)
    inp = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(inp).dtype == torch.bfloat16
        with float32_region(cpu):
            assert lin(inp).dtype == torch.float32


def test_graph_encoder_stays_float32_under_autocast() -> None:
    import torch

    from napari_sigmma.bench.gpu_data import bench_data
    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.models.sigmma import SigmmaModel

    d = bench_data(512)
    cfg = ModelConfig(backbone="vit_tiny", pretrained=False, img_size=32, embed_dim=32)
    torch.manual_seed(0)
    m = SigmmaModel(cfg, d.featurizer.n_features, len(d.featurizer.genes)).eval()
    g = d.graphs(d.tiles(2))
    with torch.inference_mode():
        ref = m.encode_graph(g.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.encode_graph(g.clone())
    for s, v in ref.emb.items():
        assert got.emb[s].dtype == torch.float32
        torch.testing.assert_close(got.emb[s], v, rtol=0, atol=0)


def test_peak_table_and_comparisons() -> None:
    from napari_sigmma.bench.gpu import _compare, _compare_edges
    from napari_sigmma.bench.gpu_peaks import table_peak

    assert table_peak("NVIDIA H200")[0] == pytest.approx(989.4)
    assert table_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert table_peak("NVIDIA A10")[0] == 125.0
    assert table_peak("NVIDIA L40S")[0] == pytest.approx(362.05)
    assert table_peak("NVIDIA L4")[0] == 121.0
    assert table_peak("Some GPU")[0] is None

    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    c = _compare(ref, ref + np.array([[0.0, 0.1], [0.0, 0.0]]))
    assert c["max_abs"] == pytest.approx(0.1) and c["rel"] == pytest.approx(0.05)
    assert c["cos_min"] < 1.0 and c["cos_median"] < 1.0
    e = _compare_edges({(0, 1): 0.9, (1, 2): 0.505}, {(0, 1): 0.89, (2, 3): 0.7}, 0.01)
    assert e["prob_max_abs"] == pytest.approx(0.01)
    assert e["flipped"] == 2 and e["flipped_borderline"] == 1  # (1, 2) sat at 0.505
    assert e["flip_fraction"] == pytest.approx(1 / 3)
