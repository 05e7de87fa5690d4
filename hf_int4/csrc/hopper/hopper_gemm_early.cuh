// hopper_gemm.cuh with CUTLASS's grid dependency control compiled in, so that its kernels can launch early
// (kLaunchEarly): for the translation units of the data-parallel configurations (the define must come before any
// CUTLASS header).
#pragma once

#define CUTLASS_ENABLE_GDC_FOR_SM90
#include "hopper_gemm.cuh"
