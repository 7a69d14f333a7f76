package store

import "os"

// CheckPrivateFolder is the rule for a folder only the daemon may change
// (the control socket's, --state-dir, --snapshot-dir): it belongs to root
// or to the daemon's uid, and neither its group nor others can write to it.
// what names the folder in the refusal ("folder /run/weightfs",
// "--state-dir /run/weightfs").
func CheckPrivateFolder(what string, uid, mode uint32) error {
	if uid != 0 && int(uid) != os.Geteuid() {
		return errorf(ErrInvalid, "%s belongs to uid %d: it must belong to root or to uid %d, the daemon's", what, uid, os.Geteuid())
	}
	if mode&0o022 != 0 {
		return errorf(ErrInvalid, "%s is mode %04o: others can write to it (it must be writable by its owner only)", what, mode&0o7777)
	}
	return nil
}
