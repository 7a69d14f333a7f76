package store

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/codec"
)

// Snapshots (docs/ARCHITECTURE.md, "Snapshots"): with a snapshot directory,
// every committed pushed version is written to DIR/NAME/N/ once its host
// images are filled and checksummed, by its background goroutine, one
// snapshot at a time in the store: each weights file as one codec stream,
// other files raw, and version.json saying what they are.

// snapshotFormat is version.json's format number; another one is refused.
const snapshotFormat = 1

const (
	snapshotManifest = "version.json"
	snapshotTmp      = ".tmp-"
	// encodingCodec and encodingRaw are how a file's bytes are stored.
	encodingCodec = "wfsc"
	encodingRaw   = "raw"
	// maxSnapshotManifest bounds what is read of a version.json.
	maxSnapshotManifest = 64 << 20
)

type snapshotVersion struct {
	Format   int            `json:"format"`
	Model    string         `json:"model"`
	Number   int            `json:"number"`
	Source   string         `json:"source"`
	LoadedAt time.Time      `json:"loaded_at"`
	Dirs     []manifestDir  `json:"dirs"` // "." first: the version's root
	Files    []snapshotFile `json:"files"`
}

type snapshotFile struct {
	Path string `json:"path"`
	Kind string `json:"kind"`
	// Size is the file's length, XXH3 the XXH3-64 of its bytes.
	Size int64  `json:"size"`
	XXH3 string `json:"xxh3"`
	// Data is the name of the file in the snapshot folder holding its
	// bytes as Encoding says; EncodedSize is that file's length.
	Data        string `json:"data"`
	Encoding    string `json:"encoding"`
	EncodedSize int64  `json:"encoded_size"`
	manifestAttrs
}

// encodeBound is the room reserved for the stream of n bytes, so that it
// is not grown while encoded: the raw bytes plus room for the headers (a
// stream is at most its headers larger than its input, docs/CODEC.md).
func encodeBound(n int) int { return n + n/(64<<10)*64 + 1<<20 }

// isPushed: the version was pushed (it has no source on disk).
func (v *Version) isPushed() bool { return strings.HasPrefix(v.source, pushSource) }

// snapshotWanted: v is written to the snapshot directory after its checksums.
func (s *Store) snapshotWanted(v *Version) bool { return s.snap != nil && v.isPushed() }

// WaitSnapshot waits until the version's snapshot is written (nil), was
// already there (nil), or failed; it is an error for a version that is not
// snapshotted (no snapshot directory, not pushed) or with ctx's error.
func (v *Version) WaitSnapshot(ctx context.Context) error {
	if v.snapped == nil {
		return fmt.Errorf("snapshot of %s: none is written (no --snapshot-dir, or not a pushed version)", v.Name())
	}
	select {
	case <-v.snapped:
		return v.snapErr
	case <-ctx.Done():
		return fmt.Errorf("wait for the snapshot of %s: %w", v.Name(), context.Cause(ctx))
	}
}

// writeSnapshot is run by v's background goroutine after its checksums; it
// logs what happened.
func (s *Store) writeSnapshot(ctx context.Context, v *Version) error {
	select {
	case s.snapSem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("snapshot of %s: %w", v.Name(), ctx.Err())
	}
	defer func() { <-s.snapSem }()
	start := time.Now()
	raw, written, err := s.snapshotVersion(ctx, v)
	switch {
	case err != nil:
		err = fmt.Errorf("snapshot of %s: %w", v.Name(), err)
		if ctx.Err() == nil {
			s.snapFailed.Add(1)
			s.log.Error("snapshot failed", "version", v.Name(), "reason", err.Error())
		}
		return err
	case written < 0:
		s.log.Debug("snapshot already there", "version", v.Name())
		return nil
	}
	s.snapWritten.Add(1)
	s.snapBytes.Add(written)
	ratio := 0.0
	if written > 0 {
		ratio = float64(raw) / float64(written)
	}
	s.log.Info("snapshot written", "version", v.Name(), "bytes_raw", raw, "bytes_written", written,
		"ratio", fmt.Sprintf("%.3f", ratio), "seconds", time.Since(start).Seconds(),
		"dir", filepath.Join(s.snap.path, v.model, strconv.Itoa(v.number)))
	s.pruneSnapshots(v.model)
	return nil
}

