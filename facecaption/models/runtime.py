"""onnxruntime execution providers: CUDA first when this build has it, then CPU."""

from __future__ import annotations

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def default_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]
