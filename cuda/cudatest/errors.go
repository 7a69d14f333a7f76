package cudatest

// CUresult codes the fake returns beyond those package cuda names.
const (
	CodeDeinitialized      = 4
	CodeContextIsDestroyed = 709
	CodeNotFound           = 500
	CodeIllegalAddress     = 700
	CodeUnknown            = 999
)

// errorText holds the driver's names and descriptions, NUL-terminated: the
// fake hands out pointers into these strings as cuGetErrorName/String do
// into static driver memory.
var errorText = map[int32][2]string{
	0:   {"CUDA_SUCCESS\x00", "no error\x00"},
	1:   {"CUDA_ERROR_INVALID_VALUE\x00", "invalid argument\x00"},
	2:   {"CUDA_ERROR_OUT_OF_MEMORY\x00", "out of memory\x00"},
	3:   {"CUDA_ERROR_NOT_INITIALIZED\x00", "initialization error\x00"},
	4:   {"CUDA_ERROR_DEINITIALIZED\x00", "driver shutting down\x00"},
	100: {"CUDA_ERROR_NO_DEVICE\x00", "no CUDA-capable device is detected\x00"},
	101: {"CUDA_ERROR_INVALID_DEVICE\x00", "invalid device ordinal\x00"},
	201: {"CUDA_ERROR_INVALID_CONTEXT\x00", "invalid device context\x00"},
	400: {"CUDA_ERROR_INVALID_HANDLE\x00", "invalid resource handle\x00"},
	500: {"CUDA_ERROR_NOT_FOUND\x00", "named symbol not found\x00"},
	700: {"CUDA_ERROR_ILLEGAL_ADDRESS\x00", "an illegal memory access was encountered\x00"},
	709: {"CUDA_ERROR_CONTEXT_IS_DESTROYED\x00", "context is destroyed\x00"},
	712: {"CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED\x00", "part or all of the requested memory range is already mapped\x00"},
	713: {"CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED\x00", "pointer does not correspond to a registered memory region\x00"},
	801: {"CUDA_ERROR_NOT_SUPPORTED\x00", "operation not supported\x00"},
	999: {"CUDA_ERROR_UNKNOWN\x00", "unknown error\x00"},
}

// ErrorName is the driver's name of a CUresult ("CUDA_ERROR_OUT_OF_MEMORY"),
// or "" for a code the fake does not know.
func ErrorName(code int) string {
	e, ok := errorText[int32(code)]
	if !ok {
		return ""
	}
	return e[0][:len(e[0])-1]
}
