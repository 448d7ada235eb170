"""Data loading throughput against the training step's demand: can the loader keep the step fed?

Run as `python -m benchmarks.loader_bench [--model SoftMoE-Mini-8-64] [--batch 64] [--workers 1,2,4]
[--samples 768] [--shards 8] [--image-px 256] [--batches 16] [--step-samples-per-s X]
[--out benchmarks/results/loader_bench.json]`.

- Data, generated (no downloads): `--samples` JPEG photos-like images of `--image-px` (smooth colour fields with
  noise) and captions, written both as WebDataset shards (`--shards` tars) and as an image folder with
  `metadata.jsonl`, in a temporary folder.
- Loader: `training.data.build_train_loader`, as `fit` builds it, for the streaming path (`ShardStream`,
  shuffle window 256) and the map-style path (`load_pairs` image folder, `StepSampler`), with the model's train
  transform and tokenizer, at 1, 2 and 4 DataLoader workers: samples/s over `--batches` batches of `--batch` in
  steady state, i.e. after the first batch (whose latency, worker start-up included, is reported apart) and after
  the batches the workers prefetched meanwhile, which are drained untimed (they would inflate the rate).
- Demand: samples/s of the training step `fit` runs (`benchmarks.train_bench.ours_step`) for `--model` at the same
  batch, median of a few steps, or `--step-samples-per-s` when given. A loader row below 1.0x starves the step.
- Machine state: load average and CPU busy fraction before, load after. Workers share the cores with the step in a
  real run; on a 2-core machine the 4-worker row measures oversubscription, not extra capacity.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import open_clip
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common import check_machine, write_results
from benchmarks.train_bench import make_batch, ours_step
from mmsoftmoe.data import ShardStream, TarShard, list_shards, load_pairs, transforms_from_preprocess_cfg
from mmsoftmoe.data.shards import index_shard
from mmsoftmoe.models.clip import build_clip, preprocess_config
from mmsoftmoe_training.data import PREFETCH_FACTOR, build_train_loader
from mmsoftmoe_training.loop import build_loss
from mmsoftmoe_training.optim import build_optimizer

SHUFFLE_BUFFER = 256
B16_DEMAND = 667  # images/s one GPU consumes at the paper's 1.5 ms per image (B/16 recipe)


def photo_like(rng: np.random.Generator, side: int) -> bytes:
    """A JPEG of a smooth random colour field with noise: it compresses (and decodes) like a photo, not like noise."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_data(folder: Path, samples: int, shards: int, side: int) -> tuple[list[str], Path]:
    """The same pairs as WebDataset shards (sample i in shard i % shards) and as an image folder."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    rows, pairs = [], []
    for i in range(samples):
        jpeg, caption = photo_like(rng, side), f"a photo of a random colour field, number {i}"
        (images / f"{i:06d}.jpg").write_bytes(jpeg)
        rows.append(json.dumps({"file_name": f"{i:06d}.jpg", "text": caption}))
        pairs.append((f"{i:06d}", {"jpg": jpeg, "txt": caption.encode()}))
    for s in range(shards):
        with TarShard(folder / f"shard-{s:04d}.tar") as shard:
            for key, fields in pairs[s::shards]:
                shard.write(key, fields)
    (images / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return list_shards(str(folder / "*.tar")), images


def loader_rate(dataset, workers: int, batch: int, batches: int) -> dict:
    """Samples/s of the training loader in steady state: over `batches` batches taken after the first one (its
    latency timed apart) and after the batches the workers prefetched meanwhile (drained untimed)."""
    drain = PREFETCH_FACTOR * workers
    start = time.perf_counter()
    loader = build_train_loader(dataset, global_batch=batch, grad_accum_steps=1, rank=0, world_size=1, seed=0,
                                start_step=0, total_steps=1 + drain + batches, num_workers=workers, pin_memory=False)
    next(loader)
    first = time.perf_counter() - start
    for _ in range(drain):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return {"first_batch_s": first, "samples_per_s": batches * batch / (time.perf_counter() - start)}


def step_rate(model_name: str, batch: int, steps: int = 5, warmup: int = 2) -> float:
    """Samples/s of `fit`'s optimizer step for `model_name` on one fixed batch (median step time)."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, tokenizer = build_clip(model_name)
    optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    data = make_batch(model, tokenizer, batch)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        ours_step(accelerator, model, optimizer, loss_fn, data, step, grad_clip=1.0)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[warmup:])


