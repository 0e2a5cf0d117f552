package main

import (
	"regexp"
	"testing"
)

func TestJobs(t *testing.T) {
	want := map[int][]string{
		1: {"4k randread QD1", "4k randread QD32", "4k randwrite QD1", "4k randwrite QD32", "1M seqread QD4", "1M seqwrite QD4"},
		2: {"4k randread QD2x1", "4k randread QD2x16", "4k randwrite QD2x1", "4k randwrite QD2x16", "1M seqread QD2x2", "1M seqwrite QD2x2"},
	}
	for nq, names := range want {
		js := jobsFor(nq)
		if len(js) != len(names) {
			t.Fatalf("%d queues: %d jobs", nq, len(js))
		}
		for i, j := range js {
			if j.Name != names[i] || j.Queues != nq || j.class == "" {
				t.Errorf("%d queues, job %d: %+v, want name %q", nq, i, j, names[i])
			}
		}
	}
	// The -jobs examples in the README select what they say.
	re := regexp.MustCompile("QD32|QD2x16")
	n := 0
	for _, nq := range []int{1, 2} {
		for _, j := range jobsFor(nq) {
			if re.MatchString(j.Name) {
				n++
				if j.class != "qd32" {
					t.Errorf("%s matched but is %s", j.Name, j.class)
				}
			}
		}
	}
	if n != 4 {
		t.Errorf("QD32|QD2x16 selects %d jobs, want 4", n)
	}
}
