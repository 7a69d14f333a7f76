package store

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ParseSize reads a memory size: bytes ("1073741824"), a number with a unit,
// or a percentage of total ("80%"). Units are binary in the Kubernetes
// spelling (Ki, Mi, Gi, Ti), with a B (KiB … TiB), or as one letter (K, M,
// G, T); KB, MB, GB, TB are decimal. Units ignore case.
func ParseSize(s string, total uint64) (int64, error) {
	t := strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(t, "%"); ok {
		f, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || !(f > 0 && f <= 100) {
			return 0, fmt.Errorf("%q: want a percentage in (0, 100]", s)
		}
		if total == 0 {
			return 0, fmt.Errorf("%q: a percentage needs a known total", s)
		}
		return int64(float64(total) * f / 100), nil
	}
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.TrimSpace(t[i:])
	}
	mult, ok := sizeUnits[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("%q: unknown unit %q (use Ki, Mi, Gi, Ti, KiB … TiB, KB … TB, bytes or %%)", s, unit)
	}
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || !(n >= 1) || n*mult > math.MaxInt64/2 {
		return 0, fmt.Errorf("%q: want a positive size such as 64Gi, 64GiB or 80%%", s)
	}
	return int64(n * mult), nil
}

var sizeUnits = map[string]float64{
	"": 1, "b": 1,
	"k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 1e12,
}

// ParseBudget reads a budget with ParseSize against total, the memory it
// divides, and refuses one larger than total; of names that memory for the
// message ("the machine's RAM").
func ParseBudget(s string, total uint64, of string) (int64, error) {
	n, err := ParseSize(s, total)
	if err != nil {
		return 0, err
	}
	if total > 0 && uint64(n) > total {
		return 0, fmt.Errorf("%q is %s, more than %s (%s)", s, HumanBytes(n), of, HumanBytes(int64(total)))
	}
	return n, nil
}

// HostMemory is the machine's total RAM in bytes.
func HostMemory() (uint64, error) {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0, fmt.Errorf("sysinfo: %w", err)
	}
	return uint64(si.Totalram) * uint64(si.Unit), nil
}
