"""Writes fixtures/parquet/: R1-SGG's Hugging Face dataset layout in a few rows, the reference for
`data::parquet` (no Python in CI).

Run from apps/r1-sgg with the pinned versions (scripts/requirements-parquet.txt):
    python -m venv /work/venv-pq && /work/venv-pq/bin/pip install -r scripts/requirements-parquet.txt
    /work/venv-pq/bin/python scripts/parquet_fixture.py

The layout is the one `datasets` pushes to the Hub for JosephZ/vg150_train_sgg_prompt and
JosephZ/psg_train_sg (R1-SGG's README; read by open_r1/grpo.py and src/sft_sgg.py):
    image          struct<bytes: binary, path: string>   (datasets' Image feature, bytes embedded)
    image_id       string
    objects        string: JSON [{"id": "man.1", "bbox": [x1, y1, x2, y2]}, ...], absolute pixels
    relationships  string: JSON [{"subject": "man.1", "predicate": "riding", "object": "horse.2"}]
    prompt_open, prompt_close   string (the VG150 sets only)
snappy-compressed (pyarrow's default, which `datasets` keeps), with the `huggingface` schema
metadata `datasets` writes (its features), in row groups of 2 rows so that a shard has several.

Files:
    good/psg-00000.parquet     PSG-like: no prompt columns; float boxes, one past the image's edge,
                               an RGBA PNG (R1-SGG's .convert('RGB') drops alpha)
    good/vg150-00000.parquet   VG150-like: prompt_open / prompt_close; JPEG and PNG images
    bad/rows.parquet           one good row, then one malformed row of each kind (see BAD_ROWS)
    bad/types.parquet          `objects` stored as int64: every row has a wrong column type
    bad/zstd.parquet           a good row, zstd-compressed (a codec the reader is not built with)
    expected.json              what was written: per row the id, size, format, pixels at the centres
                               of flat rectangles (as Pillow decodes them), objects, relationships,
                               prompts and R1-SGG's SFT box units int(x / iw * 1000); the bad rows'
                               reasons
"""

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

OUT = "fixtures/parquet"
ROW_GROUP = 2

STRING_FEATURE = {"dtype": "string", "_type": "Value"}


def hf_metadata(columns):
    """The schema metadata `datasets` writes: its features, so `load_dataset` decodes `image`."""
    features = {c: ({"_type": "Image"} if c == "image" else STRING_FEATURE) for c in columns}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def draw(size, background, rects, mode="RGB"):
    """An image of `size` with flat rectangles [(box, colour)], and the pixels at their centres."""
    img = Image.new(mode, size, background)
    d = ImageDraw.Draw(img)
    for (x1, y1, x2, y2), colour in rects:
        d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    return img


