// The CUDA time loops and kernels of csrc/cuda/recurrence_cuda.cu, compiled by the host compiler
// for the simulator (RNNFUSED_CUDA_SIM): registered as rnnfused_sim::* on CPU tensors.
#include "../recurrence_cuda.cu"
