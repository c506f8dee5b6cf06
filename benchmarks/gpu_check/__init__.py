"""`make gpu-check`: everything seqwrap must prove on a CUDA device, in one run of under 10 minutes on an
H100/H200 (`python -m benchmarks.gpu_check`); `make gpu-check-dry` runs the same sections on the CPU at
toy sizes. One module per section:

  build         builds seqwrap._C for the visible GPU's architecture, prints cuda_status()
  kernels       the CUDA-marked tests (pytest -m cuda): each kernel vs the CPU kernel and seqwrap.ops.reference
  emulated      the same kernels under the host emulation of CUDA (tests/cuda_emu), a table beside the device's
  engines       SeCO, SpaCO, SeCO + offload, SeCO + MsT on a small Llama on the device, fp32 and bf16,
                full fine-tuning and LoRA, against float64 full backprop
  sanitizer     compute-sanitizer memcheck / racecheck / synccheck over sanitize_target.py
  xent_bench    LM head + loss at Liger's shapes (N 4K-32K, H 4096, V 128256, bf16): torch, seqwrap,
                Liger and Apple CCE when they install
  engine_bench  a ~1B Llama (bf16, LoRA): HF + grad checkpointing, SeCO, SpaCO 1/8, SeCO + offload,
                SeCO + MsT from 16K tokens up; peak memory, tokens/s, memory-model prediction

driver.py runs each in its own process and writes the report; report.py holds the tables.
"""
