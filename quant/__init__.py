"""quant-audit: what FP16 and INT8 quantization does to the videos a text-to-video pipeline makes.

The package holds export, calibration, quantization, ONNX Runtime execution, the sampling
pipeline and the command line. See ``../shared/DESIGN.md`` for the contract (module names,
commands, exit codes, run files).
"""

__version__ = "0.1.0"
