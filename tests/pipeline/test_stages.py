"""The Ray Data stages called on one batch, without Ray: extraction -> refinement -> grouping and
writing. Exact invariants: every input row comes out once; the identity refiner returns the coarse
masks bit for bit; per-image checks (duplicates, unreadable images) happen in extraction."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bpr_core import BPRConfig
from bpr_core.formats import load_image_index, read_results_json
from pipeline.graph import WORK_SCHEMA, input_blocks
from pipeline.stages import ExtractPatches, RefinePatches, WriteParts, is_read_failure

CFG = BPRConfig()


@pytest.fixture()
def synthetic_small(tmp_path):
    from bpr_core.synthetic import write_dataset

    write_dataset(tmp_path / "data", 8, seed=3)
    return tmp_path / "data"


def _rows(data, shard=0):
    index = load_image_index(data / "annotations.json")
    rows = read_results_json(data / "coarse.json")
    for position, r in enumerate(rows):
        r.update(file_name=index[r["image_id"]].file_name, source_file="coarse.json", position=position, detector_fields=None)
    return sorted(rows, key=lambda r: (r["image_id"], r["instance_id"]))


def _flow(data, rows, out, method="identity"):
    import pyarrow as pa

    from pipeline.ingest import SPILL_SCHEMA

    block = input_blocks(pa.Table.from_pylist(rows, schema=SPILL_SCHEMA), 3, images_per_block=10**6)
    assert len(block) == 1 and block[0].schema == WORK_SCHEMA
    batch = {name: np.asarray(block[0].column(name).to_pylist()) for name in block[0].column_names}
    out_batches = list(ExtractPatches(str(data / "images"), CFG.to_dict())(batch))
    assert len(out_batches) == 1  # without a step, the whole block is one output batch
    patches = out_batches[0]
    probs = RefinePatches(method, None, "cpu", CFG.to_dict())(patches)
    receipts = WriteParts(str(out), CFG.to_dict(), method, "1", CFG.config_hash())(probs)
    return patches, probs, receipts


def test_one_batch_through_every_stage_returns_the_identity_bit_for_bit(tmp_path, synthetic_small):
    rows = _rows(synthetic_small)
    patches, probs, receipts = _flow(synthetic_small, rows, tmp_path / "out")
    # one row per instance, its patches in its own row (no groupby needed downstream)
    assert len(patches["image_id"]) == len(probs["image_id"]) == len(rows)
    assert int(np.sum(patches["num_patches"])) > len(rows)
    s = CFG.crop_size
    for n, img, msk, p in zip(patches["num_patches"], patches["img"], patches["msk"], probs["prob"]):
        assert len(img) == n * s * s * 3 and len(msk) == n * s * s and len(p) == n * s * s
    assert "img" not in probs and "msk" not in probs
    # the grouping stage wrote one part for the one shard, every row once, and the coarse masks back
    assert list(receipts["shard"]) == [3] and int(receipts["instances"][0]) == len(rows)
    assert int(receipts["patches"][0]) == int(np.sum(patches["num_patches"]))
    assert json.loads(receipts["failed_images"][0]) == {}
    assert {a.split(":")[0] for a in json.loads(receipts["actors"][0])} == {"extract", "refine"}
    part = pq.read_table(tmp_path / "out" / "parts" / "shard-00003" / receipts["part"][0]).to_pylist()
    assert sorted((r["source_file"], r["position"]) for r in part) == [("coarse.json", p) for p in range(len(rows))]
    by_pos = {r["position"]: r for r in part}
    for r in rows:
        got = by_pos[r["position"]]
        assert got["rle_counts"] == r["rle_counts"] and got["status"] in ("refined", "passed_through")
        assert got["coarse_area"] == got["refined_area"]


def test_extraction_hands_on_a_large_block_every_few_whole_images(synthetic_small):
    """A block of a whole shard (as the driver puts for large jobs) comes out in batches of at most
    `images_per_step` whole images, which together are the one-batch output row for row."""
    import pyarrow as pa

    from pipeline.ingest import SPILL_SCHEMA

    rows = _rows(synthetic_small)
    block = input_blocks(pa.Table.from_pylist(rows, schema=SPILL_SCHEMA), 0, images_per_block=10**6)[0]
    batch = {name: np.asarray(block.column(name).to_pylist()) for name in block.column_names}
    (whole,) = ExtractPatches(str(synthetic_small / "images"), CFG.to_dict())(batch)
    steps = list(ExtractPatches(str(synthetic_small / "images"), CFG.to_dict(), images_per_step=3)(batch))
    n_images = len(set(batch["image_id"].tolist()))
    assert n_images > 6 and len(steps) == -(-n_images // 3)
    seen: set = set()
    for step in steps:
        ids = set(step["image_id"].tolist())
        assert len(ids) <= 3 and not ids & seen  # whole images, each in one batch
        seen |= ids
    for k in whole:
        if k == "extract_actor":
            continue
        got = np.concatenate([step[k] for step in steps])
        assert len(got) == len(whole[k]) and all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
                                                  for a, b in zip(got, whole[k])), k


def test_extraction_checks_each_image_duplicates_and_unreadable_files(tmp_path, synthetic_small):
    rows = _rows(synthetic_small)
    first_image = rows[0]["image_id"]
    dup = dict(rows[0], position=len(rows))  # the same instance_id again, later in the input
    rows = sorted(rows + [dup], key=lambda r: (r["image_id"], r["instance_id"]))
    (synthetic_small / "images" / rows[-1]["file_name"]).unlink()
    patches, _, receipts = _flow(synthetic_small, rows, tmp_path / "out")
    status = dict(zip(zip(patches["image_id"], patches["position"]), zip(patches["status"], patches["reason"])))
    assert status[(first_image, len(rows) - 1)] == (
        "quarantined", f"duplicate instance_id {dup['instance_id']} for image_id {first_image} in coarse.json")
    assert status[(first_image, rows[0]["position"])][0] != "quarantined"  # the first by position is kept
    lost = [r for r in rows if r["image_id"] == rows[-1]["image_id"]]
    for r in lost:
        st, why = status[(r["image_id"], r["position"])]
        assert st == "quarantined" and is_read_failure(why)
    failed = json.loads(receipts["failed_images"][0])
    assert list(failed) == [str(rows[-1]["image_id"])] and failed[str(rows[-1]["image_id"])][1] == len(lost)
    assert int(receipts["instances"][0]) == len(rows)


@pytest.mark.parametrize("method", ["guided-filter"])
def test_the_stages_give_the_refiner_masks(tmp_path, synthetic_small, method):
    """The Ray stages and `Refiner` run the same per-instance flow (bpr_core.flow): same masks."""
    import cv2

    from bpr_core import Refiner
    from bpr_core import rle as rle_utils

    rows = _rows(synthetic_small)
    _, _, receipts = _flow(synthetic_small, rows, tmp_path / "out", method=method)
    part = {r["position"]: r for r in pq.read_table(tmp_path / "out" / "parts" / "shard-00003").to_pylist()}
    refiner = Refiner(method=method, config=CFG)
    changed = 0
    for image_id in sorted({r["image_id"] for r in rows}):
        mine = [r for r in rows if r["image_id"] == image_id]
        image = cv2.cvtColor(cv2.imread(str(synthetic_small / "images" / mine[0]["file_name"])), cv2.COLOR_BGR2RGB)
        masks = np.stack([rle_utils.decode({"size": [r["rle_h"], r["rle_w"]], "counts": r["rle_counts"]}) for r in mine])
        refined = refiner.refine(image, masks)
        for r, m in zip(mine, refined):
            assert rle_utils.encode(m)["counts"] == part[r["position"]]["rle_counts"]
            changed += part[r["position"]]["rle_counts"] != r["rle_counts"]
    assert changed > 0  # the refiner did change masks, so the equality above means something


def test_parts_carry_each_refined_json_entry_and_older_parts_without_it_give_the_same(tmp_path, synthetic_small):
    """The worker serialises each row's refined.json entry into its part; assembly only joins them.
    A part written before parts carried the entry (no result_json column) is assembled the same."""
    import pyarrow as pa

    from bpr_core.formats import REFINED_SCHEMA, row_to_result
    from pipeline import storage
    from pipeline.outputs import KEY_COLUMNS, count_duplicates, shard_results

    rows = _rows(synthetic_small)
    _, _, receipts = _flow(synthetic_small, rows, tmp_path / "out")
    shard = storage.resolve(str(tmp_path / "out" / "parts" / "shard-00003"))
    new = shard_results(shard, False, KEY_COLUMNS)
    full = shard_results(shard, False).to_pylist()
    assert new.num_rows == len(rows) and count_duplicates(new) == 0
    assert new["result_json"].to_pylist() == [json.dumps(row_to_result(r), separators=(",", ":")) for r in full]
    assert [(r["image_id"], r["instance_id"]) for r in full] == sorted((r["image_id"], r["instance_id"]) for r in full)
    # the same part without the column (an older version's part)
    path = tmp_path / "out" / "parts" / "shard-00003" / receipts["part"][0]
    pq.write_table(pq.read_table(path).select(REFINED_SCHEMA.names), path)
    old = shard_results(shard, False, KEY_COLUMNS)
    assert old.equals(new)
    # a row twice (a part written twice under two names) is counted as a duplicate
    (path.parent / "part-copy.parquet").write_bytes(path.read_bytes())
    assert count_duplicates(shard_results(shard, False, KEY_COLUMNS)) == len(rows)
    # several source files: entries name their file (the flag is the worker's, from the job)
    assert json.loads(shard_results(shard, True, KEY_COLUMNS)["result_json"][0].as_py())["source_file"] == "coarse.json"
    assert pa.types.is_string(new.schema.field("result_json").type)
