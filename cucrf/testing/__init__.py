"""Test helpers: CPU CUDA kernel emulator and device-less NVRTC compile check."""
