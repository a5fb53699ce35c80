//go:build !race

package main

// raceOn tells heavy tests that the race detector makes them too slow.
const raceOn = false
