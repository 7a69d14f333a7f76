package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// parseSize reads a memory size: bytes ("1073741824"), with a unit ("512MiB",
// "2GB", "16G": K, M, G, T alone are binary), or a percentage of total ("80%").
func parseSize(s string, total uint64) (int64, error) {
	t := strings.TrimSpace(s)
	if strings.HasSuffix(t, "%") {
		p, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(t, "%")), 64)
		if err != nil || p <= 0 || p > 100 || math.IsNaN(p) {
			return 0, fmt.Errorf("%q: want a percentage in (0, 100]", s)
		}
		if total == 0 {
			return 0, fmt.Errorf("%q: a percentage needs a known total", s)
		}
		return int64(float64(total) * p / 100), nil
	}
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.TrimSpace(t[i:])
	}
	mult, ok := sizeUnits[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("%q: unknown unit %q (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %%)", s, unit)
	}
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n <= 0 || math.IsInf(n, 0) || n*mult > math.MaxInt64/2 {
		return 0, fmt.Errorf("%q: want a positive size such as 64GiB or 80%%", s)
	}
	return int64(n * mult), nil
}

var sizeUnits = map[string]float64{
	"": 1, "b": 1,
	"k": 1 << 10, "kib": 1 << 10, "kb": 1e3,
	"m": 1 << 20, "mib": 1 << 20, "mb": 1e6,
	"g": 1 << 30, "gib": 1 << 30, "gb": 1e9,
	"t": 1 << 40, "tib": 1 << 40, "tb": 1e12,
}
