package cuda

// GPUInfo is one GPU as NVML sees it. Index is NVML's (PCI order), not the
// CUDA ordinal: match the two by UUID.
type GPUInfo struct {
	Index       int
	UUID        string // "GPU-..."
	Name        string
	PCIBusID    string // NVML's form: "00000000:00:06.0"
	MemoryTotal uint64
	MemoryUsed  uint64 // includes the driver's reservation (NVML v1 memory info)
	MemoryFree  uint64
}
