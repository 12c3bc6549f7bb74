"""How much of the default backbone's feature vector is alive at each input size.

EfficientNet-Lite0 ends in ReLU6 and global pooling; on small inputs its last feature map is
tiny (1×1 at 32 px), so most pooled features are exactly zero. Prints, per ``image_size``, the
share of exact zeros and the mean number of non-zero dimensions per image over the first
``--images`` Fashion-MNIST training images.

    python bench/feature_sparsity.py [--sizes 32 64 112] [--images 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dq_ops.backbone_spec import DEFAULT_BACKBONE, ExtractorSpec, weights_digest  # noqa: E402
from dq_ops.backbones import get_extractor  # noqa: E402
from dq_ops.readers.idx import load_fashion_mnist  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 112])
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    images = load_fashion_mnist("train")[0][: args.images]
    digest = weights_digest(DEFAULT_BACKBONE, None)
    print(f"{'image_size':>10}{'zero share':>12}{'active dims / image':>21}")
    for size in args.sizes:
        features = get_extractor(ExtractorSpec("images", DEFAULT_BACKBONE, None, size, digest))(images, 256)
        print(f"{size:>10}{(features == 0).mean():>12.3f}{(features != 0).sum(axis=1).mean():>21.1f}")


if __name__ == "__main__":
    main()