def _time_pass(batches: Iterator[dict], count: int | None) -> tuple[list[str], float, float]:
    """Captions of `count` samples (all, when None) taken from `batches`; the seconds to the first batch (worker
    start-up, connections) and samples/s after it (steady state)."""
    start, captions = time.perf_counter(), []
    first = after_first = 0.0
    for batch in batches:
        captions.extend(batch["text"] if isinstance(batch, dict) else batch[1])
        if not first:
            first, after_first = time.perf_counter() - start, len(captions)
            start = time.perf_counter()
        if count is not None and len(captions) >= count:
            break
    return captions, first, (len(captions) - after_first) / (time.perf_counter() - start)


def shardstream_pass(shards: list[str], transform: Callable, workers: int, batch: int,
                     total: int) -> tuple[int, float, float]:
    """Distinct samples read, first-batch seconds and steady samples/s for one epoch of `ShardStream` (no shuffle
    window), `workers` workers."""
    stream = ShardStream(shards, transform=transform)
    batches = stream.batches(batch, workers, seed=0)
    loader = DataLoader(batches, batch_size=None, num_workers=workers,
                        prefetch_factor=PREFETCH_FACTOR if workers else None)
    captions, first, rate = _time_pass(iter(loader), total)
    return len(set(captions)), first, rate


def webdataset_pass(urls: list[str], transform: Callable, workers: int, batch: int) -> tuple[int, float, float]:
    """Samples read, first-batch seconds and steady samples/s for one pass of webdataset's own pipeline: decode to
    PIL RGB, the same transform."""
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .decode("pil").to_tuple("jpg;png", "txt").map_tuple(transform, lambda text: text)
               .batched(batch, partial=True))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers,
                           prefetch_factor=PREFETCH_FACTOR if workers else None)
    captions, first, rate = _time_pass(iter(loader), None)
    return len(captions), first, rate


def versus_webdataset(shards: list[str], transform: Callable, workers: list[int], batch: int) -> list[dict]:
    """Samples/s of one epoch read by ShardStream and by webdataset, local and from a loopback S3 server, with the
    ratio; ShardStream reads s3:// through s3fs, webdataset the same objects through presigned http:// URLs and
    curl (its own remote path)."""
    import boto3

    from benchmarks.servers import s3_server, upload

    rows = []
    total = sum(len(index_shard(s)) for s in shards)
    with s3_server() as endpoint:
        urls = upload(endpoint, "bench", "shards", shards)
        client = boto3.client("s3", endpoint_url=endpoint)
        signed = [client.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": u.split("/", 3)[3]})
                  for u in urls]
        places = {"local": (shards, shards), "s3 (loopback)": (urls, signed)}
        for where, (our_urls, their_urls) in places.items():
            for count in workers:
                read, ours_first, ours = shardstream_pass(our_urls, transform, count, batch, total)
                read_wds, theirs_first, theirs = webdataset_pass(their_urls, transform, count, batch)
                rows.append({"where": where, "workers": count, "samples": total, "shardstream_samples": read,
                             "webdataset_samples": read_wds, "shardstream_samples_per_s": ours,
                             "webdataset_samples_per_s": theirs, "ratio": ours / theirs,
                             "shardstream_first_batch_s": ours_first, "webdataset_first_batch_s": theirs_first})
    return rows


