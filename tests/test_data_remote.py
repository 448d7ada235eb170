"""Shard lists as users write them and shards where they keep them: brace patterns, `::` sources with weights,
S3 (moto's server), HTTP with Range, and `pipe:` commands, all on 127.0.0.1 (`benchmarks/servers.py`).

The reference is always the same shards read from the local disk (or, for weights, the binomial law): remote
reading must give the same batches, a resumed stream over S3 the uninterrupted one, a flaky server the same data
after retries; an unreadable shard is skipped, named and counted, until too many stop the run with one error line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmsoftmoe_cli
from benchmarks.servers import http_server, s3_server, upload
from mmsoftmoe.data import ShardStream, count_skipped, list_shards, sources
from mmsoftmoe.data.sources import local_items_exist, split_commas
from tests.test_data_streaming import SHARD_SIZE, loader, numbers, take, write_shards

NAMES = "shard-{000..005}.tar"


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, 6, bad=(5,))
    return folder


@pytest.fixture(scope="module")
def s3(local) -> str:
    """The local shards uploaded to s3://bucket/laion/ on a loopback moto server (AWS_ENDPOINT_URL set)."""
    with s3_server() as endpoint:
        upload(endpoint, "bucket", "laion", sorted(local.glob("*.tar")))
        yield "s3://bucket/laion"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(sources, "RETRY_DELAYS", (0.01, 0.02, 0.04))


