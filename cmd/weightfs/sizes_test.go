package main

import "testing"

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want int64
		err  bool
	}{
		{"1048576", 1 << 20, false},
		{"512MiB", 512 << 20, false},
		{"2GB", 2e9, false},
		{"16G", 16 << 30, false},
		{"1.5GiB", 3 << 29, false},
		{"50%", 500, false},
		{"100%", 1000, false},
		{"0", 0, true},
		{"-1G", 0, true},
		{"12XB", 0, true},
		{"150%", 0, true},
		{"%", 0, true},
		{"", 0, true},
		{"GiB", 0, true},
	}
	for _, c := range cases {
		got, err := parseSize(c.in, 1000)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d (error %v)", c.in, got, err, c.want, c.err)
		}
	}
}
