package main

import (
	"math"
	"time"

	"github.com/spf13/pflag"

	"github.com/weightfs/weightfs/store/control"
)

// pushFlags are the daemon's flags for pushes (docs/CONTROL.md, Pushing).
type pushFlags struct {
	timeout    time.Duration
	uids, gids []uint
}

func (p *pushFlags) register(fl *pflag.FlagSet) {
	fl.DurationVar(&p.timeout, "push-timeout", control.DefaultPushTimeout, "abort a push not committed this long after it started (0: no limit)")
	fl.UintSliceVar(&p.uids, "push-allow-uid", nil, "uids that may push versions over the control socket, and do nothing else (repeatable)")
	fl.UintSliceVar(&p.gids, "push-allow-gid", nil, "gids (primary or supplementary) that may push versions, and do nothing else (repeatable)")
}

// listen checks the flags and gives the socket's options.
func (p *pushFlags) listen() (control.ListenOptions, error) {
	var opts control.ListenOptions
	if p.timeout < 0 {
		return opts, usagef("--push-timeout %s: want a duration of 0 (no limit) or more", p.timeout)
	}
	ids := func(flag string, in []uint) ([]uint32, error) {
		var out []uint32
		for _, id := range in {
			if id >= math.MaxUint32 { // (uid_t)-1 is no one
				return nil, usagef("%s %d: want a uid or gid below %d", flag, id, uint64(math.MaxUint32))
			}
			out = append(out, uint32(id))
		}
		return out, nil
	}
	var err error
	if opts.PushUIDs, err = ids("--push-allow-uid", p.uids); err != nil {
		return opts, err
	}
	opts.PushGIDs, err = ids("--push-allow-gid", p.gids)
	return opts, err
}
