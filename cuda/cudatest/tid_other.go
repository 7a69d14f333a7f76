//go:build !linux

package cudatest

// tid is the calling OS thread where it can be told; elsewhere every thread
// shares one current context.
func tid() int { return 0 }
