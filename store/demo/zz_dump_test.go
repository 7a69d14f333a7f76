package demo

import (
	"os"
	"testing"
)

func TestZZDump(t *testing.T) {
	if d := os.Getenv("DEMO"); d != "" {
		if err := Write(d); err != nil {
			t.Fatal(err)
		}
	}
}
