"""Commit bookkeeping without Ray: the Arrow spill, shard keys, and the ledger that turns the
workers' receipts into commit markers."""

import json

import pytest

from bpr_core.formats import JobFailed
from pipeline import storage
from pipeline.commit import ShardLedger, shard_key
from pipeline.graph import images_per_put, input_blocks
from pipeline.ingest import ShardSpill


def _row(image_id, instance_id, position, score=0.5):
    return {"image_id": image_id, "instance_id": instance_id, "category_id": 1, "score": score, "rle_counts": "b04400000>",
            "rle_h": 8, "rle_w": 8, "source_file": "in.json", "position": position, "detector_fields": None,
            "file_name": f"{image_id}.png"}


def test_spill_returns_a_shard_sorted_whatever_the_input_order_and_its_key_follows_the_content():
    rows = [_row(i // 3, i % 3, i) for i in range(30)]
    a, b = ShardSpill(2, buffer_rows=7), ShardSpill(2, buffer_rows=1000)
    try:
        for r in rows:
            a.add(r["image_id"] // 5, r)
        for r in reversed(rows):  # another input order, another flush pattern
            b.add(r["image_id"] // 5, r)
        a.flush()
        b.flush()
        ta, tb = a.table(1), b.table(1)
        assert ta.equals(tb) and ta.num_rows == 15 and a.images[1] == 5
        assert [(r["image_id"], r["instance_id"]) for r in a[1]] == sorted((r["image_id"], r["instance_id"]) for r in rows[15:])
        key = shard_key(ta, "model#1", "cfg")
        assert shard_key(tb, "model#1", "cfg") == key
        assert shard_key(ta, "model#2", "cfg") != key and shard_key(ta, "model#1", "cfg", "exif=apply") != key
        c = ShardSpill(2)
        for r in rows:
            c.add(r["image_id"] // 5, dict(r, score=0.6) if r["position"] == 20 else r)
        c.flush()
        assert shard_key(c.table(1), "model#1", "cfg") != key  # one score changed
        c.close()
        # blocks of whole images: 5 images, 2 per block -> 3 blocks, no image split
        blocks = input_blocks(ta, 1, images_per_block=2)
        assert [b.num_rows for b in blocks] == [6, 6, 3]
        assert all(set(b["shard"].to_pylist()) == {1} for b in blocks)
        assert len({i for b in blocks for i in set(b["image_id"].to_pylist())}) == 5
    finally:
        a.close()
        b.close()


def test_ledger_commits_a_shard_when_its_last_instance_is_written(tmp_path):
    out = storage.resolve(str(tmp_path / "out"))
    ledger = ShardLedger(out, max_unreadable_share=0.25)
    ledger.start(0, "k0", instances=5, images=2)
    assert not ledger.receive(0, 3, 9, {})
    assert not (tmp_path / "out" / "_commits").exists()
    assert ledger.receive(0, 2, 4, {"7": ["image x unreadable: FileNotFoundError", 2]})
    ledger.commit(0)
    marker = json.loads((tmp_path / "out" / "_commits" / "shard-00000.json").read_text())
    assert marker == {"key": "k0", "instances": 5, "patches": 13, "read_failures": 2, "unreadable_images": 1}
    assert not ledger.is_done(0, "k0")  # read failures: the next run redoes it
    ledger.start(1, "k1", instances=2, images=2)
    with pytest.raises(RuntimeError, match="3 instances written for 2 in"):
        ledger.receive(1, 3, 0, {})


def test_ledger_refuses_to_commit_a_shard_most_of_whose_images_could_not_be_read(tmp_path):
    ledger = ShardLedger(storage.resolve(str(tmp_path / "out")), max_unreadable_share=0.25)
    ledger.start(3, "k", instances=4, images=4)
    failed = {str(i): [f"image {i}.png unreadable: PermissionError", 1] for i in range(3)}
    assert ledger.receive(3, 4, 0, failed)
    with pytest.raises(JobFailed, match="shard-00003: 3 of 4 images could not be read .* First error: image 0.png"):
        ledger.commit(3)
    assert not (tmp_path / "out" / "_commits").exists()


def test_input_blocks_are_whole_shards_once_every_extraction_actor_has_four():
    from pipeline.options import RefineOptions

    opts = RefineOptions(images="i", coarse="c.json", image_info="a.json", out="o", shard_size=1000, images_per_block=8)
    assert images_per_put(opts, pending_shards=500, extract_actors=2) == 1000  # one object put per shard
    assert images_per_put(opts, pending_shards=8, extract_actors=2) == 1000
    assert images_per_put(opts, pending_shards=1, extract_actors=2) == 125  # one shard cut for 8 blocks
    assert images_per_put(opts, pending_shards=1, extract_actors=64) == 8  # never below --images-per-block