// snapshotVersion writes DIR/NAME/N crash-safely and returns the bytes of
// the version and those written (-1: the snapshot was already there).
func (s *Store) snapshotVersion(ctx context.Context, v *Version) (raw, written int64, err error) {
	modelFD, err := s.snap.modelDir(v.model, true)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(modelFD)
	final := strconv.Itoa(v.number)
	var st unix.Stat_t
	if err := unix.Fstatat(modelFD, final, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil {
		return 0, -1, nil
	}
	modelPath := filepath.Join(s.snap.path, v.model)
	tmp := fmt.Sprintf("%s%d-%d", snapshotTmp, v.number, time.Now().UnixNano())
	tmpPath := filepath.Join(modelPath, tmp)
	if err := unix.Mkdirat(modelFD, tmp, 0o700); err != nil {
		return 0, 0, fmt.Errorf("create %s: %w", tmpPath, err)
	}
	done := false
	defer func() {
		if !done {
			if rerr := removeTree(modelFD, tmp, tmpPath); rerr != nil {
				s.log.Error("delete an unfinished snapshot", "dir", tmpPath, "err", rerr)
			}
		}
	}()
	tmpFD, err := openDirBeneath(modelFD, tmp)
	if err != nil {
		return 0, 0, fmt.Errorf("open %s: %w", tmpPath, err)
	}
	defer unix.Close(tmpFD)

	c := codec.New(codec.Options{})
	defer c.Close()
	mv, _ := v.manifest() // v's background: it is not compressed
	sv := snapshotVersion{Format: snapshotFormat, Model: v.model, Number: v.number, Source: v.source,
		LoadedAt: v.loadedAt, Dirs: mv.Dirs}
	for i, f := range v.files {
		sum, ok := f.Checksum()
		if !ok {
			return 0, 0, fmt.Errorf("%s: its checksum is not known (its host image may be incomplete)", f.path)
		}
		sf := snapshotFile{Path: f.path, Kind: f.kind.String(), Size: f.Size(), XXH3: FormatChecksum(sum),
			Encoding: encodingRaw, manifestAttrs: toAttrs(f.attrs)}
		data := f.Bytes()
		if data == nil && sf.Size > 0 {
			// Adopted in the compressed tier after a crash (its snapshot
			// failed before), or restored meanwhile: not written now.
			return 0, 0, fmt.Errorf("%s: it is not in the host tier", f.path)
		}
		if f.kind == Weights {
			enc, err := c.EncodeSafetensors(ctx, make([]byte, 0, encodeBound(len(data))), data, checksumWorkers())
			if err != nil {
				return 0, 0, fmt.Errorf("encode %s: %w", f.path, err)
			}
			data, sf.Encoding = enc, encodingCodec
		}
		sf.Data = fmt.Sprintf("%d.%s", i, sf.Encoding)
		sf.EncodedSize = int64(len(data))
		if err := ctx.Err(); err != nil {
			return 0, 0, err
		}
		err := createFile(tmpFD, sf.Data, filepath.Join(tmpPath, sf.Data), func(w io.Writer) error {
			_, err := w.Write(data)
			return err
		})
		if err != nil {
			return 0, 0, err
		}
		raw += sf.Size
		written += sf.EncodedSize
		sv.Files = append(sv.Files, sf)
	}
	js, err := json.MarshalIndent(sv, "", "  ")
	if err != nil {
		return 0, 0, fmt.Errorf("encode %s: %w", snapshotManifest, err)
	}
	err = createFile(tmpFD, snapshotManifest, filepath.Join(tmpPath, snapshotManifest), func(w io.Writer) error {
		_, err := w.Write(append(js, '\n'))
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	if err := unix.Fsync(tmpFD); err != nil {
		return 0, 0, fmt.Errorf("fsync %s: %w", tmpPath, err)
	}
	if err := unix.Renameat(modelFD, tmp, modelFD, final); err != nil {
		return 0, 0, fmt.Errorf("rename %s to %s: %w", tmpPath, final, err)
	}
	done = true
	if err := unix.Fsync(modelFD); err != nil {
		return 0, 0, fmt.Errorf("fsync %s: %w", modelPath, err)
	}
	return raw, written + int64(len(js)+1), nil
}

// pruneSnapshots keeps the newest --keep-versions snapshots of model (all
// of them with 0) and deletes the older ones.
//
// A version served from the snapshot tier (snaptier.go) holds its data
// files open, and deleting them is safe: on Linux an unlinked file lives
// until its last descriptor closes, so its restore reads the same bytes
// and its disk space comes back when it leaves the tier (a restore, an
// unload). Keeping such snapshots instead would break the rule that
// retention counts snapshots, not what is served, and would leave their
// deletion to whoever frees the version. Once deleted, the version is not
// moved to the snapshot tier again (there is no snapshot to move to).
func (s *Store) pruneSnapshots(model string) {
	if s.keep <= 0 {
		return
	}
	fd, err := s.snap.modelDir(model, false)
	if err != nil {
		s.log.Error("snapshot retention", "model", model, "err", err)
		return
	}
	defer unix.Close(fd)
	modelPath := filepath.Join(s.snap.path, model)
	names, err := listDir(fd, modelPath)
	if err != nil {
		s.log.Error("snapshot retention", "model", model, "err", err)
		return
	}
	nums := versionNumbers(names)
	if len(nums) <= s.keep {
		return
	}
	for _, n := range nums[s.keep:] {
		p := filepath.Join(modelPath, strconv.Itoa(n))
		if err := removeTree(fd, strconv.Itoa(n), p); err != nil {
			s.log.Error("snapshot retention", "version", fmt.Sprintf("%s@%d", model, n), "err", err)
			continue
		}
		s.log.Info("snapshot deleted", "version", fmt.Sprintf("%s@%d", model, n), "dir", p,
			"reason", fmt.Sprintf("retention: keeping the newest %d snapshots", s.keep))
	}
}
