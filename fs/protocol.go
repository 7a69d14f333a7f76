package fs

// CUDAXattr is the extended attribute holding a weights file's CUDA manifest
// (JSON, see docs/PROTOCOL.md). It is absent (ENODATA) without a GPU replica.
const CUDAXattr = "user.weightfs.cuda"

// XXH3Xattr is the extended attribute holding a file's XXH3-64 as 16
// lowercase hex digits. Every file lists it; a getxattr waits until the
// daemon has computed it (EINTR if interrupted, EIO if the file's host image
// could not be filled), so a script never races the background checksum.
const XXH3Xattr = "user.weightfs.xxh3"

// IoctlCUDAManifest is _IOR('W', 1, struct weightfs_cuda_manifest): the same
// JSON by ioctl on an open file. The struct is a little-endian uint32 length,
// a uint32 reserved (0), then the JSON bytes, IoctlCUDAManifestSize bytes in
// all. FUSE ioctls on regular files are "restricted": the kernel takes the
// direction and size from the command number and copies at most 16383 bytes.
const IoctlCUDAManifest = iocRead<<30 | IoctlCUDAManifestSize<<16 | 'W'<<8 | 1

// IoctlRelease is _IO('W', 3): the calling process closed every mapping of
// the version's slabs and stops holding it (docs/PROTOCOL.md §3.1).
const IoctlRelease = 'W'<<8 | 3

// IoctlCUDAManifestSize is sizeof(struct weightfs_cuda_manifest).
const IoctlCUDAManifestSize = 16376

const (
	iocRead     = 2
	ioctlHeader = 8
)
