"""Writes fixtures/pillow/pillow.safetensors: Pillow's BICUBIC resizes and RGBA-over-white
composites, the reference for `hf::resample` and `hf::processor::to_rgb` (no Python in CI).

Run from apps/r1-sgg with Pillow, numpy and safetensors installed:
    python scripts/pillow_fixture.py
Tensors (all uint8):
    src_K [H, W, 3], out_K [OH, OW, 3]: `Image.fromarray(src).resize((OW, OH), Image.BICUBIC)`
    over_white [256, 256]: channel value c (column) with alpha a (row) composited onto white as
        transformers' `convert_to_rgb` does (`Image.alpha_composite(white, rgba).convert("RGB")`).
Metadata: pillow = Pillow's version, cases = "K:HxW->OHxOW,...".
"""

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

# (height, width) -> (out_height, out_width): up, down, non-integer factors, one axis only,
# extreme shrink, and the two fixture images' smart_resize sizes.
CASES = [
    ((23, 37), (28, 56)),
    ((100, 150), (84, 112)),
    ((150, 100), (98, 70)),
    ((40, 30), (84, 30)),
    ((20, 45), (20, 90)),
    ((7, 300), (56, 28)),
    ((13, 13), (28, 28)),
    ((60, 80), (56, 84)),
]


def main():
    rng = np.random.default_rng(0)
    tensors = {}
    names = []
    for k, ((h, w), (oh, ow)) in enumerate(CASES):
        if k % 2 == 0:
            src = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        else:
            # Smooth gradients with a sharp edge: overshoot and clipping at the edge.
            y, x = np.mgrid[0:h, 0:w]
            src = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), ((x > w // 2) * 255)], -1)
            src = src.astype(np.uint8)
        out = np.asarray(Image.fromarray(src).resize((ow, oh), Image.BICUBIC))
        tensors[f"src_{k}"] = np.ascontiguousarray(src)
        tensors[f"out_{k}"] = np.ascontiguousarray(out)
        names.append(f"{k}:{h}x{w}->{oh}x{ow}")

    a, c = np.mgrid[0:256, 0:256].astype(np.uint8)
    rgba = np.stack([c, c, c, a], -1)
    white = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    composite = Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")
    tensors["over_white"] = np.ascontiguousarray(np.asarray(composite)[:, :, 0])

    save_file(
        tensors,
        "fixtures/pillow/pillow.safetensors",
        metadata={"pillow": PIL.__version__, "cases": ",".join(names)},
    )


if __name__ == "__main__":
    main()
