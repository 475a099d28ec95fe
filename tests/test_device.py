"""Every davsp path with the model on a device other than the CPU, as a GPU user runs it.

On a CPU-only machine the device is tests/fake_device.py's stand-in, which raises like CUDA on any
operation mixing it with a CPU tensor; with DAVSP_TEST_DEVICE=cuda the same tests run on the GPU.
Each path is also compared with the same model on the CPU, so the device changes nothing but speed.
"""

import json
from contextlib import nullcontext

import pytest
import torch

from davsp import bench, doctor
from davsp.config import TrainConfig
from davsp.data.records import load_records
from davsp.generate import generate_responses
from davsp.prompt import VisualSafetyPrompt
from davsp.train import Pool, loss_and_gradient, train_vsp
from davsp.vector import extract_harmfulness_vector
from fake_device import FakeDeviceTensor, device_under_test, fake_device, load_on_device, values

DEVICE = device_under_test()
FAMILIES = ["llava", "qwen2vl"]
VALUELESS = torch.empty(2, 3, 4, 4, device="meta")  # a real meta tensor, made before any fake-device mode


def device_modes():
    """The fake device's modes (a real device needs none)."""
    return fake_device() if DEVICE == "fake" else nullcontext()


@pytest.fixture(autouse=True)
def on_device():
    with device_modes():
        yield


@pytest.fixture(scope="module", autouse=True)
def float32_on_one_thread():
    """One CPU thread: tiny models are many small ops, faster on one thread (much faster on a busy CPU).
    No TF32 on a GPU: the device's results are compared with the CPU's in float32."""
    saved = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_num_threads(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    """(the tiny model on the device under test, the same model on the CPU)."""
    path = request.getfixturevalue(f"tiny_{request.param}_path")
    return load_on_device(path, DEVICE), load_on_device(path, "cpu")


@pytest.fixture(scope="module")
def data(record_files):
    return load_records(record_files["harmful"])[:2], load_records(record_files["benign"])[:2]


@pytest.fixture(scope="module")
def vectors(models, data):
    """The harmfulness vector extracted on the device and on the CPU."""
    with device_modes():
        return tuple(extract_harmfulness_vector(adapter, *data, batch_size=2) for adapter in models)


def on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return values(tensor).detach().cpu()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4, scale: float | None = None) -> bool:
    """Equal within tol x scale; the scale defaults to the larger of 1 and max |b| (losses, projections
    and states are of order 1; a projection near 0 still carries the float32 rounding of its terms)."""
    a, b = on_cpu(a).float(), on_cpu(b).float()
    scale = max(1.0, float(b.abs().max())) if scale is None else scale
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * scale


# -- the harness itself ----------------------------------------------------------------------------
def test_fake_device_raises_where_cuda_raises():
    with fake_device() as device:
        canvas = torch.rand(2, 3, 4, 4).to(device)
        cpu_mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
        mixed = [lambda: canvas - cpu_mean,  # LlavaAdapter.normalize's old bug
                 lambda: cpu_mean * canvas, lambda: torch.cat([canvas, torch.zeros(1, 3, 4, 4)]),
                 lambda: canvas.flatten(1) @ torch.ones(48, 2), lambda: torch.stack([canvas.sum(), torch.zeros(())]),
                 lambda: torch.nn.functional.embedding(torch.tensor([0, 1]), torch.ones(3, 2).to(device))]
        for operation in mixed:
            with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
                operation()
        with pytest.raises(RuntimeError, match="plain meta tensor"):
            canvas + VALUELESS


def test_fake_device_allows_what_cuda_allows_and_computes_real_values():
    cpu = torch.arange(12.0).view(3, 4)
    with fake_device() as device:
        moved = cpu.to(device)
        assert isinstance(moved, FakeDeviceTensor) and moved.device == device
        assert torch.equal(moved.cpu(), cpu) and (moved * 2).tolist() == (cpu * 2).tolist()
        assert (moved - torch.tensor(1.0)).sum().item() == (cpu - 1).sum().item()  # 0-dim CPU scalar
        assert moved[torch.tensor([2, 0])].cpu().tolist() == cpu[[2, 0]].tolist()  # CPU index tensor
        target = torch.zeros(3, 4, device=device)
        target.copy_(cpu)
        back = torch.empty(3, 4)
        back.copy_(target)
        assert torch.equal(back, cpu) and type(back) is torch.Tensor
        assert torch.tensor([1, 2], device=device).tolist() == [1, 2]
        assert isinstance(torch.arange(3, device=device), FakeDeviceTensor)
        leaf = cpu.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((leaf.to(device) ** 2).sum(), leaf)  # .to() is differentiable
        assert type(grad) is torch.Tensor and torch.equal(grad, 2 * cpu)


