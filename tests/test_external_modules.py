"""`[modules]` in audit.toml: a pipeline module exported elsewhere, audited in the full video loop.

The tiny pipeline's transformer is exported (by us, once per session), then renamed as another
exporter would have it (diffusers' `hidden_states`/`encoder_hidden_states`, an `out_sample`
output, a timestep input of its own name) and saved with its weights as external data under a
name of its own. The audit must take that file as the module's FP32 ONNX, map the names, prove
parity against PyTorch, and quantize and generate with it as with our own export.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from quant.cli import main
from quant.recipes.external import ExternalModule, mapping, rename_io
from quant.recipes.names import onnx_path

CONFIG = """
model = "wan2.2-t2v-tiny"
[generation]
height = 32
width = 32
num_frames = 5
[prompts]
eval = "{prompts}"
seeds = [0]
[calibration]
samples_per_module = 4
[quantize]
recipes = ["int8-dynamic"]
[runtime]
threads = 2
[variants]
run = ["onnx", "int8-dynamic@transformer"]
attribution = false
floor = false
{modules}
"""
THEIRS = {"latent": "hidden_states", "timestep": "t_in", "text_emb": "encoder_hidden_states", "noise_pred": "out_sample"}


def _theirs(src: Path, dest: Path, names: dict[str, str]) -> Path:
    model = onnx.load(str(src))
    rename_io(model, names)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="transformer.weights", size_threshold=1024)
    return dest


def _config(folder: Path, modules: str) -> Path:
    prompts = folder / "eval.txt"
    prompts.write_text("a red kite flying over a windy beach\n", encoding="utf-8")
    path = folder / "audit.toml"
    path.write_text(CONFIG.format(prompts=prompts.as_posix(), modules=modules), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def their_file(t2v_export, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("their-export")
    return _theirs(onnx_path(t2v_export.root, "onnx", "transformer"), folder / "wan_dit.onnx", THEIRS)


def test_names_map_by_alias_explicit_entry_and_lone_leftover(their_file):
    # hidden_states and encoder_hidden_states are known aliases, t_in the one input left, out_sample an alias
    got = mapping(ExternalModule(their_file), "transformer")
    assert got == {v: k for k, v in THEIRS.items()}
    assert mapping(ExternalModule(their_file, inputs=(("timestep", "t_in"),)), "transformer") == got


def test_their_transformer_runs_the_whole_audit(their_file, t2v_export, tmp_path, capsys):
    # the other modules come from the session's export, as files too (no second export: the suite's time)
    others = "".join(f'{m} = "{onnx_path(t2v_export.root, "onnx", m).as_posix()}"\n'
                     for m in ("text_encoder", "transformer_2", "vae_decoder"))
    config = _config(tmp_path, f'[modules]\n{others}[modules.transformer]\npath = "{their_file.as_posix()}"\n'
                               'inputs = {timestep = "t_in"}\n')
    code = main(["run", "--config", str(config), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    run_dir = next((tmp_path / "runs").glob("*/results.json")).parent
    results = json.loads((run_dir / "results.json").read_text())
    assert results["parity"]["transformer"]["passed"] and results["parity"]["transformer"]["rel_l2"] < 1e-4
    assert {v["name"] for v in results["variants"]} == {"onnx", "int8-dynamic@transformer"}
    work = next((tmp_path / "runs" / "work").iterdir())
    parity = json.loads((work / "parity.json").read_text())["modules"]["transformer"]["export"]
    assert parity["source"] == str(their_file) and parity["mapping"]["t_in"] == "timestep"
    assert parity["external_data"] and parity["dynamic_batch"]
    imported = onnx.load(str(onnx_path(work, "onnx", "transformer")), load_external_data=False).graph
    assert [i.name for i in imported.input] == ["latent", "timestep", "text_emb"] and imported.output[0].name == "noise_pred"
    # downstream unchanged: the int8-dynamic transformer was quantized from their file and generated with
    quantization = json.loads((work / "quantization" / "int8-dynamic.json").read_text())
    assert quantization["modules"]["transformer"]["census"]["compute_ops"]["MatMul"]["int8"] > 0
    assert "wan_dit.onnx" in (run_dir / "config.toml").read_text()


def test_names_that_cannot_be_mapped_are_exit_2_naming_both_lists(t2v_export, tmp_path, capsys):
    odd = _theirs(onnx_path(t2v_export.root, "onnx", "transformer"), tmp_path / "odd.onnx",
                  {"latent": "a", "timestep": "b", "text_emb": "c", "noise_pred": "y"})
    config = _config(tmp_path, f'[modules]\ntransformer = "{odd.name}"\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "odd.onnx" in err and "expected latent, timestep, text_emb; found a, b, c" in err
    assert not (tmp_path / "runs" / "work").exists()  # refused before any work


@pytest.mark.parametrize("modules, message", [
    ('[modules]\nunet = "x.onnx"\n', "modules.unet: unknown module 'unet'"),
    ('[modules]\ntransformer = "missing.onnx"\n', "missing.onnx: ONNX model not found"),
    ('[modules.transformer]\ninputs = {latent = "x"}\n', "modules.transformer.path"),
])
def test_bad_modules_entries_are_exit_2(tmp_path, capsys, modules, message):
    assert main(["run", "--config", str(_config(tmp_path, modules)), "--out", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
