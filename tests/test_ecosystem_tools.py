"""README "Use with other tools": OpenSlide (what QuPath's and the pathology tilers' readers
see) on a sample written by the CLI, with the README's own command."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def test_openslide_reads_a_sample_written_by_the_cli(tmp_path):
    from napari_sigmma.cli import main
    from napari_sigmma.io.wsi import open_slide

    out = tmp_path / "syn"
    assert main(["sample", "--synthetic", "--size", "1024", "--quiet", "--out", str(out)]) == 0
    he = out / "he_image.ome.tif"
    # the README's command, in a fresh interpreter
    code = f"import openslide; s = openslide.OpenSlide(r'{he}'); print(s.level_dimensions)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "((1024, 1024), (512, 512))"
    import openslide

    with openslide.OpenSlide(str(he)) as s, open_slide(he, backend="tifffile") as t:
        assert float(s.properties["openslide.mpp-x"]) == t.mpp == 0.5
        for k in range(s.level_count):
            w, h = s.level_dimensions[k]
            got = np.asarray(s.read_region((0, 0), k, (w, h)))[..., :3]
            np.testing.assert_array_equal(got, t.read_region(0, 0, w, h, level=k))
