"""``[runtime] device``: what can be checked without a GPU (this machine has none).

The CUDA path itself (numbers on a GPU, ONNX Runtime's CUDA provider) is not exercised here;
these tests check its plumbing: provider choice, the target's record and id, refusal without
CUDA, and that an assembled pipeline puts every PyTorch module and every ONNX stand-in on the
audit's device (``meta`` stands in for a GPU: a real device other than the CPU, where nothing runs).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import PROMPTS, SMALL
from quant.errors import UserError
from quant.pipeline.modules import present_modules
from quant.pipeline.ort_modules import OrtTransformer
from quant.recipes.names import parse_variant
from quant.stages import generate
from quant.stages.calibrate import CalibrationSpec
from quant.support import target as target_mod
from quant.support.target import current_target, ort_providers, set_device


def test_gpu_providers_come_first_where_onnxruntime_has_them():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cuda", gpu_build) == gpu_build
    assert ort_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cuda", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert ort_providers("cpu", gpu_build) == ["CPUExecutionProvider"]  # a CPU audit never takes the GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_and_the_process_stays_on_the_cpu():
    with pytest.raises(UserError, match=r'^audit.toml: runtime.device = "cuda": no CUDA device is visible to torch'):
        set_device("cuda", where="audit.toml: runtime.device")
    with pytest.raises(UserError, match="runtime.device: expected one of cpu, cuda, got 'tpu'"):
        set_device("tpu")
    assert target_mod.torch_device() == torch.device("cpu")
    assert current_target().device == "cpu" and current_target().gpu == {}


def test_a_gpu_target_is_another_target_and_says_which_gpu():
    cpu = current_target()
    gpu = replace(cpu, device="cuda", providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                  gpu={"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.1, "count": 1,
                       "driver": "570.86.15", "cuda": "12.8", "cudnn": 91002})
    other_driver = replace(gpu, gpu={**gpu.gpu, "driver": "575.51.03"})
    assert gpu.id.startswith(f"{cpu.arch}-cuda-sm90-") and gpu.id != cpu.id and other_driver.id != gpu.id
    assert "NVIDIA H100 80GB HBM3 (driver 570.86.15, CUDA 12.8" in gpu.describe()
    assert gpu.to_dict()["gpu"]["capability"] == "9.0" and gpu.to_dict()["device"] == "cuda"
    assert "cuda" not in cpu.id  # CPU ids are what they were before the device existed


def test_calibration_captured_on_a_gpu_is_a_cache_of_its_own():
    spec = CalibrationSpec(tuple(PROMPTS), (0,), 4)
    assert spec.key("sha256:x", SMALL) == spec.key("sha256:x", SMALL, "cpu")
    assert spec.key("sha256:x", SMALL, "cuda") != spec.key("sha256:x", SMALL, "cpu")


def test_assembled_pipeline_puts_modules_and_stand_ins_on_the_audit_device(t2v_export, monkeypatch):
    model = t2v_export.model
    meta = torch.device("meta")
    monkeypatch.setattr(generate, "torch_device", lambda: meta)
    monkeypatch.setattr(model, "_on_device", {})
    pipe = generate.assemble(model, parse_variant("onnx@transformer_2", present_modules(model.pipe)),
                             t2v_export.root, SMALL)
    assert isinstance(pipe.transformer_2, OrtTransformer) and pipe.transformer_2.device == meta
    assert pipe.transformer.device == meta and pipe.text_encoder.device == meta and pipe.vae.device == meta
    assert pipe.device == meta  # what WanPipeline puts its latents and prompt embeddings on
    assert model.pipe_on(meta) is model.pipe_on(meta)  # one copy per device
    assert model.pipe.transformer.device == torch.device("cpu")  # export, parity and INC keep the CPU pipeline
    assert model.pipe_on(torch.device("cpu")) is model.pipe
    # a stand-in takes tensors from the device and gives its output back there
    stand_in = pipe.transformer_2
    session_inputs = {i.name: tuple(d if isinstance(d, int) else 1 for d in i.shape) for i in stand_in.session.get_inputs()}
    inputs = {"hidden_states": torch.zeros(session_inputs["latent"]), "timestep": torch.full(session_inputs["timestep"], 500.0),
              "encoder_hidden_states": torch.zeros(session_inputs["text_emb"])}
    out = stand_in(**inputs)[0]
    assert out.device == meta and stand_in.calls == 1
