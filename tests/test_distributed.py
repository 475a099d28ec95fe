"""`torchrun --nproc-per-node 2 -m davsp generate|vector` (gloo, CPU) on the shipped safety-world model:
the sharded results equal the single-process ones, and a rank killed mid-run loses nothing on restart."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from davsp.adapters import load_adapter
from davsp.generate import generate_responses
from davsp.toy import MODEL_DIR
from davsp.toy.world import demo_splits
from davsp.vector import HarmfulnessVector, extract_harmfulness_vector

MAX_TOKENS = 24
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed-world")
    splits = demo_splits(folder / "data", seed=0)
    files = {}
    for name, records in (("test", splits["harmful_heldout"] + splits["benign_heldout"][::3]),
                          ("harmful", splits["harmful_train"][:13]), ("benign", splits["benign_train"][:11])):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"id": r.id, "image": str(r.image), "question": r.question})
                                       + "\n" for r in records))
    return {"folder": folder, "files": files, "splits": splits, "adapter": load_adapter(str(MODEL_DIR), device="cpu")}


def torchrun(*args) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", "0.1", "-m", "davsp", *map(str, args), "--model", str(MODEL_DIR), "--device", "cpu"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    return output


def rank_pid(launcher: int, rank: int) -> int | None:
    """The worker process torchrun started for `rank` (its environment says RANK=rank)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if int(parent.split()[1]) == launcher and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    return None


def test_sharded_vector_equals_the_single_process_vector(world):
    files, splits = world["files"], world["splits"]
    # batch 3 over 13 and 11 records: uneven blocks per rank, a short last batch, kept states on both ranks
    single = extract_harmfulness_vector(world["adapter"], splits["harmful_train"][:13], splits["benign_train"][:11],
                                        batch_size=3)
    out = world["folder"] / "vector.safetensors"
    job = torchrun("vector", "--harmful", files["harmful"], "--benign", files["benign"], "--batch-size", 3, "--out", out)
    output = finish(job)
    assert job.returncode == 0 and output.count("<- best") == 1, output  # rank 0 alone prints the table
    sharded = HarmfulnessVector.load(out)
    assert torch.equal(sharded.harmful_mean, single.harmful_mean)
    assert torch.equal(sharded.benign_mean, single.benign_mean)
    assert torch.equal(sharded.separation, single.separation)  # from the same first states, gathered in order
    assert sharded.metadata["counts"] == {"harmful": 13, "benign": 11}


def test_sharded_generation_killed_mid_run_resumes_to_the_single_process_output(world):
    files, adapter = world["files"], world["adapter"]
    records = world["splits"]["harmful_heldout"] + world["splits"]["benign_heldout"][::3]
    expected = generate_responses(adapter, records, defense="prefix", max_new_tokens=MAX_TOKENS, batch_size=2,
                                  progress=False)
    out = world["folder"] / "responses.jsonl"
    arguments = ("generate", "--data", files["test"], "--defense", "prefix", "--max-new-tokens", MAX_TOKENS,
                 "--batch-size", 2, "--out", out)
    job = torchrun(*arguments)
    shard = Path(f"{out}.shards") / "rank-00001.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (shard.exists() and shard.read_text().count("\n") >= 2):  # rank 1 has answered two batches
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before rank 1 answered"
        time.sleep(0.02)
    os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
    output = finish(job)
    assert job.returncode != 0, output  # torchrun ends the job when a rank dies
    assert not out.exists() and 2 <= len(shard.read_text().splitlines()) < len(records) // 2  # killed mid-run
    job = torchrun(*arguments)
    output = finish(job)
    assert job.returncode == 0, output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]  # each once, in input order
    assert [r["response"] for r in rows] == [r["response"] for r in expected]
    assert [r["new_tokens"] for r in rows] == [r["new_tokens"] for r in expected]
    assert not Path(f"{out}.shards").exists()
