package store

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		err  bool
	}{
		{"1048576", 1 << 20, false},
		{" 4096 ", 4096, false},
		{"512B", 512, false},
		{"512MiB", 512 << 20, false},
		{"512Mi", 512 << 20, false},
		{"64Gi", 64 << 30, false},
		{"1Ti", 1 << 40, false},
		{"8Ki", 8 << 10, false},
		{"8kib", 8 << 10, false},
		{"2 GiB", 2 << 30, false},
		{"1.5GiB", 3 << 29, false},
		{"1.5Gi", 3 << 29, false},
		{"2GB", 2e9, false},
		{"3KB", 3000, false},
		{"1TB", 1e12, false},
		{"16G", 16 << 30, false},
		{"16g", 16 << 30, false},
		{"50%", 500, false},
		{"12.5 %", 125, false},
		{"100%", 1000, false},
		{"0", 0, true},
		{"0.5", 0, true},
		{"0Gi", 0, true},
		{"-1G", 0, true},
		{"12XB", 0, true},
		{"12Gii", 0, true},
		{"1e9", 0, true},
		{"150%", 0, true},
		{"0%", 0, true},
		{"NaN%", 0, true},
		{"%", 0, true},
		{"", 0, true},
		{"GiB", 0, true},
		{"Gi", 0, true},
		{"1.2.3Gi", 0, true},
		{"99999999999Ti", 0, true},
	}
	for _, c := range cases {
		got, err := ParseSize(c.in, 1000)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d (error %v)", c.in, got, err, c.want, c.err)
		}
	}
	if _, err := ParseSize("50%", 0); err == nil || !strings.Contains(err.Error(), "known total") {
		t.Errorf("a percentage of an unknown total: %v", err)
	}
}

func TestParseBudget(t *testing.T) {
	const total = 16 << 30
	cases := []struct {
		in   string
		want int64
		err  string
	}{
		{"16Gi", 16 << 30, ""},
		{"100%", 16 << 30, ""},
		{"8GB", 8e9, ""},
		{"17179869185", 0, "more than the machine's RAM (16.0 GiB)"},
		{"17Gi", 0, `"17Gi" is 17.0 GiB, more than the machine's RAM (16.0 GiB)`},
		{"1Ti", 0, "more than"},
		{"lots", 0, "unknown unit"},
	}
	for _, c := range cases {
		got, err := ParseBudget(c.in, total, "the machine's RAM")
		switch {
		case c.err == "" && (err != nil || got != c.want):
			t.Errorf("ParseBudget(%q) = %d, %v; want %d", c.in, got, err, c.want)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("ParseBudget(%q) = %d, %v; want an error containing %q", c.in, got, err, c.err)
		}
	}
	// An unknown total (0) checks nothing beyond the spelling.
	if got, err := ParseBudget("1Ti", 0, "x"); err != nil || got != 1<<40 {
		t.Errorf("ParseBudget with no total = %d, %v", got, err)
	}
}

func TestHostMemory(t *testing.T) {
	n, err := HostMemory()
	if err != nil || n < 1<<20 {
		t.Fatalf("HostMemory() = %d, %v", n, err)
	}
}