def main_versus(args: argparse.Namespace) -> dict:
    """The `--versus-webdataset` run: JSON, a table, and the workers one GPU at the B/16 recipe needs."""
    load, _ = check_machine()
    model, _ = build_clip(args.model)
    train_tf, _ = transforms_from_preprocess_cfg(preprocess_config(model))
    with tempfile.TemporaryDirectory() as tmp:
        shards, _ = write_data(Path(tmp), args.samples, args.shards, args.image_px)
        rows = versus_webdataset(shards, train_tf, [int(w) for w in args.workers.split(",")], args.batch)
    per_worker = max(r["shardstream_samples_per_s"] / r["workers"] for r in rows if r["where"] == "local")
    result = {"mode": "versus_webdataset", "model": args.model, "batch": args.batch, "image_px": args.image_px,
              "samples": args.samples, "shards": args.shards, "load_before": load,
              "webdataset": _version("webdataset"), "rows": rows,
              "b16_demand_img_per_s": B16_DEMAND, "shardstream_samples_per_s_per_worker": per_worker,
              "workers_per_gpu_b16": math.ceil(B16_DEMAND / per_worker)}
    print(f"{'where':<16}{'workers':>8}{'ShardStream/s':>15}{'webdataset/s':>14}{'ratio':>7}{'first batch s':>16}")
    for r in rows:
        print(f"{r['where']:<16}{r['workers']:>8}{r['shardstream_samples_per_s']:>15.1f}"
              f"{r['webdataset_samples_per_s']:>14.1f}{r['ratio']:>7.2f}"
              f"{r['shardstream_first_batch_s']:>8.2f} /{r['webdataset_first_batch_s']:>6.2f}")
    print(f"B/16 recipe demand {B16_DEMAND} img/s per GPU (1.5 ms/img): {result['workers_per_gpu_b16']} ShardStream "
          f"workers at {per_worker:.0f} samples/s each")
    return write_results(result, "", args.out)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SoftMoE-Mini-8-64", help="the demo's model (configs/demo.yaml)")
    parser.add_argument("--batch", type=int, default=64, help="the demo's batch")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--samples", type=int, default=768)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    parser.add_argument("--step-samples-per-s", type=float, default=None, help="the demand, instead of measuring")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader_bench.json"))
    parser.add_argument("--versus-webdataset", action="store_true",
                        help="instead: ShardStream vs webdataset's pipeline, local and over a loopback S3 server")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.versus_webdataset:
        return main_versus(args)
    load, _ = check_machine()
    model, tokenizer = build_clip(args.model)
    train_tf, _ = transforms_from_preprocess_cfg(preprocess_config(model))
    demand = args.step_samples_per_s or step_rate(args.model, args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards, folder = write_data(Path(tmp), args.samples, args.shards, args.image_px)
        paths = {"webdataset stream": ShardStream(shards, transform=train_tf, tokenizer=tokenizer,
                                                  shuffle_buffer=SHUFFLE_BUFFER),
                 "image folder": load_pairs(str(folder), transform=train_tf, tokenizer=tokenizer,
                                            cache_dir=str(Path(tmp) / "cache"))}
        for path, dataset in paths.items():
            for workers in map(int, args.workers.split(",")):
                rate = loader_rate(dataset, workers, args.batch, args.batches)
                rows.append({"path": path, "workers": workers, **rate, "vs_step": rate["samples_per_s"] / demand})
    result = {"model": args.model, "batch": args.batch, "image_px": args.image_px, "samples": args.samples,
              "shards": args.shards, "step_samples_per_s": demand, "step_measured": args.step_samples_per_s is None,
              "load_before": load, "threads": args.threads,
              "open_clip": open_clip.__version__, "torch": torch.__version__, "rows": rows}
    print(f"training step ({args.model}, batch {args.batch}): {demand:.1f} samples/s")
    print(f"{'path':<20}{'workers':>8}{'samples/s':>11}{'x step':>8}{'first batch s':>15}")
    for r in rows:
        print(f"{r['path']:<20}{r['workers']:>8}{r['samples_per_s']:>11.1f}{r['vs_step']:>8.2f}"
              f"{r['first_batch_s']:>15.2f}")
    return write_results(result, "", args.out)


if __name__ == "__main__":
    main()
