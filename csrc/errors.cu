// cudaError_t codes to text for the Python module (which does not include CUDA headers).
#include "common.cuh"

namespace cmfast {
const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
}  // namespace cmfast
