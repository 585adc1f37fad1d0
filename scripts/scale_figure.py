"""The picture of docs/scale.md: a large image refined tile by tile, zoomed where four tiles meet.

    python scripts/scale_figure.py [OUT.png]   # default: a temporary folder; docs/images/scale-tiles.png when named

The demo scene at 3072 x 4096 with the paper's synthetic noisy unary, refined by
cucrf.dask.infer in 1024 x 1024 chunks and by cucrf.infer on the whole image; the crop shows
the image, the noisy labels and the tiled result with the chunk boundaries, and checks that the
tiled labels are those of the whole image.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None):
    import dask.array as da
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import cucrf
    import cucrf.dask
    from cucrf import palette
    from cucrf._demo_scene import make_scene
    from cucrf.datasets import synthetic_unary

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(tempfile.mkdtemp()) / "scale-tiles.png"
    H, W, tile = 3072, 4096, 1024
    image, label, names = make_scene(H, W, seed=1)
    unary = synthetic_unary(label, len(names), downsample=32, replace_prob=0.2, seed=1).astype(np.float32)
    whole = cucrf.infer(unary, image, blur=8, filter_size=7).argmax(axis=0)
    tiled = cucrf.dask.infer(da.from_array(unary, chunks=(len(names), tile, tile)),
                             da.from_array(image, chunks=(tile, tile, 3)), blur=8, filter_size=7,
                             output="labels").compute()
    identical = bool(np.array_equal(tiled, whole))
    noisy = unary.argmax(axis=0)
    y0, x0, half = 2 * tile, 2 * tile, 320  # where four chunks meet
    crop = np.s_[y0 - half:y0 + half, x0 - half:x0 + half]
    panels = [(image[crop], "image (3072 x 4096), crop"), (palette.color_labels(noisy[crop]), "noisy unary"),
              (palette.color_labels(tiled[crop]), "cucrf.dask.infer, 1024$^2$ chunks")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3), dpi=100)
    for ax, (picture, title) in zip(axes, panels):
        ax.imshow(picture, interpolation="nearest")
        ax.axhline(half - 0.5, color="white", lw=1.2, ls="--")
        ax.axvline(half - 0.5, color="white", lw=1.2, ls="--")
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Chunk boundaries dashed; tiled labels {'identical to' if identical else 'DIFFER FROM'} "
                 f"cucrf.infer on the whole image ({int((tiled != whole).sum())} pixels differ)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"{out}: identical={identical}, accuracy noisy {np.mean(noisy == label):.1%} -> "
          f"refined {np.mean(tiled == label):.1%}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
