// CAKEKV_HD marks the functions compiled for both the CPU kernels and the CUDA kernels (shared math).
#pragma once

#ifdef __CUDACC__
#define CAKEKV_HD __host__ __device__
#else
#define CAKEKV_HD
#endif
