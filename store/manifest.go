package store

import (
	"encoding/json"
	"io/fs"
	"sort"
	"strconv"
	"time"
)

// The manifest, DIR/state.json, says what the host images in DIR/images are:
// which version of which model, from which source files as they were when
// they were read. It is rewritten atomically after every commit, unload,
// rollback and retention drop, compression and restore, and once a
// version's checksums are known.

// manifestFormat is the manifest's format number; another one is ignored.
const manifestFormat = 1

type stateManifest struct {
	Format int             `json:"format"`
	Models []manifestModel `json:"models"`
}

type manifestModel struct {
	Name       string            `json:"name"`
	LastNumber int               `json:"last_number"`
	Current    int               `json:"current,omitempty"`
	Versions   []manifestVersion `json:"versions,omitempty"`
}

type manifestVersion struct {
	Number      int            `json:"number"`
	LoadedAt    time.Time      `json:"loaded_at"`
	LoadSeconds float64        `json:"load_seconds"`
	Source      string         `json:"source"`
	Dirs        []manifestDir  `json:"dirs"` // "." first: the version's root
	Files       []manifestFile `json:"files"`
}

type manifestDir struct {
	Path string `json:"path"`
	manifestAttrs
}

type manifestAttrs struct {
	UID  uint32 `json:"uid"`
	GID  uint32 `json:"gid"`
	Perm uint32 `json:"perm"`
}

type manifestFile struct {
	Path string `json:"path"`
	Kind string `json:"kind"`
	Size int64  `json:"size"`
	// Image is the host image's name in DIR/images (the host tier).
	Image string `json:"image,omitempty"`
	// Tier is "" (the host tier), "compressed" (Packed is the name in
	// DIR/images of the file's codec stream) or "snapshot" (Snapshot is
	// the name of its data file in the version's snapshot folder); the
	// stream is PackedSize bytes.
	Tier       string `json:"tier,omitempty"`
	Packed     string `json:"packed,omitempty"`
	Snapshot   string `json:"snapshot,omitempty"`
	PackedSize int64  `json:"packed_size,omitempty"`
	Source     string `json:"source,omitempty"` // "": pushed, adopted by checksum
	// SourceID is the source's identity when it was read.
	SourceID *manifestID `json:"source_id,omitempty"`
	XXH3     string      `json:"xxh3,omitempty"`
	manifestAttrs
}

type manifestID struct {
	Dev     uint64 `json:"dev"`
	Ino     uint64 `json:"ino"`
	Size    int64  `json:"size"`
	MtimeNs int64  `json:"mtime_ns"`
}

func toAttrs(a attrs) manifestAttrs {
	return manifestAttrs{UID: a.uid, GID: a.gid, Perm: uint32(a.perm.Perm())}
}

func (m manifestAttrs) attrs(mask fs.FileMode) attrs {
	return attrs{uid: m.UID, gid: m.GID, perm: fs.FileMode(m.Perm) & mask}
}

func toID(id fileID) *manifestID {
	return &manifestID{Dev: id.dev, Ino: id.ino, Size: id.size, MtimeNs: id.mtime.Nano()}
}

// sameSource says how the file a path names now differs from the recorded
// identity: path, size, mtime, inode and device ("" when it does not).
func (m *manifestID) diff(now fileID) string {
	switch {
	case m.Dev != now.dev || m.Ino != now.ino:
		return "it was replaced by another file (inode changed)"
	case m.Size != now.size:
		return "its size went from " + strconv.FormatInt(m.Size, 10) + " to " + strconv.FormatInt(now.size, 10) + " bytes"
	case m.MtimeNs != now.mtime.Nano():
		return "it was modified (mtime changed)"
	}
	return ""
}

// manifestLocked describes what the store serves; s.mu is held.
func (s *Store) manifestLocked() stateManifest {
	out := stateManifest{Format: manifestFormat}
	names := make([]string, 0, len(s.lastNumber))
	for name := range s.lastNumber {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		mm := manifestModel{Name: name, LastNumber: s.lastNumber[name]}
		if m := s.models[name]; m != nil {
			m.mu.RLock()
			if m.current != nil {
				mm.Current = m.current.number
			}
			for _, v := range m.versions {
				if mv, ok := v.manifest(); ok { // see manifest for the ones not named
					mm.Versions = append(mm.Versions, mv)
				}
			}
			m.mu.RUnlock()
		}
		out.Models = append(out.Models, mm)
	}
	return out
}

func (v *Version) manifest() (manifestVersion, bool) {
	mv := manifestVersion{Number: v.number, LoadedAt: v.loadedAt, LoadSeconds: v.loadTime.Seconds(), Source: v.source}
	var walk func(rel string, d *Dir)
	walk = func(rel string, d *Dir) {
		mv.Dirs = append(mv.Dirs, manifestDir{Path: rel, manifestAttrs: toAttrs(d.attrs)})
		for _, c := range d.dirs {
			p := c.name
			if rel != "." {
				p = rel + "/" + c.name
			}
			walk(p, c)
		}
	}
	walk(".", v.root)
	for _, f := range v.files {
		f.tmu.RLock()
		b, p, raw := f.buf, f.packed, f.rawSize
		f.tmu.RUnlock()
		mf := manifestFile{Path: f.path, Kind: f.kind.String(), Source: f.source, manifestAttrs: toAttrs(f.attrs)}
		switch {
		case b != nil:
			mf.Size, mf.Image = b.Size(), b.image
		case p != nil && p.image != "":
			mf.Size, mf.Tier, mf.Packed, mf.PackedSize = raw, TierCompressed, p.image, p.Size()
		case p != nil && p.snapshot != "":
			mf.Size, mf.Tier, mf.Snapshot, mf.PackedSize = raw, TierSnapshot, p.snapshot, p.Size()
		default:
			return mv, false // freed
		}
		if f.source != "" && f.hasSrcID {
			mf.SourceID = toID(f.srcID)
		}
		if sum, ok := f.Checksum(); ok {
			mf.XXH3 = FormatChecksum(sum)
		}
		mv.Files = append(mv.Files, mf)
	}
	return mv, true
}

// saveState rewrites the manifest (stores without a state directory: nothing).
// A failure is logged: the daemon serves on, and a crash would re-read
// what the manifest does not name.
func (s *Store) saveState() {
	if s.state == nil {
		return
	}
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return
	}
	m := s.manifestLocked()
	s.mu.RUnlock()
	data, err := json.MarshalIndent(m, "", "  ")
	if err == nil {
		err = s.state.writeManifest(append(data, '\n'))
	}
	if err != nil {
		s.log.Error("save the state manifest; a crash now re-reads sources", "err", err)
	}
}
