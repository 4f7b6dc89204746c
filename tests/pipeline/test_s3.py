"""The same job against a real S3 endpoint: moto's standalone server on 127.0.0.1, spoken to over
HTTP by boto3 (test set-up) and pyarrow (the job)."""

import json
import logging
import os
import time

import pytest

from pipeline.refine_job import RefineOptions, run

from .conftest import run_refine_subprocess

SECRET = "bprTestSecretKey0123456789"


@pytest.fixture()
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bprtestkey",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.stop()


def _client(env):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])


def test_s3_run_matches_local_run(ray_session, tmp_path, synth30, s3_server):
    s3 = _client(s3_server)
    s3.create_bucket(Bucket="bpr-test")
    for p in sorted(synth30.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), "bpr-test", f"in/{p.relative_to(synth30).as_posix()}")
    local = run(RefineOptions(images=str(synth30 / "images"), coarse=str(synth30 / "coarse.json"),
                              image_info=str(synth30 / "annotations.json"), out=str(tmp_path / "local"),
                              method="guided-filter", shard_size=15))
    assert local["invariant"]["ok"]
    rc, log = run_refine_subprocess(
        ["--images", "s3://bpr-test/in/images", "--coarse", "s3://bpr-test/in/coarse.json",
         "--image-info", "s3://bpr-test/in/annotations.json", "--out", "s3://bpr-test/out",
         "--refiner", "guided-filter", "--shard-size", "15", "--num-cpus", "2"],
        {**s3_server, "BPR_RAY_TEMP_DIR": f"/tmp/bprt-s3-{os.getpid()}-{int(time.time())}"})
    assert rc == 0, log
    remote = json.loads(s3.get_object(Bucket="bpr-test", Key="out/refined.json")["Body"].read())
    mine = json.loads((tmp_path / "local" / "refined.json").read_text())
    assert len(remote) == len(mine) > 0
    assert [(r["image_id"], r["instance_id"], r["segmentation"]) for r in remote] == \
           [(r["image_id"], r["instance_id"], r["segmentation"]) for r in mine]
    manifest = s3.get_object(Bucket="bpr-test", Key="out/manifest.json")["Body"].read().decode()
    assert json.loads(manifest)["invariant"]["ok"]
    # no credential in the log or the outputs
    assert SECRET not in log and SECRET not in manifest and "bprtestkey" not in manifest


def test_missing_bucket_fails_fast_with_one_message(s3_server, tmp_path):
    rc, log = run_refine_subprocess(
        ["--images", "s3://no-such-bucket/images", "--coarse", "s3://no-such-bucket/coarse.json",
         "--image-info", "s3://no-such-bucket/index.json", "--out", str(tmp_path / "o")], s3_server, timeout=120)
    assert rc == 2
    assert "error:" in log and "no-such-bucket" in log and "Traceback" not in log
    assert SECRET not in log


def test_s3_image_keys_stay_under_the_images_prefix(s3_server, tmp_path):
    """An index file_name that climbs out of --images (into another bucket, or beside the prefix)
    is quarantined with the reason, and the rest refines."""
    import cv2
    import numpy as np
    import pyarrow.parquet as pq

    from bpr_core import rle

    s3 = _client(s3_server)
    for bucket in ("bpr-test", "private"):
        s3.create_bucket(Bucket=bucket)
    png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))[1].tobytes()
    for bucket, key in (("bpr-test", "in/images/a.png"), ("private", "secret.png"), ("bpr-test", "in/other/x.png")):
        s3.put_object(Bucket=bucket, Key=key, Body=png)
    names = ["a.png", "../../../private/secret.png", "../other/x.png", "sub/../a.png"]
    index = {"images": [{"id": i + 1, "file_name": n, "height": 64, "width": 80} for i, n in enumerate(names)]}
    m = np.zeros((64, 80), bool)
    m[10:50, 20:60] = True
    dets = [{"image_id": i + 1, "category_id": 1, "score": 0.5, "segmentation": rle.encode(m)} for i in range(len(names))]
    s3.put_object(Bucket="bpr-test", Key="in/index.json", Body=json.dumps(index).encode())
    s3.put_object(Bucket="bpr-test", Key="in/coarse.json", Body=json.dumps(dets).encode())
    rc, log = run_refine_subprocess(
        ["--images", "s3://bpr-test/in/images", "--coarse", "s3://bpr-test/in/coarse.json", "--image-info",
         "s3://bpr-test/in/index.json", "--out", "s3://bpr-test/out", "--refiner", "identity", "--patch-size", "32",
         "--num-cpus", "2"],
        {**s3_server, "BPR_RAY_TEMP_DIR": f"/tmp/bprt-s3c-{os.getpid()}-{int(time.time())}"})
    assert rc == 0, log
    refined = json.loads(s3.get_object(Bucket="bpr-test", Key="out/refined.json")["Body"].read())
    status = {e["image_id"]: e["bpr_status"] for e in refined}  # every detection, refused ones with their coarse mask
    assert status == {1: "refined", 2: "quarantined", 3: "quarantined", 4: "refined"}  # "sub/../a.png" stays inside
    local = tmp_path / "q.parquet"
    s3.download_file("bpr-test", "out/quarantine.parquet", str(local))
    reasons = {r["image_id"]: r["reason"] for r in pq.read_table(local).to_pylist()}
    assert reasons == {2: "file_name '../../../private/secret.png' resolves outside the image root s3://bpr-test/in/images",
                       3: "file_name '../other/x.png' resolves outside the image root s3://bpr-test/in/images"}