def encode(img, fmt):
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def probe(data, points):
    """Pixels at `points` as Pillow decodes the stored bytes, after R1-SGG's .convert('RGB')."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return [[x, y, list(img.getpixel((x, y)))] for x, y in points]


def units(objects, w, h):
    """R1-SGG's SFT boxes (src/sft_sgg.py format_data): int(x / iw * 1000), clipped to 0..1000
    as our loader clips boxes to the image (R1-SGG does not clip)."""
    clip = lambda v: min(max(v, 0), 1000)
    return [
        [clip(int(b[0] / w * 1000)), clip(int(b[1] / h * 1000)),
         clip(int(b[2] / w * 1000)), clip(int(b[3] / h * 1000))]
        for b in (o["bbox"] for o in objects)
    ]


def centre(box):
    x1, y1, x2, y2 = box
    return (int((x1 + x2) // 2), int((y1 + y2) // 2))


def vg150_rows():
    rows = []
    specs = [
        ("2343", (64, 48), "jpeg", (120, 170, 90), [
            ("man.1", [6, 4, 24, 44], (200, 160, 140)),
            ("horse.2", [26, 14, 62, 46], (110, 70, 30)),
        ], [("man.1", "riding", "horse.2")]),
        ("2344", (40, 40), "png", (150, 190, 230), [
            ("table.1", [2, 20, 30, 38], (140, 100, 60)),
            ("cup.2", [8, 10, 16, 20], (240, 240, 240)),
            ("chair.3", [30, 5, 40, 35], (200, 40, 40)),
        ], [("cup.2", "on", "table.1"), ("chair.3", "near", "table.1")]),
        ("2345", (50, 30), "jpeg", (60, 60, 70), [
            ("lamp.1", [12, 4, 24, 26], (230, 200, 40)),
        ], []),
    ]
    for image_id, (w, h), fmt, bg, objs, rels in specs:
        img = draw((w, h), bg, [(box, c) for _, box, c in objs])
        data = encode(img, fmt)
        objects = [{"id": i, "bbox": box} for i, box, _ in objs]
        relationships = [{"subject": s, "predicate": p, "object": o} for s, p, o in rels]
        # R1-SGG's stored prompts carry the size and <answer> tags, which its code strips
        # and replaces (grpo.py 880-881); shortened here, stored as-is.
        prompt_open = (f"Generate a structured scene graph for an image of size ({w} x {h}) "
                       "using the following format: <answer>{...}</answer>")
        prompt_close = (f"Generate a structured scene graph for an image of size ({w} x {h}) "
                        "using the specified object and relationship categories. "
                        "<answer>{...}</answer>")
        rows.append({
            "record": {
                "image": {"bytes": data, "path": f"{image_id}.{'jpg' if fmt == 'jpeg' else 'png'}"},
                "image_id": image_id,
                "objects": json.dumps(objects),
                "relationships": json.dumps(relationships),
                "prompt_open": prompt_open,
                "prompt_close": prompt_close,
            },
            "expected": {
                "image_id": image_id, "width": w, "height": h, "format": fmt,
                "pixels": probe(data, [centre(o["bbox"]) for o in objects] + [(0, 0)]),
                "objects": objects, "relationships": relationships,
                "prompt_open": prompt_open, "prompt_close": prompt_close,
                "units": units(objects, w, h),
            },
        })
    return rows


def psg_rows():
    rows = []
    specs = [
        ("000000000139", (60, 40), "png", (90, 90, 90, 255), [
            ("person.1", [3.5, 2.25, 20.75, 38.5], (250, 200, 180, 255)),
            ("tv.2", [30.0, 10.0, 58.4, 30.6], (20, 20, 20, 255)),
        ], [("person.1", "looking at", "tv.2")]),
        ("000000000285", (48, 48), "png", (30, 120, 30, 128), [
            ("bear.1", [10.0, 8.0, 52.0, 47.9], (120, 80, 40, 200)),
        ], []),
        ("000000000632", (32, 24), "jpeg", (200, 200, 180), [
            ("bed.1", [1.0, 8.0, 31.0, 23.0], (90, 60, 150)),
            ("pillow.2", [4.0, 9.0, 12.0, 14.0], (240, 240, 240)),
            ("wall-other-merged.3", [0.0, 0.0, 32.0, 8.0], (180, 170, 120)),
        ], [("pillow.2", "on", "bed.1"), ("bed.1", "in front of", "wall-other-merged.3")]),
    ]
    for image_id, (w, h), fmt, bg, objs, rels in specs:
        mode = "RGBA" if len(bg) == 4 else "RGB"
        img = draw((w, h), bg, [(tuple(round(v) for v in box), c) for _, box, c in objs], mode)
        data = encode(img, fmt)
        objects = [{"id": i, "bbox": box} for i, box, _ in objs]
        relationships = [{"subject": s, "predicate": p, "object": o} for s, p, o in rels]
        rows.append({
            "record": {
                "image": {"bytes": data, "path": None},
                "image_id": image_id,
                "objects": json.dumps(objects),
                "relationships": json.dumps(relationships),
            },
            "expected": {
                "image_id": image_id, "width": w, "height": h, "format": fmt,
                # Inside the boxes, away from the edges a box past the image's edge crosses.
                "pixels": probe(data, [centre([max(0, v) for v in o["bbox"][:2]] +
                                              [min(w, o["bbox"][2]), min(h, o["bbox"][3])])
                                       for o in objects]),
                "objects": objects, "relationships": relationships,
                "prompt_open": None, "prompt_close": None,
                "units": units(objects, w, h),
            },
        })
    return rows


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write(path, records, columns, types=None, compression="snappy"):
    types = types or {}
    fields = [pa.field(c, types.get(c, IMAGE_TYPE if c == "image" else pa.string())) for c in columns]
    schema = pa.schema(fields, metadata=hf_metadata(columns))
    table = pa.Table.from_pylist(records, schema=schema)
    full = os.path.join(OUT, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    pq.write_table(table, full, row_group_size=ROW_GROUP, compression=compression)
    return [rg.num_rows for rg in (pq.ParquetFile(full).metadata.row_group(i)
                                   for i in range(pq.ParquetFile(full).metadata.num_row_groups))]


PSG_COLUMNS = ["image", "image_id", "objects", "relationships"]
VG_COLUMNS = PSG_COLUMNS + ["prompt_open", "prompt_close"]


def bad_rows(good):
    """One good row, then one row per malformed kind, each with the reason the reader gives."""

    def row(**changes):
        r = dict(good)
        r.update(changes)
        return r

    objects = json.loads(good["objects"])
    inverted = [dict(objects[0], bbox=[30, 4, 6, 44])] + objects[1:]
    undefined = json.dumps([{"subject": objects[0]["id"], "predicate": "on", "object": "ghost.9"}])
    return [
        (row(), None),
        (row(objects='[{"id": "man.1", "bbox": [6, 4, 24'), "\"objects\" holds invalid JSON"),
        (row(objects=json.dumps(inverted)), "inverted box"),
        (row(image={"bytes": None, "path": "2343.jpg"}), "no bytes"),
        (row(image={"bytes": b"\x89PNG\r\n\x1a\nnot really a png", "path": None}), "cannot decode"),
        (row(image=None), "no image"),
        (row(relationships=undefined), "undefined object \"ghost.9\""),
        (row(relationships=None), "missing field \"relationships\""),
        (row(objects=json.dumps([{"id": "man.1", "bbox": [1, 2, 3]}])), "4 numbers"),
        (row(objects='{"id": "man.1"}'), "not a JSON array"),
    ]


def main():
    vg = vg150_rows()
    psg = psg_rows()
    shards = []
    for path, rows, columns in [("good/psg-00000.parquet", psg, PSG_COLUMNS),
                                ("good/vg150-00000.parquet", vg, VG_COLUMNS)]:
        groups = write(path, [r["record"] for r in rows], columns)
        shards.append({"file": path, "row_groups": groups, "rows": [r["expected"] for r in rows]})

    bad = bad_rows(vg[0]["record"])
    write("bad/rows.parquet", [r for r, _ in bad], VG_COLUMNS)
    typed = [dict(r["record"], objects=k) for k, r in enumerate(psg[:2])]
    write("bad/types.parquet", typed, PSG_COLUMNS, types={"objects": pa.int64()})
    write("bad/zstd.parquet", [psg[0]["record"]], PSG_COLUMNS, compression="zstd")

    expected = {
        "pyarrow": pa.__version__,
        "shards": shards,
        "bad_rows": {"file": "bad/rows.parquet",
                     "reasons": [reason for _, reason in bad]},
        "bad_types": {"file": "bad/types.parquet", "rows": len(typed),
                      "reason": "column \"objects\""},
        "zstd": {"file": "bad/zstd.parquet", "codec": "ZSTD"},
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
