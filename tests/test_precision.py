"""The `paper` precision preset: fp16 language model (with LLaVA's projector), fp32 vision tower."""

import dataclasses
import json

import pytest
import torch

from davsp import bench
from davsp.adapters import PRECISIONS, Precision, as_precision, load_adapter
from davsp.adapters.base import resolve_module
from davsp.bench.models import build_architecture
from davsp.config import TrainConfig, resolve_device_dtype
from davsp.errors import DavspError
from davsp.generate import generate_responses
from davsp.train import loss_and_gradient, train_vsp
from davsp.vector import extract_harmfulness_vector
from fake_device import requested_device  # DAVSP_TEST_DEVICE: cpu by default, cuda on a GPU machine

FAMILIES = ["tiny_llava_path", "tiny_qwen2vl_path"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(fp32 training setup, the same setup on the model loaded with the paper preset) for one family."""
    path, device = str(request.getfixturevalue(request.param)), requested_device()
    full = bench.train_setup(load_adapter(path, device=device), tmp_path_factory.mktemp("precision"), batch_size=2,
                             seed=0)
    _, paper = resolve_device_dtype(device, "paper")
    return full, dataclasses.replace(full, adapter=load_adapter(path, device=device, dtype=paper))


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def test_paper_preset_dtype_of_every_module(pair):
    adapter = pair[1].adapter
    vision = resolve_module(adapter.model, adapter.vision_path)
    in_vision = {id(p) for p in vision.parameters()}
    rest = {p.dtype for p in adapter.model.parameters() if id(p) not in in_vision}
    assert _dtypes(vision) == {torch.float32} and rest == {torch.float16}
    assert adapter.precision == Precision(torch.float16, torch.float32) and adapter.precision.name == "paper"
    if adapter.family == "llava":  # the projector belongs to the language side, as in LLaVA's builder
        assert _dtypes(adapter.model.model.multi_modal_projector) == {torch.float16}


def test_pixels_enter_the_tower_in_fp32_and_features_reach_the_decoder_in_fp16(pair):
    setup = pair[1]
    adapter, pool = setup.adapter, setup.pools[False]
    watched = {"vision": resolve_module(adapter.model, adapter.vision_path), "decoder": adapter.decoder_layers()[0]}
    if adapter.family == "llava":  # LLaVA's features pass through the cast hook into the fp16 projector
        watched["projector"] = adapter.model.model.multi_modal_projector
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args[0].dtype

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in watched.items()]
    try:
        batch = adapter.batch(pool.questions[:2], setup.blank_vsp().compose(pool.prepared[:2], adapter.normalize))
        assert batch.model_inputs["pixel_values"].dtype == torch.float32
        with torch.no_grad():
            adapter.trunk()(**batch.model_inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {name: torch.float32 if name == "vision" else torch.float16 for name in watched}


@pytest.mark.parametrize("harmful, with_output", [(True, False), (False, True)], ids=["harmful", "benign+output"])
def test_paper_step_matches_float32(pair, harmful, with_output):
    # stated tolerance (docs/performance.md): projections within 1% of the largest, output loss within 1e-3
    results = []
    for setup in pair:
        pool = setup.pools[harmful]
        other = next(i for i, q in enumerate(pool.questions) if len(q) != len(pool.questions[0]))  # left padding
        (_, _, output_loss, proj), grad = loss_and_gradient(
            setup.adapter, setup.blank_vsp(), pool, [0, other], harmful, with_output, setup.layer, setup.direction,
            setup.thresholds, setup.config)
        results.append((proj, output_loss, grad))
    (proj, output_loss, grad), (paper_proj, paper_output_loss, paper_grad) = results
    assert paper_proj.dtype == torch.float32 and paper_grad.dtype == torch.float32
    assert torch.allclose(paper_proj, proj, rtol=0, atol=0.01 * proj.abs().max())
    assert torch.allclose(paper_output_loss, output_loss, rtol=1e-3)
    grad, paper_grad = grad.cpu(), paper_grad.cpu()
    border = pair[0].blank_vsp().mask.expand_as(grad)
    assert paper_grad[~border].abs().max() == 0 and paper_grad[border].abs().max() > 0
    clear = grad.abs() > 0.01 * grad.abs().max()  # fp16 rounding may flip the sign of a near-zero gradient
    assert clear.sum() > 0.5 * border.sum() and (paper_grad[clear].sign() == grad[clear].sign()).float().mean() > 0.99


def test_training_and_generation_run_with_the_paper_preset(pair, tmp_path):
    setup = pair[1]
    adapter = setup.adapter
    harmful, benign = setup.pools[True].records, setup.pools[False].records
    vector = extract_harmfulness_vector(adapter, harmful[:4], benign[:4])
    config = TrainConfig(steps=3, padding=setup.config.padding, layer=str(setup.layer), thresholds="auto",
                         dtype="paper", projection_samples=2, checkpoint_every=3)
    vsp = train_vsp(adapter, vector, harmful, benign, config, tmp_path / "run", progress=False)
    moved = (vsp.values.cpu() != setup.blank_vsp().values.cpu()).any(0)
    assert vsp.values.dtype == torch.float32 and moved[vsp.mask].any() and not moved[~vsp.mask].any()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "paper"
    answers = [[row["response"] for row in generate_responses(adapter, benign[:3], defense="davsp", vsp=vsp,
                                                               max_new_tokens=4, batch_size=3, progress=False,
                                                               static_cache=static)]
               for static in (False, True)]
    assert answers[0] == answers[1] and all(answers[0])


def test_bench_architecture_builds_the_same_precision():
    # real LLaVA-1.5-13B shapes on the meta device: dtypes and sizes only, no memory
    adapter = build_architecture("llava-1.5-13b", device="meta", dtype="paper")
    assert adapter.precision.name == "paper" and _dtypes(adapter.model.model.vision_tower) == {torch.float32}
    assert _dtypes(adapter.model.model.language_model) == {torch.float16}
    assert sum(p.numel() for p in adapter.model.parameters()) == 13_351_494_656


def test_precision_names_and_bad_values():
    assert set(PRECISIONS) == {"float32", "bfloat16", "float16", "paper"}
    assert as_precision(torch.bfloat16) == PRECISIONS["bfloat16"] and as_precision("paper") is PRECISIONS["paper"]
    assert Precision(torch.bfloat16, torch.float32).name == "bfloat16 (vision float32)"
    assert resolve_device_dtype("cpu", "default") == ("cpu", PRECISIONS["float32"])
    with pytest.raises(DavspError, match="dtype 'half': choose one of float32, bfloat16, float16, paper"):
        as_precision("half")
    with pytest.raises(DavspError, match="dtype 'half'"):
        resolve_device_dtype("cpu", "half")
    with pytest.raises(DavspError, match="config dtype='half'"):
        TrainConfig(dtype="half")