def test_missing_output_bucket_is_one_line_before_any_work(s3_server, synth30, tmp_path, monkeypatch):
    from bpr_core.formats import InputError
    from jobs import refine

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InputError) as e:
        refine.main(["--images", str(synth30 / "images"), "--coarse", str(synth30 / "coarse.json"), "--image-info",
                     str(synth30 / "annotations.json"), "--out", "s3://no-such-bucket/out", "--refiner", "identity"])
    assert str(e.value) == "output location s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist"


def test_checkpoint_on_s3_refines_like_the_local_file(ray_session, s3_server, synth30, tmp_path):
    """A model `jobs.train` wrote to s3:// is used by `jobs.refine --checkpoint s3://...` (fetched
    once per node into a cache), with the same results as the local file."""
    import torch

    from bpr_core import BPRConfig, save_checkpoint
    from bpr_core.model import build_model

    torch.manual_seed(3)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, build_model("hrnet_lite"), BPRConfig(model="hrnet_lite", input_size=64), {"name": "s3-model", "version": "1"})
    s3 = _client(s3_server)
    s3.create_bucket(Bucket="models")
    s3.upload_file(str(ckpt), "models", "runs/run1/model.pt")
    local = run(RefineOptions(images=str(synth30 / "images"), coarse=str(synth30 / "coarse.json"),
                              image_info=str(synth30 / "annotations.json"), out=str(tmp_path / "local"), checkpoint=str(ckpt),
                              shard_size=15))
    assert local["invariant"]["ok"]
    rc, log = run_refine_subprocess(
        ["--images", str(synth30 / "images"), "--coarse", str(synth30 / "coarse.json"), "--image-info",
         str(synth30 / "annotations.json"), "--out", str(tmp_path / "remote"), "--checkpoint", "s3://models/runs/run1/model.pt",
         "--shard-size", "15", "--num-cpus", "2"],
        {**s3_server, "XDG_CACHE_HOME": str(tmp_path / "cache"), "BPR_RAY_TEMP_DIR": f"/tmp/bprt-s3m-{os.getpid()}-{int(time.time())}"})
    assert rc == 0, log
    assert (tmp_path / "remote" / "refined.json").read_bytes() == (tmp_path / "local" / "refined.json").read_bytes()
    assert len(list((tmp_path / "cache" / "bpr" / "s3").iterdir())) == 1
    rc, log = run_refine_subprocess(
        ["--images", str(synth30 / "images"), "--coarse", str(synth30 / "coarse.json"), "--image-info",
         str(synth30 / "annotations.json"), "--out", str(tmp_path / "none"), "--checkpoint", "s3://models/runs/nope.pt"],
        s3_server, timeout=120)
    assert rc == 2 and "error: checkpoint not found: s3://models/runs/nope.pt" in log and "Traceback" not in log, log


def test_training_data_directory_on_s3_reads_like_the_local_one(s3_server, synth30, tmp_path, monkeypatch):
    """jobs.train --data s3://...: the driver fetches annotations.json and coarse.json (cached), the
    workers read the images through the same S3 filesystem as refinement."""
    from pipeline.training_data import MatchAndExtract, instance_table

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s3 = _client(s3_server)
    s3.create_bucket(Bucket="train")
    for p in sorted(synth30.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), "train", f"set/{p.relative_to(synth30).as_posix()}")
    local = instance_table(str(synth30 / "images"), str(synth30 / "coarse.json"), str(synth30 / "annotations.json"))
    remote = instance_table("s3://train/set/images", "s3://train/set/coarse.json", "s3://train/set/annotations.json")
    assert remote.num_rows == local.num_rows > 0 and remote.to_pylist() == local.to_pylist()
    from bpr_core import BPRConfig

    batch = {k: __import__("numpy").asarray(v, dtype=object) for k, v in local.slice(0, 4).to_pydict().items()}
    a = MatchAndExtract(str(synth30 / "images"), BPRConfig().to_dict(), 0.15, 0.5)(batch)
    b = MatchAndExtract("s3://train/set/images", BPRConfig().to_dict(), 0.15, 0.5)(batch)
    assert len(a["img"]) > 0 and (a["img"] == b["img"]).all() and (a["gt"] == b["gt"]).all()
