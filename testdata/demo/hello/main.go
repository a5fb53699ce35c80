// Command hello is the demo image's program: a static binary that runs in a
// chroot of the mounted rootfs and shows what it sees.
package main

import (
	"fmt"
	"os"
)

func main() {
	b, err := os.ReadFile("/etc/os-release")
	if err != nil {
		fmt.Fprintln(os.Stderr, "hello:", err)
		os.Exit(1)
	}
	fmt.Printf("hello from inside the image; /etc/os-release says:\n%s", b)
}
