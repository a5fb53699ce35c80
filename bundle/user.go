package bundle

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
)

// execUser is the resolved process user.
type execUser struct {
	uid, gid uint32
	sgids    []uint32
	home     string
}

type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

type groupEntry struct {
	name    string
	gid     uint32
	members []string
}

// lookupUser resolves an image config's User ("", "name", "uid",
// "name:group", "uid:gid", ...) as runc's libcontainer does: names (and
// numbers) are looked up in the rootfs's /etc/passwd and /etc/group; a
// number not found there is used as is; a name not found is an error.
// Without a group, the user's primary group from passwd and its
// supplementary groups from /etc/group apply. Home comes from passwd.
func lookupUser(spec, rootfs string) (execUser, error) {
	u := execUser{home: "/"}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	var passwd []passwdEntry
	var groups []groupEntry
	if rootfs != "" {
		var err error
		if passwd, err = readPasswd(rootfs); err != nil {
			return u, err
		}
		if groups, err = readGroup(rootfs); err != nil {
			return u, err
		}
	}
	var found *passwdEntry
	if userPart != "" {
		n, numErr := parseID(userPart)
		for i, p := range passwd {
			if p.name == userPart || (numErr == nil && p.uid == n) {
				found = &passwd[i]
				break
			}
		}
		switch {
		case found != nil:
			u.uid, u.gid, u.home = found.uid, found.gid, found.home
		case numErr == nil:
			u.uid = n
		default:
			return u, fmt.Errorf("image user %q: no such user in the image's /etc/passwd", userPart)
		}
	} else if len(passwd) > 0 {
		for i, p := range passwd {
			if p.uid == 0 {
				found = &passwd[i]
				u.gid, u.home = p.gid, p.home
				break
			}
		}
	}
	if hasGroup {
		n, numErr := parseID(groupPart)
		ok := false
		for _, g := range groups {
			if g.name == groupPart || (numErr == nil && g.gid == n) {
				u.gid, ok = g.gid, true
				break
			}
		}
		if !ok {
			if numErr != nil {
				return u, fmt.Errorf("image group %q: no such group in the image's /etc/group", groupPart)
			}
			u.gid = n
		}
		return u, nil
	}
	if found != nil {
		for _, g := range groups {
			if g.gid == u.gid {
				continue
			}
			for _, m := range g.members {
				if m == found.name {
					u.sgids = append(u.sgids, g.gid)
					break
				}
			}
		}
	}
	return u, nil
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

// readRootfsFile reads name (relative to rootfs) without following any
// symlink out of the rootfs. A missing file reads as empty.
func readRootfsFile(rootfs, name string) ([]string, error) {
	root, err := os.OpenRoot(rootfs)
	if err != nil {
		return nil, fmt.Errorf("open rootfs: %w", err)
	}
	defer root.Close()
	f, err := root.Open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("image's /%s: %w", name, err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		lines = append(lines, l)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("image's /%s: %w", name, err)
	}
	return lines, nil
}

// readPasswd parses name:password:uid:gid:gecos:home:shell lines, skipping
// malformed ones as libc does.
func readPasswd(rootfs string) ([]passwdEntry, error) {
	lines, err := readRootfsFile(rootfs, "etc/passwd")
	if err != nil {
		return nil, err
	}
	var out []passwdEntry
	for _, l := range lines {
		f := strings.Split(l, ":")
		if len(f) < 7 {
			continue
		}
		uid, err1 := parseID(f[2])
		gid, err2 := parseID(f[3])
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, passwdEntry{name: f[0], uid: uid, gid: gid, home: f[5]})
	}
	return out, nil
}

// readGroup parses name:password:gid:member,member lines.
func readGroup(rootfs string) ([]groupEntry, error) {
	lines, err := readRootfsFile(rootfs, "etc/group")
	if err != nil {
		return nil, err
	}
	var out []groupEntry
	for _, l := range lines {
		f := strings.Split(l, ":")
		if len(f) < 4 {
			continue
		}
		gid, err := parseID(f[2])
		if err != nil {
			continue
		}
		g := groupEntry{name: f[0], gid: gid}
		if f[3] != "" {
			g.members = strings.Split(f[3], ",")
		}
		out = append(out, g)
	}
	return out, nil
}