# -- davsp on the device ---------------------------------------------------------------------------
def test_normalize_follows_the_canvas_device(models):
    adapter, cpu_adapter = models
    canvas = torch.rand(2, 3, adapter.canvas_size, adapter.canvas_size)
    normalized = adapter.normalize(canvas.to(adapter.device))
    assert normalized.device == adapter.device
    assert close(normalized, cpu_adapter.normalize(canvas), 1e-6)


def test_vector_extraction(models, vectors):
    adapter, _ = models
    vector, cpu_vector = vectors
    assert vector.harmful_mean.device.type == "cpu"  # the file's tensors
    vector.check_model(adapter)
    assert close(vector.harmful_mean, cpu_vector.harmful_mean) and close(vector.benign_mean, cpu_vector.benign_mean)


PUBLISHED_OUTPUT_LOSS = {"output_target": "record", "answer_eos": False, "output_loss_mean": "sample"}


@pytest.mark.parametrize("harmful, with_output, loss_settings", [(True, False, {}), (False, True, {}),
                                                            (True, True, PUBLISHED_OUTPUT_LOSS)],
                         ids=["harmful-early-exit", "benign-both-losses", "harmful-published-output-loss"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
def test_training_step(models, vectors, data, harmful, with_output, loss_settings, checkpointing):
    config = TrainConfig(batch_size=2, padding=models[0].patch_size, activation_checkpointing=checkpointing,
                         **loss_settings)
    results = []
    for adapter, vector in zip(models, vectors):
        vsp = VisualSafetyPrompt.blank(adapter.canvas_size, config.padding, config.space,
                                       adapter.image_mean, adapter.image_std)
        vsp.values = vsp.values.to(adapter.device)
        pool = Pool(data[0] if harmful else data[1], vsp, adapter, None)
        # the direction as a vector file loads it, on the CPU
        losses, grad = loss_and_gradient(adapter, vsp, pool, [0, 1], harmful, with_output, 2, vector.direction(2),
                                         (1.0, -1.0), config)
        vsp.signed_step(grad, config.alpha)
        assert grad.device == adapter.device and vsp.values.device == adapter.device
        results.append((losses, grad))
    (losses, grad), (cpu_losses, cpu_grad) = results
    assert all(close(a, b) for a, b in zip(losses, cpu_losses))
    largest = float(on_cpu(cpu_grad).abs().max())  # gradients are small: compare relative to the largest
    assert largest > 0 and close(grad, cpu_grad, 1e-3, scale=largest)


def test_train_vsp_runs_and_resumes(models, vectors, data, tmp_path):
    adapter, vector = models[0], vectors[0]
    settings = dict(steps=1, batch_size=1, padding=adapter.patch_size, layer="2", checkpoint_every=1,
                    projection_samples=1, harmful_output_prob=1.0)
    train_vsp(adapter, vector, *data, TrainConfig(**settings), tmp_path, progress=False)
    vsp = train_vsp(adapter, vector, *data, TrainConfig(**{**settings, "steps": 2}), tmp_path, resume=True,
                    progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["output_loss"] is not None for row in rows)
    saved = VisualSafetyPrompt.load(tmp_path / "vsp.safetensors")
    assert torch.equal(saved.values, on_cpu(vsp.values))


# on a GPU a static cache compiles the decoding step (minutes): scripts/bench_device.sh times that path there
GENERATION_CASES = [("none", False), ("davsp", False)] + ([("davsp", True)] if DEVICE == "fake" else [])


@pytest.mark.parametrize("defense, static_cache", GENERATION_CASES,
                         ids=[f"{d}-static-cache" if static else d for d, static in GENERATION_CASES])
def test_generation(models, data, defense, static_cache):
    adapter, cpu_adapter = models
    vsp = VisualSafetyPrompt.blank(adapter.canvas_size, adapter.patch_size, "normalized",
                                   adapter.image_mean, adapter.image_std)  # on the CPU, as `--vsp` loads it
    rows = [generate_responses(a, data[0][:2], defense=defense, vsp=vsp, max_new_tokens=3, batch_size=2,
                               progress=False, static_cache=static_cache) for a in (adapter, cpu_adapter)]
    assert [r["response"] for r in rows[0]] == [r["response"] for r in rows[1]]
    assert [r["new_tokens"] for r in rows[0]] == [r["new_tokens"] for r in rows[1]]


def test_doctor_checks(models):
    adapter, _ = models
    assert doctor.preprocessing_error(adapter) <= doctor.TOLERANCE
    border, interior = doctor.border_gradient(adapter, adapter.patch_size)
    assert border > 0 and interior == 0.0


def test_bench_steps(models):
    adapter, _ = models
    train = bench.bench_train(adapter, steps=1, warmup=0, batch_size=1, reference=True, reference_pad=8)
    assert train["device"] == str(adapter.device)
    assert train["loss_rel_diff_harmful"] < 1e-3 and train["loss_rel_diff_benign"] < 1e-3
    generate = bench.bench_generate(adapter, n=2, max_new_tokens=2, batch_size=2, reference=True)
    assert generate["same_outputs"] == 1.0
