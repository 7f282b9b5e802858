"""Installed as ``kvwire._cuda_src``: the CUDA kernel source, for run-time (NVRTC) builds."""
