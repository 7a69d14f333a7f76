package control

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// scratch is a push's shared memory: a sealed memfd the writer maps
// writable and the daemon maps read-only. One owner (the push) closes it.
type scratch struct {
	file *os.File
	mem  []byte // nil when the scratch is empty
}

// newScratch makes a memfd of size bytes that can neither shrink nor grow
// (F_SEAL_SHRINK, F_SEAL_GROW) and whose seals cannot change (F_SEAL_SEAL):
// a writer that truncated it would make the daemon's reads of its mapping
// fault (SIGBUS) and take the daemon down.
func newScratch(size int64) (_ *scratch, err error) {
	fd, err := unix.MemfdCreate("weightfs-push-scratch", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("scratch: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "weightfs-push-scratch")
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	if err := unix.Ftruncate(fd, size); err != nil {
		return nil, fmt.Errorf("scratch: size it to %d bytes: %w", size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return nil, fmt.Errorf("scratch: seal it: %w", err)
	}
	s := &scratch{file: f}
	if size > 0 {
		if s.mem, err = unix.Mmap(fd, 0, int(size), unix.PROT_READ, unix.MAP_SHARED); err != nil {
			return nil, fmt.Errorf("scratch: map %d bytes: %w", size, err)
		}
	}
	return s, nil
}

// Close unmaps and closes the scratch; the writer's mapping, if any, keeps
// the memory until it unmaps too.
func (s *scratch) Close() error {
	var err error
	if s.mem != nil {
		err = unix.Munmap(s.mem)
		s.mem = nil
	}
	if cerr := s.file.Close(); err == nil {
		err = cerr
	}
	return err
}

// unixMsgConn is a connection that can pass file descriptors: a
// *net.UnixConn or the control socket's peerConn around one.
type unixMsgConn interface {
	net.Conn
	WriteMsgUnix(b, oob []byte, addr *net.UnixAddr) (n, oobn int, err error)
}

// sendWithFD writes data with fd attached (SCM_RIGHTS) to the sendmsg that
// carries its first byte; a partial write's rest goes as plain bytes.
func sendWithFD(c unixMsgConn, data []byte, fd int) error {
	n, _, err := c.WriteMsgUnix(data, unix.UnixRights(fd), nil)
	if err != nil {
		return err
	}
	if n < len(data) {
		_, err = c.Write(data[n:])
	}
	return err
}