def batches_of(source: str, steps: int = 6, **kwargs) -> list[dict]:
    return take(loader(list_shards(source), batch=4, steps=steps, seed=2, shuffle_buffer=6, **kwargs), steps)


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x["text"] == y["text"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


def test_braces_keep_padding_mix_with_globs_and_commas_and_cost_no_request(local, tmp_path):
    assert list_shards(f"{local}/shard-{{000..002}}.tar") == [str(local / f"shard-00{i}.tar") for i in range(3)]
    mixed = list_shards(f"{local}/shard-00{{4,5}}.tar,{local}/shard-00[01].tar::{local}/shard-003.tar")
    assert [Path(s).name for s in mixed] == ["shard-004.tar", "shard-005.tar", "shard-000.tar", "shard-001.tar",
                                             "shard-003.tar"]
    assert split_commas("a/{0,1}.tar,b.tar") == ["a/{0,1}.tar", "b.tar"]
    (tmp_path / "laion-00000.tar").write_bytes((local / "shard-000.tar").read_bytes())
    with http_server(tmp_path) as server:  # a LAION-sized list: only its first shard is asked for
        listed = list_shards(f"{server.url}/laion-{{00000..41455}}.tar")
    assert len(listed) == 41456 and listed[-1] == f"{server.url}/laion-41455.tar"
    assert set(server.requests) == {"laion-00000.tar"}


def test_http_s3_and_pipe_give_the_local_batches(local, s3):
    expected = batches_of(f"{local}/{NAMES}")
    with http_server(local) as server:
        assert same(batches_of(f"{server.url}/{NAMES}"), expected)
        assert server.requests["shard-000.tar"] >= 1
    assert same(batches_of(f"{s3}/{NAMES}"), expected)
    assert same(batches_of(f"{s3}/*.tar"), expected)  # a remote glob: one listing request
    assert same(batches_of(f"pipe:cat {local}/{NAMES}"), expected)


@pytest.mark.parametrize("workers,accum,batch,start_step", [(0, 1, 2, 3), (2, 2, 4, 3)])
def test_resume_over_s3_equals_the_uninterrupted_stream(local, s3, workers, accum, batch, start_step):
    stream = list_shards(f"{s3}/{NAMES}")
    kwargs = dict(batch=batch, steps=8, workers=workers, accum=accum, seed=2, shuffle_buffer=6)
    full = take(loader(stream, **kwargs), 8 * accum)
    resumed = take(loader(stream, start_step=start_step, **kwargs), (8 - start_step) * accum)
    assert same(full[start_step * accum:], resumed)  # mid-shard: position 6 (batch 2), stream 0's 3 (two workers)
    assert same(full, take(loader(list_shards(f"{local}/{NAMES}"), **kwargs), 8 * accum))


def test_dropped_connections_are_retried_and_logged(local, caplog):
    expected = batches_of(f"{local}/{NAMES}")
    with caplog.at_level(logging.WARNING), http_server(local, fail_first=6) as server:
        got = batches_of(f"{server.url}/{NAMES}")
    assert same(got, expected)
    assert any("retry 1 of 3" in r.getMessage() and "shard-00" in r.getMessage() for r in caplog.records)
    assert min(server.requests.values()) > 6  # every shard read met the dropped connections


def test_an_unreadable_shard_is_skipped_named_and_counted_until_too_many(local, tmp_path):
    log = tmp_path / "skipped.jsonl"
    with http_server(local, missing=("shard-002.tar",)) as server:
        urls = list_shards(f"{server.url}/{NAMES}")
        got = [n for b in batches_of(f"{server.url}/{NAMES}", skip_log=log, max_unreadable_fraction=0.2)
               for n in numbers(b)]
        assert not set(got) & set(range(2 * SHARD_SIZE, 3 * SHARD_SIZE))  # shard 2's samples never appear
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert {(e["source"], e["key"]) for e in entries if "unreadable shard" in e["reason"]} == {
            (urls[2], "(whole shard)")}
        assert len(entries) == len({(e["source"], e["key"]) for e in entries}) == count_skipped(log)
        with pytest.raises(ValueError, match=r"1 of 6 shards are unreadable.*shard-002.tar.*"
                                             r"data.max_unreadable_shards"):
            batches_of(f"{server.url}/{NAMES}", max_unreadable_fraction=0.1)


def test_a_missing_first_object_is_one_clear_error(s3):
    with pytest.raises(FileNotFoundError, match=r"s3://bucket/laion/nope-0.tar' does not exist.*AWS_ENDPOINT_URL"):
        list_shards(f"{s3}/nope-{{0..3}}.tar")
    local_items_exist(f"{s3}/nope-{{0..3}}.tar")  # config validation makes no request


def smoke(tmp_path: Path, name: str, *extra: str) -> tuple[int, str]:
    argv = ["train", "--config", "smoke", f"output_dir={tmp_path / name}", "data.streaming=true",
            "data.num_workers=0", "eval.dataset=none", "batch_size=8", "steps=3", "checkpoint_every=100",
            "trackers=[]", *extra]
    return mmsoftmoe_cli.main(argv), name


def trained(tmp_path: Path, name: str) -> bool:
    return (tmp_path / name / "final" / "open_clip_model.safetensors").is_file()


@pytest.mark.slow
def test_each_kind_of_source_trains_a_smoke_run(local, s3, tmp_path):
    with http_server(local) as server:
        sources = {"braces": f"{local}/{NAMES}", "s3": f"{s3}/{NAMES}", "https": f"{server.url}/{NAMES}",
                   "pipe": f"pipe:cat {local}/{NAMES}"}
        for name, source in sources.items():
            assert smoke(tmp_path, name, f"data.source={source}") == (0, name)
            assert trained(tmp_path, name), name


@pytest.mark.slow
def test_weighted_sources_are_drawn_by_weight(tmp_path, monkeypatch):
    """Two sources of 2 shards, weights 9:1, resampled: each drawn shard comes from the first with p = 0.9."""
    write_shards(tmp_path / "a", 2)
    write_shards(tmp_path / "b", 2)
    drawn: list[str] = []
    real = ShardStream.sample

    def recorded(self, record, stream, position, seed):
        drawn.append(Path(record[0]).parent.name)
        return real(self, record, stream, position, seed)

    monkeypatch.setattr(ShardStream, "sample", recorded)
    rc, _ = smoke(tmp_path, "mix", f"data.source={tmp_path}/a/shard-{{000..001}}.tar::{tmp_path}/b",
                  "data.source_weights=[9,1]", "data.resampled=true", "steps=10", "data.shuffle_buffer=0")
    assert rc == 0 and trained(tmp_path, "mix") and len(drawn) == 80
    draws = len(drawn) // SHARD_SIZE  # whole shards are drawn: the independent trials
    from_a = drawn[::SHARD_SIZE].count("a")
    assert abs(from_a - 0.9 * draws) <= 3.5 * math.sqrt(draws * 0.9 * 0.1), (from_a, draws)  # uniform: 10
    assert drawn.count("a") == SHARD_SIZE * from_a


def test_without_resampling_sources_are_read_in_proportion_and_weights_are_refused(tmp_path, capsys):
    write_shards(tmp_path / "a", 1)
    write_shards(tmp_path / "b", 3, first=100)
    source = f"{tmp_path}/a::{tmp_path}/b"
    epoch = [n for b in take(loader(list_shards(source), batch=4, steps=4), 4) for n in numbers(b)]
    assert sorted(epoch) == list(range(4)) + list(range(100, 112))  # one epoch: every shard of both sources once
    assert smoke(tmp_path, "w", f"data.source={source}", "data.source_weights=[3,1]") == (2, "w")
    assert "data.source_weights need data.resampled=true" in capsys.readouterr().err
    assert smoke(tmp_path, "n", f"data.source={source}", "data.source_weights=[3,1,1]",
                 "data.resampled=true") == (2, "n")
    assert "3 value(s) for 2 '::'-joined source(s)" in capsys.readouterr().err


def test_too_many_unreadable_shards_stop_the_run_with_one_error_line(local, tmp_path, capsys):
    with http_server(local, missing=("shard-003.tar",)) as server:
        rc, _ = smoke(tmp_path, "bad", f"data.source={server.url}/{NAMES}", "data.num_workers=1",
                      "data.max_unreadable_shards=0", "steps=6")
    err = capsys.readouterr().err
    errors = re.findall(r"error: .*", err)  # the progress bar may precede it on the same line
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: 1 of 6 shards are unreadable") and "shard-003.tar" in errors[0]


def test_storage_options_reach_s3fs(s3, tmp_path, monkeypatch, capsys):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert len(list_shards(f"{s3}/{NAMES}", {"endpoint_url": endpoint})) == 6
    assert smoke(tmp_path, "o", f"data.source={s3}/{NAMES}", "data.storage_options=not json") == (2, "o")
    assert "data.storage_options is not JSON" in capsys.readouterr().err


def test_a_pipe_stream_is_the_seeded_arithmetic(tmp_path):
    """The pure-function contract survives the transport: the expected stream written down from the seeded
    permutations equals what the pipe source yields."""
    write_shards(tmp_path, 3)
    got = [numbers(b) for b in take(loader(list_shards(f"pipe:cat {tmp_path}/shard-{{000..002}}.tar"), batch=4,
                                           steps=3, seed=7), 3)]
    order = np.random.default_rng([7, 0]).permutation(3)
    assert got == [[s * SHARD_SIZE + i for i in range(SHARD_SIZE)] for s in order]


def test_loader_bench_versus_webdataset_reads_every_sample_once(tmp_path):
    from benchmarks import loader_bench

    result = loader_bench.main(["--versus-webdataset", "--model", "SoftMoE-Micro-4-32", "--batch", "4", "--samples",
                                "16", "--shards", "2", "--image-px", "16", "--workers", "1",
                                "--out", str(tmp_path / "bench.json")])
    assert [(r["where"], r["workers"]) for r in result["rows"]] == [("local", 1), ("s3 (loopback)", 1)]
    for row in result["rows"]:  # one epoch each: every sample of the shards, ShardStream's once each
        assert row["shardstream_samples"] == row["webdataset_samples"] == row["samples"] == 16
        assert row["ratio"] == pytest.approx(row["shardstream_samples_per_s"] / row["webdataset_samples_per_s"])
    assert result["workers_per_gpu_b16"] == math.ceil(667 / result["shardstream_samples_per_s_per_worker"])
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_a_run_killed_mid_shard_and_resumed_over_s3_reads_the_uninterrupted_samples(s3, tmp_path, monkeypatch):
    import mmsoftmoe_training.main as train_main

    read: list[tuple[str, str]] = []
    real_sample, real_step = ShardStream.sample, train_main.optimizer_step

    def recorded(self, record, stream, position, seed):
        read.append((record[0], record[1]))
        return real_sample(self, record, stream, position, seed)

    monkeypatch.setattr(ShardStream, "sample", recorded)
    args = (f"data.source={s3}/{NAMES}", "batch_size=2", "steps=6", "checkpoint_every=3", "data.shuffle_buffer=3")
    assert smoke(tmp_path, "full", *args)[0] == 0
    uninterrupted, read[:] = list(read), []
    calls = {"n": 0}

    def killed_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*a, **k)

    monkeypatch.setattr(train_main, "optimizer_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        smoke(tmp_path, "killed", *args)
    monkeypatch.setattr(train_main, "optimizer_step", real_step)
    read[:] = []
    assert smoke(tmp_path, "killed", *args)[0] == 0  # resumes at step 3: stream position 6, inside shard 1
    # The resumed run reads one shuffle window (positions 6..8), then exactly what the uninterrupted run read;
    # the bad sample 5's replacements are read in the same order too.
    assert len(read) >= 6 and read == uninterrupted[len(uninterrupted) - len(read):]
    assert len(uninterrupted) >= 12 and read != uninterrupted[:len(read)]  # not simply the stream from its start
    final = [load_file(str(tmp_path / run / "final" / "open_clip_model.safetensors")) for run in ("full", "killed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
