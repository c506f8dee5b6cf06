"""Host emulation of the CUDA execution model, to run csrc/**/*.cu kernels without a GPU (see sw_cuda_emu.h)."""
