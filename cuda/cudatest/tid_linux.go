package cudatest

import "syscall"

// tid is the calling OS thread: CUDA's current context is per thread.
func tid() int { return syscall.Gettid() }
